"""The package version: the one place it is written (pyproject.toml reads it from here).

Modules inside the package import it from here, never from the package's `__init__`.
"""

__version__ = "0.1.0"

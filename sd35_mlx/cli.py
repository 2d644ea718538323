"""What the two command lines share: how a refusal looks, and how library logs are shown."""

from __future__ import annotations

import argparse
import logging
import sys


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a refusal is one line (`prog: error: …`) with exit code 2, like our own."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes (tests and callers swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_logging() -> None:
    """The libraries log; the CLI shows their warnings (--quiet too: they say something is off).
    Their notes (INFO: which file is loaded, …) stay hidden: the CLI prints what matters itself."""
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname_lower)s%(message)s"))
    handler.addFilter(_label_levels)
    package = logging.getLogger("sd35_mlx")
    package.handlers[:] = [h for h in package.handlers if not isinstance(h, _StderrHandler)] + [handler]
    package.setLevel(logging.WARNING)


def _label_levels(record: logging.LogRecord) -> bool:
    record.levelname_lower = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
    return True

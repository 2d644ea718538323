"""The package's structure: no module inside it imports the package's `__init__` (which
imports almost everything: a module doing so would pull the whole package in, and cycles
with it), facts with one home are not defined again elsewhere, and the kernel switches are
one settable object."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import sd35_mlx
from sd35_mlx.backend import KERNELS, backend_name

PACKAGE = Path(sd35_mlx.__file__).parent


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path, ".".join(("sd35_mlx",) + path.relative_to(PACKAGE).with_suffix("").parts)


def imported_modules(path: Path, name: str):
    """Absolute names of what `path` (module `name`) imports, with the names it takes from each."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, ()
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield target, tuple(a.name for a in node.names)


def test_no_module_imports_the_package_init():
    offenders = []
    for path, name in modules():
        if name == "sd35_mlx.__init__":
            continue
        for target, names in imported_modules(path, name):
            if target == "sd35_mlx":
                # `from sd35_mlx import x` (or `from . import x` at the top) is only fine when every
                # x is a submodule: then Python imports that module, but still runs __init__ first
                offenders.append(f"{name}: from {target} import {', '.join(names) or '*'}")
    assert offenders == []


def test_the_graph_check_sees_relative_imports(tmp_path):
    """The check above resolves `from .. import x` to the package (so it can fail)."""
    pkg = tmp_path / "sd35_mlx" / "weights"
    pkg.mkdir(parents=True)
    f = pkg / "bad.py"
    f.write_text("from .. import __version__\nfrom ..quantize import QuantSpec\n")
    assert list(imported_modules(f, "sd35_mlx.weights.bad")) == [
        ("sd35_mlx", ("__version__",)), ("sd35_mlx.quantize", ("QuantSpec",))
    ]  # fmt: skip


# Facts with one home: a pattern that defines the fact, and the module allowed to define it.
ONE_HOME = {
    r'^__version__ = "': "_version.py",
    r'^COMPONENTS\b.*= \(': "components.py",
    r'"clip_g": "tokenizer_2"': "components.py",
    r'"clip_g": "text_encoder_2"': "components.py",
    r'"bfloat16": mx\.bfloat16': "components.py",
    r"\(7, 8, 9\)": "sampling/guidance.py",  # skip-layer guidance's defaults
    r"\b2\.8\b": "sampling/guidance.py",
    r"^[A-Z_]+ = (True|False)\b": None,  # module-level switches: KERNELS (backend.py) instead
}


@pytest.mark.parametrize("pattern, home", list(ONE_HOME.items()))
def test_each_fact_has_one_home(pattern, home):
    where = sorted(
        str(path.relative_to(PACKAGE))
        for path, _ in modules()
        if re.search(pattern, path.read_text(), re.MULTILINE)
    )
    assert where == ([home] if home else [])


def test_the_kernel_switches_restore_and_refuse_unknown_names():
    assert backend_name() in ("cpu", "metal", "cuda")
    assert (KERNELS.dequantize, KERNELS.joint_heads, KERNELS.group_norm) == (True, True, True)
    with pytest.raises(RuntimeError), KERNELS.overridden(joint_heads=False, group_norm=False):
        assert not KERNELS.joint_heads and not KERNELS.group_norm and KERNELS.dequantize
        raise RuntimeError
    assert KERNELS.joint_heads and KERNELS.group_norm
    with pytest.raises(TypeError, match="unknown kernel switch"):
        with KERNELS.overridden(fused_everything=False):
            pass

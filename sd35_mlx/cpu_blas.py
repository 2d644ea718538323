"""An optimized BLAS for MLX's Linux CPU build, when the machine has one.

MLX's Linux CPU wheel links the reference BLAS (netlib): dense fp32 matmul runs at 1-3 GFLOP/s
on a 2-core x86 machine. OpenBLAS loaded with RTLD_GLOBAL *before* `mlx.core` is imported
provides the same `cblas_*` symbols first in the process's global scope, so MLX's calls bind to
it: 28 GFLOP/s on the same machine (docs/performance.md). After `mlx.core` was imported it is
too late (its symbols are bound), so `sd35_mlx/__init__.py` calls `preload()` first of all;
`python -m sd35_mlx.generate` gets it without anything to do.

    SD35_MLX_BLAS=off                      # opt out
    SD35_MLX_BLAS=/path/to/libopenblas.so  # this library (it must export cblas_sgemm)

Debian / Ubuntu: `apt-get install libopenblas0-pthread`; Fedora: `dnf install openblas`;
conda: `conda install openblas`. Nothing here imports MLX.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import logging
import os
import sys
from pathlib import Path
from typing import Iterable, Optional

log = logging.getLogger(__name__)

ENV = "SD35_MLX_BLAS"
CANDIDATES = (  # the multi-threaded builds first
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblasp.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

_loaded: Optional[str] = None


def candidates() -> Iterable[str]:
    if sys.prefix:  # a conda / venv prefix's own OpenBLAS
        yield str(Path(sys.prefix) / "lib" / "libopenblas.so.0")
    yield from CANDIDATES
    found = ctypes.util.find_library("openblas")
    if found:
        yield found


def mlx_links_reference_blas() -> bool:
    """Whether the installed MLX is the Linux CPU wheel with its bundled netlib BLAS."""
    try:
        spec = importlib.util.find_spec("mlx")
    except (ImportError, ValueError):
        return False
    for location in (spec.submodule_search_locations or []) if spec else []:
        if any((Path(location).parent / "mlx_cpu.libs").glob("libblas*")):
            return True
    return False


def preload() -> Optional[str]:
    """Load an OpenBLAS with RTLD_GLOBAL if MLX's Linux CPU build would otherwise use the
    reference BLAS. Returns the library loaded (None: not on Linux, opted out, MLX already
    imported, or none found)."""
    global _loaded
    choice = os.environ.get(ENV, "").strip()
    if _loaded or not sys.platform.startswith("linux") or choice.lower() in ("off", "0", "none"):
        return _loaded
    if not choice and not mlx_links_reference_blas():
        return None
    if "mlx.core" in sys.modules:
        log.info("mlx.core was imported before sd35_mlx: MLX keeps the BLAS it linked (import sd35_mlx first "
                 "for OpenBLAS, see sd35_mlx/cpu_blas.py)")
        return None
    for path in [choice] if choice else candidates():
        if not path or (os.path.isabs(path) and not os.path.exists(path)):
            continue
        try:
            lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            lib.cblas_sgemm  # noqa: B018 - the symbol MLX's matmul calls
        except (OSError, AttributeError) as e:
            if choice:
                log.warning("%s=%s: cannot use it (%s); MLX keeps its own BLAS", ENV, choice, e)
            continue
        _loaded = path
        log.debug("MLX CPU: BLAS from %s", path)
        return path
    return None


def loaded() -> Optional[str]:
    """The optimized BLAS this process loaded (None: MLX's own)."""
    return _loaded

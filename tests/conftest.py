import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import sd35_mlx  # noqa: E402,F401  (first: it loads OpenBLAS before mlx.core where MLX's CPU wheel needs it)
import mlx.core as mx  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _package_logging_reset():
    """The CLI's setup_logging sets the package logger's level and handler (also from module-scoped
    fixtures that run the CLI): every test starts from the library's own state, so caplog sees
    the library's warnings whatever ran before."""
    import logging

    package = logging.getLogger("sd35_mlx")
    package.setLevel(logging.NOTSET)
    package.handlers.clear()
    yield


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    mx.random.seed(0)
    yield


@pytest.fixture
def memory_limit_log(monkeypatch):
    """MLX's memory limit as the code under test sets it: {"limit": current, "original": before}."""
    from sd35_mlx import memory

    real_set = mx.set_memory_limit
    current = {"limit": real_set(10**12)}
    real_set(current["limit"])
    current["original"] = current["limit"]

    def recording_set(limit):
        current["limit"] = limit
        return real_set(limit)

    monkeypatch.setattr(memory.mx, "set_memory_limit", recording_set)
    return current

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

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

"""`python -m sd35_mlx.serve`: a local HTTP server speaking the OpenAI Images API.

Built on `SD35Pipeline`'s public API only. Needs the `serve` extra (Starlette, uvicorn,
python-multipart): `pip install -e ".[serve]"`. See docs/serving.md.
"""

from .errors import RequestError
from .fields import FIELDS, ImageRequest, parse_request

__all__ = ["FIELDS", "ImageRequest", "RequestError", "create_app", "parse_request"]


def create_app(*args, **kwargs):
    """`app.create_app` (imported on use, so the field table needs no HTTP stack)."""
    from .app import create_app as _create_app

    return _create_app(*args, **kwargs)

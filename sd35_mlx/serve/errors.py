"""Errors the server answers with, in the OpenAI error shape:
`{"error": {"message", "type", "param", "code"}}` (what OpenAI clients parse and show)."""

from __future__ import annotations

from typing import Any, Dict, Optional


class RequestError(Exception):
    """A request the server refuses; `status` is the HTTP status it is answered with."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        param: Optional[str] = None,
        code: Optional[str] = None,
        type: str = "invalid_request_error",
        headers: Optional[Dict[str, str]] = None,
    ):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.type = type
        self.headers = headers or {}

    def body(self) -> Dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class BodyTooLarge(RequestError):
    def __init__(self, limit: int):
        super().__init__(
            f"the request body is larger than this server accepts ({limit:,} bytes)",
            status=413, code="request_too_large",
        )  # fmt: skip


class Busy(RequestError):
    """The model's queue is full: come back after `retry_after` seconds."""

    def __init__(self, model: str, waiting: int, retry_after: int):
        super().__init__(
            f"model {model!r} is busy ({waiting} generation(s) running or queued); retry after {retry_after} s",
            status=429, code="rate_limit_exceeded", type="rate_limit_error",
            headers={"Retry-After": str(retry_after)},
        )  # fmt: skip


def server_error(message: str) -> RequestError:
    return RequestError(message, status=500, type="server_error", code="internal_error")

"""The HTTP side: an ASGI app (Starlette) speaking the OpenAI Images API.

Routes: POST /v1/images/generations, POST /v1/images/edits, GET /v1/models, GET /health.
Around them, outermost first: CORS (only when origins were given), the body-size limit (413),
the API key (401). Every refusal has OpenAI's error shape (errors.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .errors import BodyTooLarge, RequestError, server_error
from .fields import FILE_FIELDS, ImageRequest, check_lora_names, parse_request, validated
from .models import ModelRegistry
from .uploads import decode_upload, display_name, size_for, write_private_png
from .worker import Event, Job, Worker

log = logging.getLogger(__name__)

OPEN_PATHS = ("/health",)  # answered without the API key (liveness probes); they tell nothing secret


@dataclass(frozen=True)
class ServerOptions:
    api_key: Optional[str] = None
    cors_origins: Sequence[str] = ()
    max_json_bytes: int = 1 << 20  # a 100k-character prompt still fits, so it gets the prompt's own message
    max_upload_bytes: int = 20 << 20
    queue_size: int = 4
    max_steps: int = 200  # this server's bound on one request's work (the CLI's own bound is higher)


def create_app(registry: ModelRegistry, options: ServerOptions = ServerOptions(), worker: Optional[Worker] = None) -> Starlette:
    """The app; its start-up starts the worker (unless given one already running) and prepares
    the --model models on it."""
    worker = worker or Worker(registry, queue_size=options.queue_size)
    uploads = Path(tempfile.mkdtemp(prefix="sd35-serve-"))  # 0700: only this user reads it

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if not worker.started:
            worker.start()
        await asyncio.get_running_loop().run_in_executor(None, worker.call, registry.prepare_started)
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, worker.stop)
            shutil.rmtree(uploads, ignore_errors=True)

    async def health(request: Request) -> Response:
        current = worker.current
        running = None if current is None else {"model": current.model, "step": current.steps_done, "steps": current.steps_total}
        return JSONResponse({"status": "ok", "running": running, "waiting": worker.waiting(), "stats": dict(worker.stats)})

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": registry.describe()})

    async def generations(request: Request) -> Response:
        return await _answer(request, parse_request(await _read_json(request), "generations"), "image_generation")

    async def edits(request: Request) -> Response:
        values, (image, filename), mask = await _read_edit_form(request)
        parsed = parse_request(values, "edits")
        if parsed.size is None:
            width, height = size_for(image)
            parsed = replace(parsed, settings=replace(parsed.settings, width=width, height=height))
        paths = {"init_image": write_private_png(image, uploads)}
        labels = {"init_image": display_name(filename)}
        if mask is not None:  # inpainting: white = repaint
            paths["mask"], labels["mask"] = write_private_png(mask[0], uploads), display_name(mask[1])
        try:
            settings = replace(parsed.settings, **{k: str(v) for k, v in paths.items()})
            parsed = replace(parsed, settings=validated(settings))
            return await _answer(request, parsed, "image_edit", labels, list(paths.values()))
        except BaseException:
            for path in paths.values():
                path.unlink(missing_ok=True)
            raise

    async def _answer(request: Request, parsed: ImageRequest, event_prefix: str,
                      metadata: Optional[Dict[str, Any]] = None, temp_files: Optional[List[Path]] = None) -> Response:  # fmt: skip
        steps = parsed.settings.steps
        if steps is not None and steps > options.max_steps:
            raise RequestError(f"steps must be at most {options.max_steps} on this server (got {steps}; its --max-steps)",
                               param="steps", code="invalid_value")  # fmt: skip
        model = registry.resolve(parsed.model)
        pipe = registry.prepared(model)
        if pipe is not None:  # the model's own checks (size vs its position grid …) before queueing
            validated(parsed.settings, pipe.settings_with_defaults)
            check_lora_names(parsed.loras, pipe)
        loop = asyncio.get_running_loop()
        events: "asyncio.Queue[Event]" = asyncio.Queue()

        def emit(event: Event) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: the server is shutting down
                loop.call_soon_threadsafe(events.put_nowait, event)

        job = Job(model, parsed, emit, metadata=metadata or {}, temp_files=temp_files or [])
        worker.submit(job)
        if parsed.stream:
            return _JobStream(job, _events_as_sse(job, events, event_prefix))
        return await _collect(request, job, events)

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/images/generations", generations, methods=["POST"]),
        Route("/v1/images/edits", edits, methods=["POST"]),
    ]
    middleware = []
    if options.cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(options.cors_origins),
                                     allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"]))  # fmt: skip
    middleware.append(Middleware(BodyLimit, options=options))
    if options.api_key:
        middleware.append(Middleware(BearerAuth, api_key=options.api_key))
    app = Starlette(
        routes=routes, middleware=middleware, lifespan=lifespan,
        exception_handlers={RequestError: _refusal, HTTPException: _http_error, Exception: _crash},
    )  # fmt: skip
    app.state.worker = worker
    app.state.registry = registry
    app.state.uploads = uploads
    return app


# ---- answering ----------------------------------------------------------------------------
async def _collect(request: Request, job: Job, events: "asyncio.Queue[Event]") -> Response:
    """Wait for the job's images; a client that goes away cancels it."""
    gone = asyncio.ensure_future(_disconnected(request))
    images: List[dict] = []
    try:
        while True:
            get = asyncio.ensure_future(events.get())
            await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not get.done():
                get.cancel()
                job.cancel.set()
                return Response(status_code=499)  # nobody reads it: the client has left
            event = get.result()
            if event.kind == "image":
                images.append(event.data)
            elif event.kind == "done":
                return JSONResponse({
                    "created": int(time.time()), "output_format": "png",
                    "size": images[0]["size"] if images else None,
                    "data": [{"b64_json": i["b64_json"], "revised_prompt": None, "seed": i["seed"]} for i in images],
                })  # fmt: skip
            elif event.kind == "error":
                raise event.data
            elif event.kind == "cancelled":
                raise RequestError("the generation was cancelled (the server is shutting down)", status=503,
                                   type="server_error", code="cancelled")  # fmt: skip
    finally:
        gone.cancel()
        if job.status in ("queued", "running"):
            job.cancel.set()


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _JobStream(StreamingResponse):
    """The event stream of one job; however it ends (done, client gone before or while it
    streams), the job is cancelled if it still waits or runs."""

    def __init__(self, job: Job, content):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if self.job.status in ("queued", "running"):
                self.job.cancel.set()


def _sse(event: str, data: Dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


_NO_USAGE = {"input_tokens": 0, "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
             "output_tokens": 0, "total_tokens": 0}  # fmt: skip


async def _events_as_sse(job: Job, events: "asyncio.Queue[Event]", prefix: str):
    """OpenAI's image stream (`<prefix>.partial_image`, `<prefix>.completed`, one per image) plus
    `<prefix>.progress` after every step; `error` if it fails (_JobStream cancels a job left early)."""
    common = {"background": "opaque", "output_format": "png", "quality": "auto"}
    while True:
        event = await events.get()
        now = int(time.time())
        if event.kind == "progress":
            yield _sse(f"{prefix}.progress", {"type": f"{prefix}.progress", "created_at": now, **event.data})
        elif event.kind == "partial_image":
            yield _sse(f"{prefix}.partial_image", {"type": f"{prefix}.partial_image", "created_at": now, **common, **event.data})
        elif event.kind == "image":
            data = event.data
            yield _sse(f"{prefix}.completed", {
                "type": f"{prefix}.completed", "created_at": now, "size": data["size"], **common,
                "b64_json": data["b64_json"], "image_index": data["index"], "seed": data["seed"], "usage": _NO_USAGE,
            })  # fmt: skip
        elif event.kind in ("done", "error", "cancelled"):
            if event.kind != "done":
                error = event.data if event.kind == "error" else RequestError("the generation was cancelled", status=503)
                yield _sse("error", {"type": "error", **error.body()})
            return


# ---- refusals -----------------------------------------------------------------------------
async def _read_edit_form(request: Request):
    """OpenAI's multipart edit body → (form values, (image, file name), (mask, file name) or None)."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise RequestError("/v1/images/edits takes multipart/form-data (image, prompt, …), as OpenAI's does",
                           code="invalid_content_type")  # fmt: skip
    async with request.form(max_files=len(FILE_FIELDS), max_fields=64) as form:
        values: Dict[str, Any] = {}
        files: Dict[str, Any] = {}
        for name, value in form.multi_items():
            target = files if name in FILE_FIELDS else values
            if name in target:
                raise RequestError(f"{name} is given more than once", param=name, code="invalid_value")
            target[name] = value
        for name, value in values.items():
            if not isinstance(value, str):
                raise RequestError(f"{name} must be a form value, not a file", param=name, code="invalid_type")
        if "image" in files and "image[]" in files:
            raise RequestError("send one image (this server edits one picture per request)", param="image")
        upload = files.get("image", files.get("image[]"))
        if upload is None or isinstance(upload, str):
            raise RequestError("image is required: the picture to edit, as a file part", param="image",
                               code="missing_required_parameter")  # fmt: skip
        image = decode_upload(await upload.read(), "image")
        mask = files.get("mask")
        if mask is not None and isinstance(mask, str):
            raise RequestError("mask must be a file part (a PNG, white = repaint)", param="mask", code="invalid_type")
        if mask is not None:
            mask = (decode_upload(await mask.read(), "mask", mode="L"), mask.filename)
        return values, (image, upload.filename), mask


async def _read_json(request: Request) -> Dict[str, Any]:
    body = await request.body()
    try:
        data = json.loads(body, parse_constant=_not_json)
    except (ValueError, RecursionError) as e:
        raise RequestError(f"the body is not valid JSON ({e})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise RequestError(f"the body must be a JSON object (got a {type(data).__name__})", code="invalid_json")
    return data


def _not_json(constant: str):
    raise ValueError(f"{constant} is not a JSON number")


def _error_response(exc: RequestError) -> Response:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _refusal(request: Request, exc: RequestError) -> Response:
    return _error_response(exc)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return JSONResponse(RequestError(message, status=exc.status_code, code=code).body(), status_code=exc.status_code,
                        headers=getattr(exc, "headers", None))  # fmt: skip


async def _crash(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    error = server_error(f"unexpected server error: {type(exc).__name__}")
    return JSONResponse(error.body(), status_code=500)


class BodyLimit:
    """413 for a body over the limit: at once from Content-Length, else while it streams in."""

    def __init__(self, app, options: ServerOptions):
        self.app, self.options = app, options

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.options.max_upload_bytes if scope["path"] == "/v1/images/edits" else self.options.max_json_bytes
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await _error_response(BodyTooLarge(limit))(scope, receive, send)
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, limited, send)


class BearerAuth:
    """`Authorization: Bearer <key>` on every path but OPEN_PATHS (and CORS preflights)."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS and scope["method"] != "OPTIONS":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                error = RequestError("missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                                     status=401, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
                return await _error_response(error)(scope, receive, send)
        await self.app(scope, receive, send)

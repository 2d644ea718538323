"""python -m sd35_mlx.serve — parse the flags, prepare the models, listen (uvicorn)."""

from __future__ import annotations

import argparse
import importlib.util
import ipaddress
import logging
import os
import socket
import sys
from typing import Optional, Sequence

from ..errors import InputError, SD35Error
from ..components import DTYPES
from ..generate import _budget, resolve_budget

API_KEY_ENV = "SD35_API_KEY"
LOOPBACK = "127.0.0.1"
SERVE_MODULES = ("starlette", "uvicorn", "python_multipart")  # the `serve` extra


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sd35_mlx.serve",
        description="Serve SD3 / 3.5 models over HTTP with the OpenAI Images API "
        "(/v1/images/generations, /v1/images/edits, /v1/models, /health).",
        epilog="Binds 127.0.0.1 unless --host says otherwise; no CORS unless --cors is given. "
        "See docs/serving.md.",
    )
    m = p.add_argument_group("models")
    m.add_argument("--model", "-m", action="append", required=True, metavar="PATH_OR_REPO",
                   help="a model to serve (repeatable; the first is the default); its id is this text")  # fmt: skip
    m.add_argument("--allow-model", action="append", default=[], metavar="PATH_OR_REPO",
                   help="a model requests may name, prepared on its first request (repeatable)")  # fmt: skip
    m.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    m.add_argument("--quantize", help="quantize at load, e.g. 'transformer=4,t5=4' (every model)")
    m.add_argument("--no-t5", action="store_true", help="T5-drop mode for every model")
    m.add_argument("--tokenizers", help="repo id or folder with the tokenizer folders, for single-file models")
    m.add_argument("--no-warm-up", action="store_true",
                   help="do not run each model once (1 step, smallest size) when it is prepared; "
                        "its weights are then read during its first request")  # fmt: skip
    m.add_argument("--memory-budget", type=_budget, default="auto", metavar="GB",
                   help="GB the resident models may hold together (least recently used ones are released "
                        "beyond it); 'auto': what this machine can give; 'off': no limit. A number also "
                        "plans each model for it (quantization, T5 mode), as the CLI does")  # fmt: skip

    s = p.add_argument_group("server")
    s.add_argument("--host", default=LOOPBACK, help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port (0: any free one; the URL is printed)")
    s.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                   help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}, if set)")  # fmt: skip
    s.add_argument("--cors", action="append", default=[], metavar="ORIGIN",
                   help="allow browser requests from ORIGIN (repeatable; none by default)")  # fmt: skip
    s.add_argument("--queue-size", type=int, default=4, help="requests that may wait per model (beyond: 429)")
    s.add_argument("--max-steps", type=int, default=200, help="most denoising steps one request may ask for")
    s.add_argument("--max-upload-mb", type=float, default=20.0, help="largest /v1/images/edits body")
    s.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return p


def check(args: argparse.Namespace) -> None:
    """Refuse bad flags before any model loads."""
    if not 0 <= args.port <= 65535:
        raise InputError(f"--port must be between 0 and 65535 (got {args.port})")
    if args.queue_size < 0:
        raise InputError(f"--queue-size must be ≥ 0 (got {args.queue_size})")
    if args.max_steps < 1:
        raise InputError(f"--max-steps must be ≥ 1 (got {args.max_steps})")
    if not 0 < args.max_upload_mb <= 1024:
        raise InputError(f"--max-upload-mb must be in (0, 1024] (got {args.max_upload_mb})")
    if args.api_key is not None and not args.api_key.strip():
        raise InputError("--api-key is empty")
    if isinstance(args.memory_budget, float) and not args.memory_budget > 0:
        raise InputError(f"--memory-budget must be a positive number of GB, 'auto' or 'off' (got {args.memory_budget})")
    duplicates = {m for m in args.model + args.allow_model if (args.model + args.allow_model).count(m) > 1}
    if duplicates:
        raise InputError(f"a model is named twice: {', '.join(sorted(duplicates))}")


def budget_bytes(value) -> Optional[int]:
    """What the resident models may hold together: --memory-budget in bytes (None: no limit)."""
    if value == "off":
        return None
    if value == "auto":
        from ..memory import default_budget_bytes

        return default_budget_bytes()
    return int(value * 1e9)


def load_options(args: argparse.Namespace):
    """How every served model is loaded: kept loaded, otherwise as the CLI's flags say."""
    import mlx.core as mx

    from ..load_options import LoadOptions

    return LoadOptions(
        dtype=getattr(mx, args.dtype), t5=not args.no_t5, low_memory=False, quantize=args.quantize,
        tokenizers=args.tokenizers, memory_budget=resolve_budget(args.memory_budget, keep_loaded=True),
    )  # fmt: skip


def model_loader(args: argparse.Namespace):
    from ..pipeline import SD35Pipeline

    options = load_options(args)
    return lambda model: SD35Pipeline.from_pretrained(model, options)


def warm_up(pipe) -> None:
    """One step at the model's smallest size: every network is read (and kept: low_memory=False)."""
    side = pipe.variant.min_size
    pipe.generate("warm-up", width=side, height=side, steps=1, seed=0)


def bind(host: str, port: int) -> socket.socket:
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(128)  # connections wait in the backlog until the server accepts them
    return sock


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def build_app(args: argparse.Namespace):
    """Check the flags, prepare the models on a started worker, and return the ASGI app.
    Raises SD35Error for bad flags or models (before anything listens)."""
    from .app import ServerOptions, create_app
    from .models import ModelRegistry
    from .worker import Worker

    check(args)
    options = ServerOptions(api_key=args.api_key, cors_origins=tuple(args.cors), queue_size=args.queue_size,
                            max_steps=args.max_steps, max_upload_bytes=int(args.max_upload_mb * 2**20))  # fmt: skip
    registry = ModelRegistry(model_loader(args), args.model, args.allow_model, budget_bytes(args.memory_budget),
                             warm_up=None if args.no_warm_up else warm_up)  # fmt: skip
    worker = Worker(registry, queue_size=options.queue_size)
    worker.start()
    try:
        worker.call(registry.prepare_started)
    except BaseException:
        worker.stop()
        raise
    return create_app(registry, options, worker)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    missing = [m for m in SERVE_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        print(f"error: the server needs the 'serve' extra ({', '.join(missing)} missing): pip install -e \".[serve]\"",
              file=sys.stderr)  # fmt: skip
        return 2
    import uvicorn

    sock = None
    try:
        check(args)
        sock = bind(args.host, args.port)
        app = build_app(args)
    except SD35Error as e:
        if sock is not None:
            sock.close()
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not is_loopback(args.host) and not args.api_key:
        print(f"warning: listening on {args.host} without --api-key: anyone who can reach this port can use it",
              file=sys.stderr)  # fmt: skip
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"sd35_mlx server on http://{shown}:{port} (models: {', '.join(app.state.registry.ids())})", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5)).run(sockets=[sock])
    return 0

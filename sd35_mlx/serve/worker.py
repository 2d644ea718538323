"""One worker thread runs every generation, one at a time, from per-model bounded queues.

MLX runs one graph at a time on a device, so a second generation thread would only split the
device and double the memory; and MLX's streams belong to a thread (an array built lazily in one
thread cannot be evaluated in another), so the models are also built on this thread (`call`). Each model admits one running generation plus `queue_size`
waiting ones; beyond that `submit` refuses with `Busy` (HTTP 429 and a Retry-After estimated
from the model's recent generation times). A job's `cancel` event (set when its client
disconnects) stops it at the next denoising step through the pipeline's step callback; a
queued job that was cancelled is dropped without running.
"""

from __future__ import annotations

import base64
import logging
import math
import queue
import threading
import time
from concurrent.futures import Future
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from ..callbacks import GenerationInterrupted, StepInfo
from ..errors import SD35Error
from ..images import png_bytes
from .errors import Busy, RequestError, server_error
from .fields import ImageRequest, validated
from .models import ModelRegistry

log = logging.getLogger(__name__)


@dataclass
class Event:
    kind: str  # progress | partial_image | image | done | error | cancelled
    data: Any = None


TERMINAL = ("done", "error", "cancelled")


@dataclass
class Job:
    model: str
    request: ImageRequest
    emit: Callable[[Event], None]  # thread-safe: hands an event to the request's handler
    metadata: Dict[str, Any] = field(default_factory=dict)  # overrides of the PNG metadata
    temp_files: List[Path] = field(default_factory=list)  # removed when the job ends
    cancel: threading.Event = field(default_factory=threading.Event)
    steps_done: int = 0
    steps_total: int = 0
    status: str = "queued"  # queued | running | done | cancelled | failed


class Worker:
    def __init__(self, registry: ModelRegistry, queue_size: int = 4):
        self.registry = registry
        self.queue_size = queue_size
        self._jobs: "queue.Queue[Any]" = queue.Queue()  # Job, (fn, Future) or None (stop)
        self._lock = threading.Lock()
        self._pending: Counter = Counter()  # per model: running + queued
        self._seconds: Dict[str, float] = {}  # per model: recent seconds per job (moving average)
        self.stats = Counter(served=0, images=0, cancelled=0, failed=0, refused=0)
        self.current: Optional[Job] = None
        self.history: deque = deque(maxlen=100)  # finished jobs, newest last (tests, /health)
        self._thread: Optional[threading.Thread] = None

    # ---- lifecycle ----
    @property
    def started(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="sd35-serve-worker", daemon=True)
        self._thread.start()

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the worker thread (after what is queued) and return its result."""
        done: Future = Future()
        self._jobs.put((fn, done))
        return done.result()

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel what runs and what waits, then end the thread (bounded wait)."""
        with self._lock:
            if self.current is not None:
                self.current.cancel.set()
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if isinstance(job, Job):
                job.cancel.set()
                self._finish(job, "cancelled", Event("cancelled"))
        self._jobs.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- admission ----
    def submit(self, job: Job) -> None:
        with self._lock:
            waiting = self._pending[job.model]
            if waiting >= 1 + self.queue_size:
                self.stats["refused"] += 1
                raise Busy(job.model, waiting, self.retry_after(job.model, waiting))
            self._pending[job.model] += 1
        self._jobs.put(job)

    def retry_after(self, model: str, ahead: int) -> int:
        return max(1, math.ceil(self._seconds.get(model, 1.0) * ahead))

    def waiting(self) -> Dict[str, int]:
        with self._lock:
            return {m: n for m, n in self._pending.items() if n}

    # ---- the thread ----
    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if isinstance(job, tuple):  # call(fn)
                fn, done = job
                try:
                    done.set_result(fn())
                except BaseException as e:  # noqa: BLE001 — handed to the caller
                    done.set_exception(e)
                continue
            if job.cancel.is_set():
                self._finish(job, "cancelled", Event("cancelled"))
                continue
            with self._lock:
                self.current = job
            t0 = time.monotonic()
            status, event = self._run(job)
            seconds = time.monotonic() - t0
            if status == "done":
                previous = self._seconds.get(job.model)
                self._seconds[job.model] = seconds if previous is None else 0.7 * previous + 0.3 * seconds
            with self._lock:
                self.current = None
            self._finish(job, status, event)

    def _finish(self, job: Job, status: str, event: Event) -> None:
        job.status = status
        for path in job.temp_files:
            path.unlink(missing_ok=True)
        with self._lock:
            self._pending[job.model] -= 1
            self.stats[{"done": "served", "cancelled": "cancelled"}.get(status, "failed")] += 1
            self.history.append(job)
        job.emit(event)

    def _run(self, job: Job):
        job.status = "running"
        registry = self.registry
        try:
            pipe = registry.prepare(job.model)
            settings = validated(job.request.settings, pipe.settings_with_defaults).with_seed()
        except RequestError as e:
            return "failed", Event("error", e)
        except SD35Error as e:
            return "failed", Event("error", RequestError(str(e)))
        except Exception as e:  # a model that cannot be prepared: the server stays up
            log.exception("preparing %s failed", job.model)
            return "failed", Event("error", server_error(f"the model could not be prepared: {e}"))
        n = job.request.n
        job.steps_total = n * settings.steps
        active_before = registry.before_run(job.model)
        try:
            for index in range(n):
                if job.cancel.is_set():
                    raise GenerationInterrupted("cancelled before it started")
                one = validated(replace(settings, seed=settings.seed + index))
                result = pipe.generate(settings=one, callback=self._callback(job, pipe, index, one.steps))
                metadata = {**result.metadata, **job.metadata}
                job.emit(Event("image", {
                    "index": index, "seed": result.seed, "size": f"{result.image.width}x{result.image.height}",
                    "b64_json": base64.b64encode(png_bytes(result.image, metadata)).decode("ascii"),
                }))  # fmt: skip
                self.stats["images"] += 1
            return "done", Event("done")
        except GenerationInterrupted:
            return "cancelled", Event("cancelled")
        except RequestError as e:
            return "failed", Event("error", e)
        except SD35Error as e:
            return "failed", Event("error", RequestError(str(e)))
        except Exception as e:  # noqa: BLE001 — one failed generation must not take the server down
            log.exception("generation failed on %s", job.model)
            return "failed", Event("error", server_error(f"the generation failed: {type(e).__name__}: {e}"))
        finally:
            registry.after_run(job.model, active_before)

    def _callback(self, job: Job, pipe, index: int, steps: int):
        """Progress to the client, evenly spaced previews, and the stop check, after every step."""
        previews = _preview_steps(steps, job.request.partial_images) if job.request.stream else {}

        def on_step(info: StepInfo) -> bool:
            job.steps_done = index * steps + info.step
            job.emit(Event("progress", {"image_index": index, "step": info.step, "steps": info.total}))
            if info.step in previews:
                preview = pipe.preview(info.latents)
                job.emit(Event("partial_image", {
                    "image_index": index, "partial_image_index": previews[info.step],
                    "size": f"{preview.width}x{preview.height}",
                    "b64_json": base64.b64encode(png_bytes(preview)).decode("ascii"),
                }))  # fmt: skip
            return not job.cancel.is_set()

        return on_step


def _preview_steps(steps: int, count: int) -> Dict[int, int]:
    """{step: partial_image_index} for `count` previews spread over the steps (never the last)."""
    if count <= 0 or steps < 2:
        return {}
    chosen = sorted({max(1, round(steps * (k + 1) / (count + 1))) for k in range(count)} - {steps})
    return {step: i for i, step in enumerate(chosen)}

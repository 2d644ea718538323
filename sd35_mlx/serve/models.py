"""The models a server serves: which a request may name, and which stay in memory.

Models named with `--model` are prepared at start-up; `--allow-model` ones are prepared on their
first request. A request can name no other model (nothing is downloaded on a request's say-so).
Preparing builds the pipeline and, with a `warm_up`, runs it once (one step at its smallest
size), so its weights are read and checked before the first request, not during it.

Every pipeline keeps its networks loaded between requests (`low_memory=False`), as long as the
models together fit the memory budget: what a model holds is measured after its first
generation (MLX's active memory before and after); when the models held exceed the budget, or
the next model to run would not fit beside the others, the least recently used ones are
released (`SD35Pipeline.release`) and reload from disk on their next request. Only the worker thread runs pipelines, so releasing
never races a generation.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

from .errors import RequestError

log = logging.getLogger(__name__)


@dataclass
class ServedModel:
    id: str
    created: int = field(default_factory=lambda: int(time.time()))
    pipeline: Optional[object] = None  # SD35Pipeline, once prepared
    resident_bytes: Optional[int] = None  # measured after its first generation
    resident: bool = False  # networks are in memory now
    last_used: float = 0.0


class ModelRegistry:
    def __init__(
        self,
        load: Callable[[str], object],
        started: Sequence[str],
        allowed: Sequence[str] = (),
        budget_bytes: Optional[int] = None,
        active_bytes: Optional[Callable[[], int]] = None,
        warm_up: Optional[Callable[[object], None]] = None,
    ):
        if not started:
            raise ValueError("a server needs at least one --model")
        self._load = load
        self.models: Dict[str, ServedModel] = {m: ServedModel(m) for m in list(started) + list(allowed)}
        self.default = started[0]
        self.budget_bytes = budget_bytes
        self._active_bytes = active_bytes or _mlx_active_bytes
        self._warm_up = warm_up
        self.started = list(started)
        self._lock = threading.Lock()

    def prepare_started(self) -> None:
        """Prepare every --model (on the worker thread: see worker.py)."""
        for m in self.started:
            self.prepare(m)

    def ids(self) -> List[str]:
        return list(self.models)

    def resolve(self, requested: Optional[str]) -> str:
        """The id a request names (default: the first --model); 404 for any other."""
        if requested is None:
            return self.default
        if requested not in self.models:
            raise RequestError(
                f"the model {requested!r} is not served here; GET /v1/models lists those that are",
                status=404, param="model", code="model_not_found",
            )  # fmt: skip
        return requested

    def prepared(self, model_id: str):
        """The pipeline if it has been prepared (for checks before queueing), else None."""
        return self.models[model_id].pipeline

    def prepare(self, model_id: str):
        with self._lock:
            entry = self.models[model_id]
            if entry.pipeline is None:
                log.info("preparing model %s", model_id)
                pipeline = self._load(model_id)
                if self._warm_up is not None:
                    before = self.before_run(model_id)
                    self._warm_up(pipeline)
                    self.after_run(model_id, before)
                entry.pipeline = pipeline
            return entry.pipeline

    # ---- residency, called by the worker thread around each generation ----
    def before_run(self, model_id: str) -> int:
        """Make room for `model_id` (when its size is known) within the budget; the active bytes now."""
        entry = self.models[model_id]
        if not entry.resident:
            self._release_until_within(entry, need=entry.resident_bytes or 0)
        return self._active_bytes()

    def after_run(self, model_id: str, active_before: int) -> None:
        entry = self.models[model_id]
        if not entry.resident:  # its networks were loaded by this run: what they hold
            entry.resident_bytes = max(0, self._active_bytes() - active_before)
            entry.resident = True
        entry.last_used = time.monotonic()
        self._release_until_within(entry, need=0)  # a first run may have measured more than fits

    def _release_until_within(self, keep: ServedModel, need: int) -> None:
        if self.budget_bytes is None:
            return
        others = sorted((m for m in self.models.values() if m.resident and m is not keep), key=lambda m: m.last_used)
        held = sum(m.resident_bytes or 0 for m in self.models.values() if m.resident) + need
        for victim in others:
            if held <= self.budget_bytes:
                break
            log.info("releasing model %s (%.2f GB) to stay within the memory budget", victim.id, (victim.resident_bytes or 0) / 1e9)
            victim.pipeline.release()
            victim.resident = False
            held -= victim.resident_bytes or 0

    def describe(self) -> List[dict]:
        return [
            {"id": m.id, "object": "model", "created": m.created, "owned_by": "sd35_mlx",
             "prepared": m.pipeline is not None, "resident": m.resident}
            for m in self.models.values()
        ]  # fmt: skip


def _mlx_active_bytes() -> int:
    import mlx.core as mx

    return mx.get_active_memory()

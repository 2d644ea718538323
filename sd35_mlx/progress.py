"""CLI progress for one image: every stage (encode, denoise, decode), as a live bar on a
terminal and as plain lines otherwise (logs, pipes, CI)."""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO

import mlx.core as mx

from .callbacks import StepInfo


def peak_memory_gb() -> float:
    return mx.get_peak_memory() / 1e9


class Progress:
    """A `StepCallback` that also announces the stages around the steps."""

    def __init__(self, job=None, label: str = "", width: int = 30, stream: Optional[TextIO] = None):
        self.label, self.width = label, width
        self.stream = stream if stream is not None else sys.stderr
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = time.perf_counter()
        self._last_line_step = 0
        self._write(f"{label}: encoding the prompt…")

    def _write(self, line: str) -> None:
        self.stream.write(f"\r\x1b[K{line}" if self.live else line + "\n")
        self.stream.flush()

    def __call__(self, info: StepInfo) -> None:
        if info.step == 1:
            self.start = time.perf_counter()  # the rate is the denoiser's, not the encoders'
        elapsed = time.perf_counter() - self.start
        rate = elapsed / info.step
        tail = f"{info.step}/{info.total} {rate:.2f} s/step, eta {rate * (info.total - info.step):.0f} s, peak {peak_memory_gb():.2f} GB"
        if self.live:
            done = int(self.width * info.step / info.total)
            self._write(f"{self.label} |{'█' * done}{' ' * (self.width - done)}| {tail}")
        elif info.step == info.total or info.step == 1 or info.step - self._last_line_step >= max(1, info.total // 10):
            self._last_line_step = info.step
            self._write(f"{self.label}: denoising {tail}")
        if info.step == info.total:
            self._write(f"{self.label}: decoding…")

    def close(self) -> None:
        if self.live:
            self.stream.write("\n")
            self.stream.flush()

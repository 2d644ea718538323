"""A dependency-free progress bar for the CLI (a `StepCallback`)."""

from __future__ import annotations

import sys
import time
from typing import Optional

import mlx.core as mx

from .callbacks import StepInfo


def peak_memory_gb() -> float:
    return mx.get_peak_memory() / 1e9


class ProgressBar:
    def __init__(self, total: Optional[int], label: str = "", width: int = 30, stream=None):
        # sys.stderr looked up now, not at import: it may have been replaced since (tests, apps)
        self.total, self.label, self.width, self.stream = total, label, width, stream or sys.stderr
        self.start = time.perf_counter()

    def __call__(self, info: StepInfo) -> None:
        total = info.total
        done = int(self.width * info.step / total)
        elapsed = time.perf_counter() - self.start
        rate = elapsed / info.step
        self.stream.write(
            f"\r{self.label} |{'█' * done}{' ' * (self.width - done)}| {info.step}/{total} "
            f"{rate:.2f} s/step, eta {rate * (total - info.step):.0f} s, peak {peak_memory_gb():.2f} GB"
        )
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()

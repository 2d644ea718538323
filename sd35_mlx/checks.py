"""Checks for values that come from outside (flags, the Python API, PNG metadata, files).

Each check returns the value as its proper type or raises `InputError` naming the field.
The limits bound the work one request can ask for, so that no input (a typo, a hostile PNG)
can make the program exhaust the machine; they are far above what any real use needs.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Optional

from .errors import InputError

# The schedule interpolates 1000 training timesteps: more steps than that repeat them.
MAX_STEPS = 1000
# Twice the largest position grid of the published models (3.5 Medium: 384 patches · 16 px);
# the model's own grid (read from its config before loading) is checked later, and tighter.
MAX_SIDE = 12288
# Images one run may queue (prompts × seeds × images per seed).
MAX_IMAGES = 10_000
# CLIP reads 77 tokens and T5 at most 512 (a few thousand characters): longer text is a mistake.
MAX_PROMPT_CHARS = 20_000
# Prompt files are small text files; a large one is almost certainly the wrong file.
MAX_PROMPT_FILE_BYTES = 16 * 2**20


def whole_number(name: str, value, low: int, high: Optional[int] = None) -> int:
    """An int (not a bool, not a float) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise InputError(f"{name} must be a whole number (got {value!r})")
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"≥ {low}"
        raise InputError(f"{name} must be {bound} (got {value})")
    return int(value)


def finite_number(
    name: str, value, low: Optional[float] = None, high: Optional[float] = None, *, low_open: bool = False
) -> float:
    """A finite real number (NaN and ±inf refused) in [low, high] ((low, high] when low_open)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise InputError(f"{name} must be a number (got {value!r})")
    value = float(value)
    if not math.isfinite(value):
        raise InputError(f"{name} must be a finite number (got {value})")
    too_low = low is not None and (value <= low if low_open else value < low)
    if too_low or (high is not None and value > high):
        left = "(" if low_open else "["
        raise InputError(f"{name} must be in {left}{low if low is not None else '-inf'}, {high if high is not None else 'inf'}] (got {value:g})")
    return value


def text(name: str, value, max_chars: int = MAX_PROMPT_CHARS) -> str:
    if not isinstance(value, str):
        raise InputError(f"{name} must be text (got {type(value).__name__} {value!r:.60})")
    if len(value) > max_chars:
        raise InputError(f"{name} is {len(value):,} characters long; at most {max_chars:,} are accepted")
    return value


def positive_gb(name: str, value) -> float:
    """A memory or size figure in GB: finite and > 0."""
    return finite_number(name, value, 0.0, 1e6, low_open=True)

"""SD3 conditioning: the MMDiT's text context and pooled vector, assembled from the three encoders.

docs/text.md, "What SD3 takes from each encoder" (same in SAI `get_cond` and diffusers `encode_prompt`):
    context = concat_seq( pad_features(concat_feat(L_hidden, G_hidden), joint_dim), T5_hidden )
    pooled  = concat_feat(L_pooled, G_pooled)
CLIP tokens come first (77), T5 tokens after. Dropping T5 appends *zeros* of the T5 length:
zero tokens are not inert (`context_embedder(0) = bias`), so 77 vs 256 zeros change the image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx

from .errors import InputError

JOINT_DIM = 4096  # T5-XXL d_model = MMDiT joint_attention_dim
DEFAULT_T5_LENGTH = 256  # diffusers' max_sequence_length
_FORMAT = "sd35_mlx.conditioning"


@dataclass
class Conditioning:
    """What the MMDiT reads from the prompt: context (B, 77+T, joint_dim) and pooled (B, 2048)."""

    context: mx.array
    pooled: mx.array
    metadata: dict[str, str] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.context.ndim != 3 or self.pooled.ndim != 2:
            raise InputError(
                "Conditioning needs context (B, L, D) and pooled (B, P); "
                f"got {self.context.shape} and {self.pooled.shape}."
            )
        if self.context.shape[0] != self.pooled.shape[0]:
            raise InputError(
                f"Conditioning batch sizes differ: context {self.context.shape[0]}, pooled {self.pooled.shape[0]}."
            )

    @property
    def batch_size(self) -> int:
        return self.context.shape[0]

    def __len__(self) -> int:
        return self.batch_size

    def __getitem__(self, index: int | slice) -> Conditioning:
        """Select prompts along the batch axis (an int keeps the batch axis)."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return Conditioning(self.context[index], self.pooled[index], dict(self.metadata))

    @staticmethod
    def concat(items: Sequence[Conditioning]) -> Conditioning:
        """Stack along the batch axis in the given order; for CFG use `concat([negative, positive])`
        (diffusers' order: the first half of the model output is the unconditional prediction)."""
        items = list(items)
        if not items:
            raise InputError("Conditioning.concat needs at least one item.")
        shapes = {(c.context.shape[1:], c.pooled.shape[1:]) for c in items}
        if len(shapes) > 1:
            raise InputError(
                "Cannot batch conditionings of different shapes (was T5 length or T5-drop the same for all?): "
                + ", ".join(f"context {c.context.shape}, pooled {c.pooled.shape}" for c in items)
            )
        return Conditioning(
            mx.concatenate([c.context for c in items], axis=0),
            mx.concatenate([c.pooled for c in items], axis=0),
            dict(items[0].metadata),
        )

    def repeat(self, n: int) -> Conditioning:
        """Each prompt n times in a row (p0, p0, p1, p1, …), as diffusers' num_images_per_prompt."""
        return Conditioning(mx.repeat(self.context, n, axis=0), mx.repeat(self.pooled, n, axis=0), dict(self.metadata))

    def astype(self, dtype: mx.Dtype) -> Conditioning:
        return Conditioning(self.context.astype(dtype), self.pooled.astype(dtype), dict(self.metadata))

    def save(self, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
        """Write a .safetensors file (keys `context`, `pooled`) so an encoded prompt can be reused."""
        path = Path(path)
        if path.suffix != ".safetensors":
            path = path.with_name(path.name + ".safetensors")
        meta = {**self.metadata, **(metadata or {}), "format": _FORMAT}
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise InputError("Conditioning metadata keys and values must be strings.")
        mx.save_safetensors(str(path), {"context": self.context, "pooled": self.pooled}, metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Conditioning:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"Conditioning file not found: {path}")
        try:
            arrays, meta = mx.load(str(path), return_metadata=True)
        except Exception as e:  # mlx raises plain ValueError/RuntimeError for unreadable files
            raise InputError(f"Cannot read conditioning file {path}: {e}") from e
        if not isinstance(arrays, dict) or not {"context", "pooled"} <= arrays.keys():
            raise InputError(f"{path} is not a saved Conditioning (needs tensors 'context' and 'pooled').")
        return cls(arrays["context"], arrays["pooled"], {k: v for k, v in meta.items() if k != "format"})


def _hidden_and_pooled(output: Any, name: str) -> tuple[mx.array, mx.array]:
    """Accept a CLIP encoder output with `.hidden`/`.pooled` or a (hidden, pooled) pair."""
    if hasattr(output, "hidden") and hasattr(output, "pooled"):
        hidden, pooled = output.hidden, output.pooled
    elif isinstance(output, (tuple, list)) and len(output) == 2:
        hidden, pooled = output
    else:
        raise InputError(f"{name} output must have .hidden and .pooled (or be a (hidden, pooled) pair).")
    if hidden.ndim != 3 or pooled.ndim != 2 or hidden.shape[0] != pooled.shape[0]:
        raise InputError(f"{name}: expected hidden (B, L, D) and pooled (B, P); got {hidden.shape}, {pooled.shape}.")
    return hidden, pooled


def assemble(
    clip_l: Any,
    clip_g: Any,
    t5_hidden: mx.array | None,
    t5_length: int | None = None,
    joint_dim: int | None = None,
) -> Conditioning:
    """Build the MMDiT conditioning from the encoder outputs (docs/text.md).

    clip_l / clip_g: penultimate hidden (B, 77, 768 / 1280) and pooled (B, 768 / 1280).
    t5_hidden: (B, T, joint_dim), or None to drop T5: then `t5_length` zero tokens
    (default 256, diffusers; SAI-ecosystem tools use 77) are appended in its place.
    joint_dim: feature width of the context (4096); taken from t5_hidden when given.
    """
    l_hidden, l_pooled = _hidden_and_pooled(clip_l, "CLIP-L")
    g_hidden, g_pooled = _hidden_and_pooled(clip_g, "CLIP-G")
    batch, clip_len = l_hidden.shape[:2]
    if g_hidden.shape[:2] != (batch, clip_len):
        raise InputError(
            f"CLIP-L and CLIP-G hidden states disagree in batch/length: {l_hidden.shape} vs {g_hidden.shape}."
        )

    if t5_hidden is not None:
        if t5_hidden.ndim != 3 or t5_hidden.shape[0] != batch:
            raise InputError(f"T5 hidden must be (B={batch}, T, D); got {t5_hidden.shape}.")
        if t5_length is not None and t5_hidden.shape[1] != t5_length:
            raise InputError(f"T5 hidden has {t5_hidden.shape[1]} tokens but t5_length is {t5_length}.")
        if joint_dim is not None and t5_hidden.shape[2] != joint_dim:
            raise InputError(f"T5 hidden has width {t5_hidden.shape[2]} but joint_dim is {joint_dim}.")
        joint_dim = t5_hidden.shape[2]
    else:
        joint_dim = JOINT_DIM if joint_dim is None else joint_dim
        t5_length = DEFAULT_T5_LENGTH if t5_length is None else t5_length
        if t5_length < 1:
            raise InputError(f"t5_length must be positive when T5 is dropped, got {t5_length}.")

    clip_width = l_hidden.shape[2] + g_hidden.shape[2]
    if clip_width > joint_dim:
        raise InputError(f"CLIP-L + CLIP-G width {clip_width} exceeds the context width {joint_dim}.")
    dtype = mx.result_type(l_hidden, g_hidden, *(() if t5_hidden is None else (t5_hidden,)))
    if t5_hidden is None:
        t5_hidden = mx.zeros((batch, t5_length, joint_dim), dtype=dtype)  # drop T5: zeros, still appended

    parts = [l_hidden.astype(dtype), g_hidden.astype(dtype)]
    if clip_width < joint_dim:
        parts.append(mx.zeros((batch, clip_len, joint_dim - clip_width), dtype=dtype))
    clip_context = mx.concatenate(parts, axis=-1)
    context = mx.concatenate([clip_context, t5_hidden.astype(dtype)], axis=1)
    pooled_dtype = mx.result_type(l_pooled, g_pooled)
    pooled = mx.concatenate([l_pooled.astype(pooled_dtype), g_pooled.astype(pooled_dtype)], axis=-1)
    return Conditioning(context, pooled)

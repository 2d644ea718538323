"""Random LoRAs in the formats people download, and the reference merge they must equal.

`random_lora(state, stems, key_of, ...)` draws one factor pair per module of a torch state dict
(ranks alternating 4 / 16, alpha ≠ rank) and returns the LoRA tensors under the format's key
names together with the independently merged state `W + w · alpha/r · up @ down` (torch, fp32).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Dict, Iterable, Mapping, Optional, Sequence, Tuple

import torch

from reference import save_state_dict

KOHYA = ("lora_down.weight", "lora_up.weight")
PEFT = ("lora_A.weight", "lora_B.weight")


def alpha_for(rank: int) -> float:
    return 0.75 * rank + 1.0  # never equal to the rank


def random_lora(
    state: Mapping[str, torch.Tensor],
    stems: Iterable[str],
    key_of: Callable[[str], str],
    *,
    weight: float = 1.0,
    suffixes: Tuple[str, str] = KOHYA,
    with_alpha: bool = True,
    ranks: Sequence[int] = (4, 16),
    gain: float = 0.5,
    seed: int = 0,
) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """(LoRA tensors, merged copy of `state`) for the modules `stems` (names without `.weight`)."""
    g = torch.Generator().manual_seed(seed)
    lora: Dict[str, torch.Tensor] = {}
    merged = dict(state)
    for i, stem in enumerate(stems):
        w = state[stem + ".weight"]
        r = ranks[i % len(ranks)]
        out, fan_in = w.shape[0], math.prod(w.shape[1:])
        down = torch.randn(r, *w.shape[1:], generator=g) / math.sqrt(fan_in)
        up = torch.randn(out, r, *([1, 1] if w.ndim == 4 else []), generator=g) * gain / math.sqrt(r)
        alpha = alpha_for(r) if with_alpha else float(r)
        key = key_of(stem)
        lora[f"{key}.{suffixes[0]}"], lora[f"{key}.{suffixes[1]}"] = down, up
        if with_alpha:
            lora[f"{key}.alpha"] = torch.tensor(alpha)
        delta = (up.reshape(out, r) @ down.reshape(r, -1)).reshape(w.shape)
        merged[stem + ".weight"] = (w.float() + weight * alpha / r * delta).to(w.dtype)
    return lora, merged


def linear_stems(state: Mapping[str, torch.Tensor], skip: Sequence[str] = ()) -> list:
    """Every 2-D (and conv) weight's module name, embeddings and listed names left out."""
    return sorted(
        k[: -len(".weight")] for k, v in state.items()
        if k.endswith(".weight") and v.ndim in (2, 4) and not any(e in k for e in ("embedding", "shared", "embed_tokens"))
        and not any(s in k for s in skip)
    )  # fmt: skip


def kohya_key(prefix: str) -> Callable[[str], str]:
    return lambda stem: prefix + stem.replace(".", "_")


def dotted_key(prefix: str) -> Callable[[str], str]:
    return lambda stem: prefix + stem


def save(tensors: Mapping[str, torch.Tensor], path: Path, metadata: Optional[Dict[str, str]] = None) -> Path:
    if metadata is None:
        return save_state_dict(tensors, path)
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path

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


# ---- diffusers / PEFT LoRAs, written by diffusers itself ----
TRANSFORMER_TARGETS = [
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "net.0.proj", "net.2", "norm1.linear", "norm1_context.linear", "norm_out.linear", "proj_out",
    "context_embedder", "linear_1", "linear_2",
]  # every Linear kind of SD3Transformer2DModel (incl. attn2 through to_q…, the embedders, both swapped modulations)
CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


@torch.no_grad()
def _randomize_lora(model: torch.nn.Module, adapter: str, seed: int, gain: float = 0.5) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if f".{adapter}." in name + "." and ("lora_A" in name or "lora_B" in name):
            fan = p.shape[1] if p.ndim > 1 else 1
            p.copy_(torch.randn(p.shape, generator=g) * (gain if "lora_B" in name else 1.0) / math.sqrt(fan))


def write_peft_lora(pipe, path: Path, *, rank: int, alpha: float, seed: int, adapter: str = "writer") -> Path:
    """Add a PEFT LoRA (transformer + both CLIPs) to the torch pipeline, randomise it, save it with
    `StableDiffusion3Pipeline.save_lora_weights` (LoraConfig in the header), then remove it again."""
    from diffusers import StableDiffusion3Pipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    layers, metadata = {}, {}
    for i, (component, targets) in enumerate(
        (("transformer", TRANSFORMER_TARGETS), ("text_encoder", CLIP_TARGETS), ("text_encoder_2", CLIP_TARGETS))
    ):
        model = getattr(pipe, component)
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
        model.add_adapter(config, adapter_name=adapter)
        _randomize_lora(model, adapter, seed * 10 + i)
        layers[component] = get_peft_model_state_dict(model, adapter_name=adapter)
        metadata[component] = config.to_dict()
        model.delete_adapters([adapter]) if hasattr(model, "delete_adapters") else model.delete_adapter(adapter)
    StableDiffusion3Pipeline.save_lora_weights(
        str(path.parent), weight_name=path.name,
        transformer_lora_layers=layers["transformer"], text_encoder_lora_layers=layers["text_encoder"],
        text_encoder_2_lora_layers=layers["text_encoder_2"],
        transformer_lora_adapter_metadata=metadata["transformer"],
        text_encoder_lora_adapter_metadata=metadata["text_encoder"],
        text_encoder_2_lora_adapter_metadata=metadata["text_encoder_2"],
    )  # fmt: skip
    return path

"""Test helpers for ControlNets: Stability's single-file layout made from a diffusers model."""

from __future__ import annotations

from typing import Dict

import torch

SHARED_PREFIXES = ("controlnet_blocks.", "pos_embed_input.", "time_text_embed.")
_SAI_NAMES = {"attn.proj": "attn.to_out.0", "mlp.fc1": "ff.net.0.proj", "mlp.fc2": "ff.net.2",
              "adaLN_modulation.1": "norm1.linear"}  # fmt: skip


def stability_state(diffusers_state: Dict[str, torch.Tensor], depth: int, control_type: int = 1) -> Dict[str, torch.Tensor]:
    """The Stability-layout state dict whose diffusers conversion (scripts/convert_sd3_controlnet_
    to_diffusers.py) is `diffusers_state` (an image-only SD3ControlNetModel's), plus its type tag."""
    sd = diffusers_state
    out = {k: v for k, v in sd.items() if k.startswith(SHARED_PREFIXES)}
    for i in range(depth):
        b = f"transformer_blocks.{i}."
        for s in ("weight", "bias"):
            out[f"{b}attn.qkv.{s}"] = torch.cat([sd[f"{b}attn.to_{x}.{s}"] for x in "qkv"])
            for sai, diffusers in _SAI_NAMES.items():
                out[f"{b}{sai}.{s}"] = sd[f"{b}{diffusers}.{s}"]
    out["control_type"] = torch.tensor([control_type], dtype=torch.int32)
    return out

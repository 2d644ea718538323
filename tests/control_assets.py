"""Test helpers for ControlNets: Stability's single-file layout made from a diffusers model."""

from __future__ import annotations

from pathlib import Path
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


def write_photo(path: Path, side: int = 80) -> None:
    """A small RGB picture with clear edges (a disc and a block), for canny and inpainting."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:80, 0:80]
    arr = np.zeros((80, 80, 3), np.uint8)
    arr[(x - 40) ** 2 + (y - 40) ** 2 < 500] = (230, 200, 40)
    arr[10:30, 50:75] = (20, 90, 200)
    Image.fromarray(arr).resize((side, side), Image.NEAREST).save(path)


def write_mask(path: Path, side: int = 80) -> None:
    """A mask with a white (repaint) square in the middle."""
    from PIL import Image

    mask = Image.new("L", (80, 80), 0)
    mask.paste(255, (20, 20, 60, 60))
    mask.resize((side, side), Image.NEAREST).save(path)


def tiny_stability_controlnet(path: Path) -> Path:
    """A random one-block ControlNet in Stability's single-file layout (image-only blocks) that
    fits tests/tiny_model.py's transformer."""
    from diffusers import SD3ControlNetModel
    from reference import randomize, save_state_dict

    net = randomize(SD3ControlNetModel(patch_size=2, in_channels=16, num_layers=1, attention_head_dim=8,
                                       num_attention_heads=4, joint_attention_dim=None, caption_projection_dim=40,
                                       pooled_projection_dim=40, out_channels=16, pos_embed_max_size=None,
                                       pos_embed_type=None, use_pos_embed=False), seed=3)  # fmt: skip
    return save_state_dict(stability_state(net.state_dict(), depth=1, control_type=1), path)

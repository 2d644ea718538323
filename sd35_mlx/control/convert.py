"""Converting a ControlNet to its own sd35_mlx folder (optionally quantized).

    python -m sd35_mlx.convert --controlnet sd3.5_large_controlnet_canny.safetensors \\
        --quantize controlnet=4 --mlx-path sd35l-canny-4bit

    out/config.json   {"format": "sd35_mlx", "kind": "controlnet", "components": {"controlnet": {
                         "class": "ControlNet", "config": {...}, "quantization": {...} | null,
                         "control": {"rule", "zero_pooled", "latent_shift", "control_type"},
                         "files": ["controlnet.safetensors"], ...}}}
    out/controlnet.safetensors  (our parameter names; as written for the other networks)

The conventions the checkpoint was recognised with (residual rule, pooled input, latent
shift, type) are stored beside the weights, so the converted folder runs as the original.
Written atomically like every converted folder (weights/converted.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from mlx.utils import tree_flatten

from .._version import __version__
from ..components import dtype_name, parse_dtype
from ..errors import InputError
from ..quantize import parse_value, quantize_network
from ..weights.converted import (
    CONFIG_FILE, DEFAULT_MAX_SHARD_BYTES, FORMAT, FORMAT_VERSION, atomic_folder, float_dtype, logical_parameters,
    stored_bytes, write_network,
)  # fmt: skip
from .spec import COMPONENT, open_controlnet, spec_options


def parse_controlnet_quantize(text: Optional[str]):
    """'controlnet=4' (or just '4', '8:32', 'mxfp4', 'none') -> QuantSpec or None."""
    if not text:
        return None
    name, sep, value = text.strip().partition("=")
    if not sep:
        name, value = COMPONENT, name
    if name.strip() != COMPONENT or "," in value:
        raise InputError(f"a ControlNet conversion takes one quantization, e.g. --quantize controlnet=4 (got {text!r})")
    return parse_value(COMPONENT, value)


def convert_controlnet(
    source: str | os.PathLike,
    target: str | os.PathLike,
    *,
    dtype: str = "bfloat16",
    quantize: Optional[str] = None,
    force: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    spec_q = parse_controlnet_quantize(quantize)
    spec = open_controlnet(source)  # recognised and checked before anything is written
    model = spec.load(dtype=parse_dtype(dtype))
    quantize_network(model, spec_q, COMPONENT)
    with atomic_folder(target, force=force) as tmp:
        entry = {
            "class": type(model).__name__,
            "config": model.config.to_dict(),
            "options": {},
            "dtype": dtype_name(float_dtype(model)),
            "quantization": spec_q.to_dict() if spec_q else None,
            "parameters": logical_parameters(model),
            "bytes": stored_bytes(model),
            "control": spec_options(spec),
        }
        items = tree_flatten(model.parameters())
        del model
        entry["files"] = write_network(tmp, COMPONENT, items, spec_q, max_shard_bytes)
        config = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "sd35_mlx_version": __version__,
            "kind": COMPONENT, "dtype": dtype, "components": {COMPONENT: entry},
            "source": {"controlnet": str(source), "layout": spec.layout, "base": spec.base},
        }  # fmt: skip
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return Path(target).expanduser()

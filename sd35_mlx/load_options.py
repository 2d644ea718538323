"""How a model is loaded: every `SD35Pipeline.from_pretrained` keyword and its default, in one
frozen dataclass (the pipeline, the CLI and anything that keeps pipelines, e.g. a server, pass
this around instead of repeating the keywords)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Tuple, Union

import mlx.core as mx

from .quantize import QuantSpec

# quantize= of the API: text such as "transformer=4,t5=4", or {component: QuantSpec or None}
QuantizeArg = Union[None, str, Mapping[str, Optional[QuantSpec]]]


@dataclass(frozen=True)
class LoadOptions:
    """dtype: weights and compute precision (T5 never runs in float16).
    t5: False is T5-drop mode: T5 is never loaded and zeros stand in for its tokens.
    low_memory: load each network when its stage needs it and release it after.
    quantize: e.g. "transformer=4,t5=4" (or {component: QuantSpec or None}) to quantize at
        load time; parsed once, by the pipeline. A converted folder's networks load as stored.
    revision: Hub branch, tag or commit (repo ids only).
    variant: variant hint, e.g. "sd3.5-large-turbo" (normally detected).
    tile_vae: tiled VAE decode (None: decided per image size / by the plan).
    stream_t5: run T5 one block at a time from the memory-mapped file (slower, far less memory).
    memory_budget: GB the whole generation may use; the planner then chooses quantization,
        T5 mode (loaded, streamed or dropped) and VAE tiling, and refuses if nothing fits.
    plan_size: (height, width) the plan is made for (default: the variant's default size).
    tokenizers: where the tokenizer files are, when the model has none (Stability single
        files); default: the official repo of the detected variant.
    controlnet_quantize: quantization of the ControlNets ('4', '8:32', 'mxfp4'; docs/control.md).
    controlnets: the ControlNets the generations will use, counted by the memory plan.
    plan_init_image: the generations start from an init image (img2img, inpainting): the memory
        plan counts its VAE encode (without it, the first such generation adds the stage to the
        plan, or is refused if it no longer fits).
    """

    dtype: mx.Dtype = mx.bfloat16
    t5: bool = True
    low_memory: bool = True
    quantize: QuantizeArg = None
    revision: Optional[str] = None
    variant: Optional[str] = None
    tile_vae: Optional[bool] = None
    stream_t5: bool = False
    memory_budget: Optional[float] = None
    plan_size: Optional[Tuple[int, int]] = None
    tokenizers: Optional[str] = None
    controlnet_quantize: Optional[str] = None
    controlnets: Tuple[str, ...] = ()
    plan_init_image: bool = False


__all__ = ["LoadOptions", "QuantizeArg"]

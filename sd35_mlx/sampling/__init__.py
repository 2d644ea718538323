"""Sampling: sigma schedule, samplers and guidance arithmetic (see docs/sampling.md)."""

from .guidance import SkipLayerGuidance, cfg_combine, uses_cfg
from .samplers import (
    SAMPLERS,
    DPMPP2MSampler,
    EulerSampler,
    Sampler,
    euler_step,
    make_sampler,
)
from .schedule import (
    DEFAULT_SHIFT,
    NUM_TRAIN_TIMESTEPS,
    flow_sigmas,
    flow_timesteps,
    IMG2IMG_RULES,
    img2img_sigmas,
    img2img_start_index,
    scale_noise,
    shift_sigmas,
)

__all__ = [
    "DEFAULT_SHIFT",
    "NUM_TRAIN_TIMESTEPS",
    "SAMPLERS",
    "DPMPP2MSampler",
    "EulerSampler",
    "Sampler",
    "SkipLayerGuidance",
    "cfg_combine",
    "euler_step",
    "flow_sigmas",
    "flow_timesteps",
    "IMG2IMG_RULES",
    "img2img_sigmas",
    "img2img_start_index",
    "make_sampler",
    "scale_noise",
    "shift_sigmas",
    "uses_cfg",
]

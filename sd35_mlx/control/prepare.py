"""From the user's control settings to what the Denoiser needs, for one generation.

    session = ControlSession.open(pipe, settings)     # ControlNet headers, base check: no weights read
    ...                                               # (the pipeline's img2img start, unless the
                                                      #  inpainting ControlNet drives inpainting)
    nets, blend = session.prepare(pipe, settings, noise, image_latents)
    denoiser = Denoiser(..., controlnets=nets)
    after each step: latents = blend.apply(latents, sigmas[i + 1]) when blend is not None

Two inpainting algorithms, as the references (docs/control.md):
- a mask without the inpainting ControlNet: `StableDiffusion3InpaintPipeline` — img2img start
  (strength), the known region blended back after every step;
- a mask with the inpainting ControlNet: `StableDiffusion3ControlNetInpaintingPipeline` — the
  full schedule from noise, the ControlNet gets [VAE(image with the hole black), 1 − mask],
  no blending (strength is not used).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple

import mlx.core as mx
import numpy as np
from PIL import Image

from ..errors import InputError
from .image import encode_control, read_image, vae_input
from .inpaint import binarize_mask, blend_known, latent_mask, masked_pixels, read_mask
from .inpaint_crop import cropped_inputs, paste_back
from .preprocess import canny_rgb, gaussian_blur
from .settings import ControlNetSettings
from .spec import ControlNetSpec, open_controlnet
from .stack import ActiveControlNet

log = logging.getLogger(__name__)


@dataclass
class InpaintBlend:
    image_latents: mx.array
    mask: mx.array  # (1, h, w, 1), 1 = repaint
    noise: mx.array

    def apply(self, latents: mx.array, sigma_next: float) -> mx.array:
        return blend_known(latents, self.image_latents, self.noise, self.mask, float(sigma_next))


@dataclass
class ControlSession:
    specs: List[Tuple[ControlNetSettings, ControlNetSpec]]
    mask: Optional[str] = None
    control_images: List[Any] = field(default_factory=list)  # PIL: what each ControlNet sees
    crop_box: Optional[Tuple[int, int, int, int]] = None  # mask_crop_padding: where the result goes

    @property
    def inpainting_controlnet(self) -> bool:
        return any(spec.inpainting for _, spec in self.specs)

    @classmethod
    def open(cls, pipe, s) -> Optional["ControlSession"]:
        """Recognise every ControlNet and refuse one made for another base model (no weights
        are read); None when the settings use neither ControlNets nor a mask."""
        if not s.controlnets and s.mask is None:
            return None
        cfg = pipe.transformer_config
        specs = []
        for c in s.controlnets:
            spec = open_controlnet(c.path, num_heads=cfg.num_heads, residual_rule=c.residual_rule,
                                   control_type=c.control_type)  # fmt: skip
            spec.check_base(cfg, pipe.variant.name)
            specs.append((c, spec))
            log.info("ControlNet %s: %s, %s, type %s, residual rule %s", c.path, spec.layout, spec.base,
                     spec.control_type or "unknown", spec.rule.name)  # fmt: skip
        session = cls(specs, s.mask)
        if session.inpainting_controlnet and s.mask is None:
            raise InputError("the inpainting ControlNet needs a mask (--mask, white = repaint)")
        if sum(spec.inpainting for _, spec in specs) > 1:
            raise InputError("use one inpainting ControlNet at a time")
        if session.inpainting_controlnet and s.mask_crop_padding is not None:
            raise InputError("mask_crop_padding applies to plain inpainting, not to the inpainting ControlNet")
        return session

    def init_pixels(self, s) -> mx.array:
        """The init image (1, H, W, 3) in [−1, 1]: the crop around the mask with
        `mask_crop_padding` (sd35_mlx.control.inpaint_crop), else the whole image resized."""
        if s.mask_crop_padding is None:
            from ..images import load_image

            return load_image(s.init_image, s.width, s.height)
        img, _, self.crop_box = cropped_inputs(s.init_image, s.mask, s.width, s.height, s.mask_crop_padding, s.mask_blur)
        return mx.array(img * 2.0 - 1.0)[None]

    def finish(self, image: Image.Image, s) -> Image.Image:
        """With `mask_crop_padding`: the result pasted back into the original image."""
        if self.crop_box is None:
            return image
        return paste_back(image, s.init_image, s.mask, self.crop_box, s.mask_blur)

    def _mask(self, s) -> Optional[np.ndarray]:
        if s.mask is None:
            return None
        if s.mask_crop_padding is None:
            return read_mask(s.mask, s.width, s.height, s.mask_blur)
        _, m, _ = cropped_inputs(s.init_image, s.mask, s.width, s.height, s.mask_crop_padding, s.mask_blur)
        return binarize_mask(m, s.mask)

    def prepare(self, pipe, s, noise: mx.array, image_latents: Optional[mx.array]):
        """(ActiveControlNets, InpaintBlend or None): control latents encoded, nets loaded."""
        mask = self._mask(s)
        nets = []
        vae = pipe._load_vae()
        with pipe._within_budget():
            for c, spec in self.specs:
                control = self._control_latents(vae, pipe.dtype, c, spec, s, mask, pipe.encode_tile)
                mx.eval(control)
                net = pipe._load_controlnet(spec)
                nets.append(ActiveControlNet(net, spec.rule, control, scale=float(c.scale), start=c.start,
                                             end=c.end, zero_pooled=spec.zero_pooled))  # fmt: skip
        blend = None
        if mask is not None and not self.inpainting_controlnet:
            if image_latents is None:
                raise InputError("a mask needs an init image (--init-image)")
            blend = InpaintBlend(image_latents, latent_mask(mask), noise)
        return nets, blend

    def _control_latents(self, vae, dtype, c: ControlNetSettings, spec: ControlNetSpec, s, mask,
                         tile: Optional[int] = None) -> mx.array:  # fmt: skip
        path = c.image or s.init_image
        a = read_image(path, s.width, s.height, what="control image")
        if spec.inpainting:
            image = vae_input(a, stability_canny=False)
            latents = encode_control(vae, masked_pixels(image, mask, -1.0), shift=True, dtype=dtype, tile=tile)
            self.control_images.append(_to_pil(a * (mask[..., None] < 0.5)))
            return mx.concatenate([latents, 1.0 - latent_mask(mask)], axis=-1)
        if c.preprocess is not None:
            rgb = np.round(a * 255).astype(np.uint8)
            a = (canny_rgb(rgb) if c.preprocess == "canny" else gaussian_blur(rgb)).astype(np.float32) / 255.0
        self.control_images.append(_to_pil(a))
        stability_canny = spec.control_type == "canny" and not spec.config.joint
        return encode_control(vae, vae_input(a, stability_canny=stability_canny), shift=spec.latent_shift, dtype=dtype,
                              tile=tile)  # fmt: skip


def _to_pil(a: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.round(a * 255), 0, 255).astype(np.uint8))

"""What a PNG records about ControlNets and inpainting, so a run can be checked and repeated.

Paths alone do not identify an input: the sha256 of every control image and of the mask
is stored beside them, and `--from-image` refuses to reuse settings whose files changed."""

from __future__ import annotations

from typing import Any, Dict, Sequence

from ..errors import InputError
from .image import file_sha256


def control_metadata(s, quantization=None, specs: Sequence = ()) -> Dict[str, Any]:
    """specs: the ControlNetSpecs the run recognised (their type and residual rule are recorded)."""
    from ..quantize import spec_text

    out: Dict[str, Any] = {}
    if s.controlnets:
        out["controlnet_quantization"] = spec_text(quantization)
        recognised = list(specs) if len(specs) == len(s.controlnets) else [None] * len(s.controlnets)
        out["control"] = [
            {"controlnet": c.path, "type": spec.control_type if spec else c.control_type,
             "rule": spec.rule.name if spec else c.residual_rule, "scale": c.scale, "start": c.start, "end": c.end,
             "image": c.image or s.init_image, "image_sha256": file_sha256(c.image or s.init_image),
             "preprocess": c.preprocess}
            for c, spec in zip(s.controlnets, recognised)
        ]  # fmt: skip
    if s.mask is not None:
        out["mask_sha256"] = file_sha256(s.mask)
    return out


def check_control_inputs(meta: Dict[str, Any], s) -> None:
    """Refuse to reproduce `meta` with control images or a mask other than those it recorded."""
    recorded = {c["image"]: c["image_sha256"] for c in meta.get("control", [])}
    for c in s.controlnets:
        path = c.image or s.init_image
        want = recorded.get(path)
        if want is not None and file_sha256(path) != want:
            raise InputError(
                f"control image {path} is not the one this image was made with (sha256 differs); "
                "pass the original control image"
            )
    if s.mask is not None and meta.get("mask_sha256") and file_sha256(s.mask) != meta["mask_sha256"]:
        raise InputError(f"mask {s.mask} is not the one this image was made with (sha256 differs); pass the original mask")

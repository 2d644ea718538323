"""The command line's ControlNet and inpainting flags (parsing only; sd35_mlx.generate uses it).

    --controlnet PATH_OR_REPO   repeatable; each may have its own --control-image, --control-type,
    --control-scale, --control-start, --control-end, --control-preprocess, --control-rule
    (given once: applies to every ControlNet; given N times: one per ControlNet, in order)
    --mask PNG (white = repaint, with --init-image), --mask-blur RADIUS, --save-control DIR
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ..errors import InputError
from .residuals import RULES
from .settings import PREPROCESS, ControlNetSettings
from .spec import CONTROL_TYPES


def add_arguments(p: argparse.ArgumentParser) -> None:
    c = p.add_argument_group("ControlNet and inpainting (docs/control.md)")
    c.add_argument("--controlnet", action="append", metavar="PATH_OR_REPO",
                   help="a ControlNet file, folder or repo id (owner/name[/file.safetensors]); repeatable")
    c.add_argument("--control-image", action="append", metavar="IMAGE", help="its control image (edge/depth/pose map, …)")
    c.add_argument("--control-type", action="append", choices=CONTROL_TYPES, help="override the type the checkpoint states")
    c.add_argument("--control-scale", action="append", type=float, help="strength of its output (default 1.0)")
    c.add_argument("--control-start", action="append", type=float, help="fraction of the schedule where it starts (0)")
    c.add_argument("--control-end", action="append", type=float, help="fraction of the schedule where it stops (1)")
    c.add_argument("--control-preprocess", action="append", choices=PREPROCESS,
                   help="turn a photo into the control map first (canny 100/200, Gaussian blur)")
    c.add_argument("--control-rule", action="append", choices=tuple(RULES),
                   help="override which transformer blocks get its residuals (normally recognised)")
    c.add_argument("--controlnet-quantize", metavar="BITS", help="quantize the ControlNets at load: 4, 8, '4:32', mxfp4")
    c.add_argument("--mask", help="inpainting: white = repaint, black = keep (needs --init-image)")
    c.add_argument("--mask-blur", type=float, default=0.0, help="Gaussian blur radius for the mask edge (pixels)")
    c.add_argument("--mask-crop-padding", type=int, metavar="PX",
                   help="inpaint only a crop around the mask, grown by PX, at full resolution, and paste it back")
    c.add_argument("--save-control", metavar="DIR", help="save what each ControlNet sees (after preprocessing)")


def _per_net(values: Optional[Sequence[Any]], n: int, flag: str) -> List[Any]:
    if not values:
        return [None] * n
    if len(values) == 1:
        return list(values) * n
    if len(values) != n:
        raise InputError(f"{flag} was given {len(values)} times for {n} ControlNets: give it once or once per ControlNet")
    return list(values)


def overrides(args: argparse.Namespace) -> Dict[str, Any]:
    """GenerationSettings fields named on the command line."""
    out: Dict[str, Any] = {}
    paths = args.controlnet or []
    n = len(paths)
    per_net = {k: _per_net(getattr(args, k), n, "--" + k.replace("_", "-")) for k in (
        "control_image", "control_type", "control_scale", "control_start", "control_end", "control_preprocess",
        "control_rule")}  # fmt: skip
    if n == 0 and any(getattr(args, k) for k in per_net):
        raise InputError("--control-… options need a --controlnet")
    if n:
        nets = []
        for i, path in enumerate(paths):
            v = {k: per_net[k][i] for k in per_net}
            nets.append(ControlNetSettings(
                path, image=v["control_image"], control_type=v["control_type"],
                scale=1.0 if v["control_scale"] is None else v["control_scale"],
                start=0.0 if v["control_start"] is None else v["control_start"],
                end=1.0 if v["control_end"] is None else v["control_end"],
                preprocess=v["control_preprocess"], residual_rule=v["control_rule"],
            ))  # fmt: skip
        out["controlnets"] = tuple(nets)
    if args.mask:
        out["mask"] = args.mask
        out["mask_blur"] = args.mask_blur
        out["mask_crop_padding"] = args.mask_crop_padding
    return out


def save_control_images(folder: Optional[str], images: Sequence[Any], stem: str) -> List[Path]:
    """Write each ControlNet's input (PIL) as <stem>-control-<k>.png; never overwrites."""
    if not folder or not images:
        return []
    from ..images import unique_path

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for k, img in enumerate(images):
        path = unique_path(out / f"{stem}-control-{k}.png")
        img.save(path)
        written.append(path)
    return written

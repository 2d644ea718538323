"""Inpainting on SD3.5 Medium: repaint the white part of a mask, keep the rest.

    python examples/inpaint.py photo.png mask.png [MODEL] [--steps N] [--size 1024]

As diffusers' StableDiffusion3InpaintPipeline: the photo is noised to `strength` and, after
every step, everything outside the mask is put back. Outpainting is the same with a larger
canvas: paste the photo onto it and mask the new border white (docs/control.md).
"""

import argparse

import sd35_mlx

parser = argparse.ArgumentParser(description="Replace the masked part of a picture.")
parser.add_argument("photo")
parser.add_argument("mask", help="white = repaint, black = keep (same aspect ratio as the photo)")
parser.add_argument("model", nargs="?", default="stabilityai/stable-diffusion-3.5-medium")
parser.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
parser.add_argument("--size", type=int, help="image width and height in pixels (default: the model's)")
args = parser.parse_args()

pipe = sd35_mlx.SD35Pipeline.from_pretrained(args.model)
result = pipe.generate("a bunch of sunflowers in a glass vase", init_image=args.photo, mask=args.mask,
                       strength=0.9, seed=11, steps=args.steps, width=args.size, height=args.size)  # fmt: skip
result.image.save("inpainted.png")
print("mask sha256:", result.metadata["mask_sha256"][:12])

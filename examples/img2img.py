"""img2img: start from an existing picture; `strength` says how much may change (0, 1].

    python examples/img2img.py photo.png [MODEL] [--steps N] [--size 1024]
"""

import argparse

import sd35_mlx

parser = argparse.ArgumentParser(description="Turn a picture into a pencil sketch.")
parser.add_argument("init", help="the starting picture (resized to the output size)")
parser.add_argument("model", nargs="?", default="stabilityai/stable-diffusion-3.5-large-turbo")
parser.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
parser.add_argument("--size", type=int, help="image width and height in pixels (default: the model's)")
args = parser.parse_args()

pipe = sd35_mlx.SD35Pipeline.from_pretrained(args.model)
result = pipe.generate("the same scene as a pencil sketch", init_image=args.init, strength=0.6, seed=5,
                       steps=args.steps, width=args.size, height=args.size)  # fmt: skip
result.image.save("sketch.png")

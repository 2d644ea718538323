"""SD3.5 Medium with a 4-bit transformer and 4-bit T5: fits a 16 GB Mac comfortably.

Convert once (writes ./sd35-medium-4bit), then generate from the converted folder:
    python convert.py --hf-path stabilityai/stable-diffusion-3.5-medium \
        --mlx-path sd35-medium-4bit --quantize transformer=4,t5=4
    python examples/quantized_medium.py sd35-medium-4bit [--steps N] [--size 1024]
"""

import argparse

import sd35_mlx

parser = argparse.ArgumentParser(description="Generate from a converted 4-bit folder.")
parser.add_argument("model", nargs="?", default="sd35-medium-4bit")
parser.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
parser.add_argument("--size", type=int, default=1024, help="image width and height in pixels")
args = parser.parse_args()

pipe = sd35_mlx.SD35Pipeline.from_pretrained(args.model)
result = pipe.generate(
    "a watercolor map of an imaginary island, fine ink lines",
    width=args.size, height=args.size, steps=args.steps, seed=3,
)
print("seed", result.seed, "timings", pipe.timings)
result.image.save("island.png")

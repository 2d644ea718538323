"""Many prompts, several seeds each, models kept loaded between images.

    python examples/batch_from_prompt_file.py prompts.txt [MODEL] [--steps N] [--size 1024]

Writes out/img.png, out/img-1.png, … (never overwriting). Equivalent CLI:
    python -m sd35_mlx.generate -m MODEL --prompt-file prompts.txt --seed 1 2 3 --keep-loaded -o out/img.png
"""

import argparse
from pathlib import Path

import sd35_mlx
from sd35_mlx.generate import read_prompt_file
from sd35_mlx.images import save_png

parser = argparse.ArgumentParser(description="Several seeds for every prompt of a file.")
parser.add_argument("prompt_file", help="one prompt per line (blank lines and # comments skipped)")
parser.add_argument("model", nargs="?", default="stabilityai/stable-diffusion-3.5-medium")
parser.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
parser.add_argument("--size", type=int, help="image width and height in pixels (default: the model's)")
args = parser.parse_args()

pipe = sd35_mlx.SD35Pipeline.from_pretrained(args.model, low_memory=False)
for prompt in read_prompt_file(args.prompt_file):
    embeddings = pipe.encode_prompt(prompt)  # encode once, reuse for every seed
    for seed in (1, 2, 3):
        result = pipe.generate(prompt, embeddings=embeddings, seed=seed, steps=args.steps,
                               width=args.size, height=args.size)  # fmt: skip
        print(save_png(result.image, Path("out") / "img.png", result.metadata))

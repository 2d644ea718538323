"""Many prompts, several seeds each, models kept loaded between images.

Equivalent CLI:
    python -m sd35_mlx.generate -m MODEL --prompt-file prompts.txt --seed 1 2 3 --keep-loaded -o out/img.png
"""

import sys
from pathlib import Path

import sd35_mlx
from sd35_mlx.generate import read_prompt_file
from sd35_mlx.images import save_png

prompt_file, model = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "stabilityai/stable-diffusion-3.5-medium")
pipe = sd35_mlx.SD35Pipeline.from_pretrained(model, low_memory=False)
for prompt in read_prompt_file(prompt_file):
    embeddings = pipe.encode_prompt(prompt)  # encode once, reuse for every seed
    for seed in (1, 2, 3):
        result = pipe.generate(prompt, embeddings=embeddings, seed=seed)
        print(save_png(result.image, Path("out") / "img.png", result.metadata))

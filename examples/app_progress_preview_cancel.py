"""Embedding in an app: progress, a cheap live preview, and a cancel button.

`generate_latents` yields after every step; the app decides what to do with each step and
stops by simply not asking for the next one. The preview is a fixed linear projection of the
16 latent channels to RGB (no VAE call), cheap enough to show on every step.

    python examples/app_progress_preview_cancel.py [MODEL] [--steps 20] [--size 1024]
"""

import argparse
import threading

import sd35_mlx
from sd35_mlx.settings import GenerationSettings

parser = argparse.ArgumentParser(description="Progress, live previews and a cancel button.")
parser.add_argument("model", nargs="?", default="stabilityai/stable-diffusion-3.5-medium")
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--size", type=int, help="image width and height in pixels (default: the model's)")
args = parser.parse_args()
cancel = threading.Event()  # an app's Cancel button would call cancel.set()

pipe = sd35_mlx.SD35Pipeline.from_pretrained(args.model)
settings = GenerationSettings(prompt="a paper boat on a rainy street", steps=args.steps,
                              width=args.size, height=args.size, seed=9)  # fmt: skip
final = None
for info in pipe.generate_latents(settings):
    print(f"step {info.step}/{info.total}  sigma {info.sigma:.3f}")
    pipe.preview(info.latents).save(f"preview_{info.step:02d}.png")  # show it in the UI
    final = info
    if cancel.is_set():
        print("cancelled")
        break
else:
    images = pipe.decode(final.latents)
    sd35_mlx.images.to_pil(images)[0].save("boat.png")

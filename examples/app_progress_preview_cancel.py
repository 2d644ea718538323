"""Embedding in an app: progress, a cheap live preview, and a cancel button.

`generate_latents` yields after every step; the app decides what to do with each step and
stops by simply not asking for the next one. The preview is a fixed linear projection of the
16 latent channels to RGB (no VAE call), cheap enough to show on every step.
"""

import sys
import threading


import sd35_mlx
from sd35_mlx.settings import GenerationSettings

model = sys.argv[1] if len(sys.argv) > 1 else "stabilityai/stable-diffusion-3.5-medium"
cancel = threading.Event()  # an app's Cancel button would call cancel.set()

pipe = sd35_mlx.SD35Pipeline.from_pretrained(model)
settings = GenerationSettings(prompt="a paper boat on a rainy street", steps=20, seed=9)
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

"""img2img: start from an existing picture; `strength` says how much may change (0, 1]."""

import sys

import sd35_mlx

init, model = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "stabilityai/stable-diffusion-3.5-large-turbo")
pipe = sd35_mlx.SD35Pipeline.from_pretrained(model)
result = pipe.generate("the same scene as a pencil sketch", init_image=init, strength=0.6, seed=5)
result.image.save("sketch.png")

"""SD3.5 Medium with a 4-bit transformer and 4-bit T5: fits a 16 GB Mac comfortably.

Convert once (writes ./sd35-medium-4bit), then generate from the converted folder:
    python convert.py --hf-path stabilityai/stable-diffusion-3.5-medium \
        --mlx-path sd35-medium-4bit --quantize transformer=4,t5=4
    python examples/quantized_medium.py sd35-medium-4bit
"""

import sys

import sd35_mlx

model = sys.argv[1] if len(sys.argv) > 1 else "sd35-medium-4bit"
pipe = sd35_mlx.SD35Pipeline.from_pretrained(model)
result = pipe.generate(
    "a watercolor map of an imaginary island, fine ink lines",
    width=1024, height=1024, seed=3,
)
print("seed", result.seed, "timings", pipe.timings)
result.image.save("island.png")

"""LoRAs: apply one (or several), change its weight, switch it off — the base model is loaded once.

    python examples/lora.py style.safetensors [MODEL] [--scale 0.8] [--steps N] [--size 1024]

The LoRA may be a local .safetensors (diffusers/PEFT, kohya, ComfyUI or OneTrainer format, found
from its keys), a Hugging Face repo id, or `repo:file.safetensors`. On a quantized model it runs
beside the quantized weights, never baked into them.
"""

import argparse

import sd35_mlx

parser = argparse.ArgumentParser(description="The same seed with a LoRA at full and half weight, and without it.")
parser.add_argument("lora", help="LoRA file, folder, repo id or repo:file")
parser.add_argument("model", nargs="?", default="stabilityai/stable-diffusion-3.5-medium")
parser.add_argument("--scale", type=float, default=0.8, help="the LoRA's weight (default 0.8)")
parser.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
parser.add_argument("--size", type=int, help="image width and height in pixels (default: the model's)")
args = parser.parse_args()

pipe = sd35_mlx.SD35Pipeline.from_pretrained(args.model, low_memory=False)  # keep it: no reloads between images
lora = pipe.load_lora(args.lora, scale=args.scale, name="style")
print(f"{lora.name}: {lora.parsed.format} format on {', '.join(lora.components)}")
common = dict(prompt="a lighthouse on a cliff at dusk", seed=7, steps=args.steps, width=args.size, height=args.size)



def save(name: str) -> None:
    result = pipe.generate(**common)
    sd35_mlx.images.save_png(result.image, name, result.metadata)  # records each LoRA: name, sha256, scale


save("lora.png")
pipe.set_lora_scales({"style": args.scale / 2})
save("lora-half.png")
pipe.unload_lora("style")
save("no-lora.png")
print("wrote lora.png, lora-half.png, no-lora.png")

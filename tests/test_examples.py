"""Every script in examples/ runs end to end on a tiny random model, as a user would run it.

Each example runs as a subprocess in its own empty working folder, at the tiny size with two
steps (`--size`, `--steps`), and the files it says it writes are checked: present, valid PNGs
of the requested size, and (where the example stores it) the right metadata.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from tiny_model import TinySpec, make_tiny_model

from sd35_mlx.images import read_metadata
from sd35_mlx.weights.safetensors_file import read_header

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SIZE = 64  # the tiny transformer's positional grid allows 16..256 px
STEPS = 2


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny_examples")
    make_tiny_model(root, TinySpec(seed=2))
    return root


def run_script(script: Path, *args, cwd: Path) -> str:
    """Run a script in `cwd` with the package from this checkout and no network; its stdout."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    cmd = [sys.executable, str(script), *map(str, args)]
    r = subprocess.run(cmd, check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{script.name} exited {r.returncode}:\n{r.stderr[-3000:]}"
    return r.stdout


def run_example(name: str, *args, cwd: Path) -> str:
    return run_script(EXAMPLES / name, *args, cwd=cwd)


def png_size(path: Path) -> tuple[int, int]:
    assert path.is_file(), f"{path.name} was not written"
    with Image.open(path) as img:
        assert img.format == "PNG"
        img.load()  # decodes every pixel: a truncated file fails here
        return img.size


def test_every_example_is_tested():
    tested = {"app_progress_preview_cancel.py", "batch_from_prompt_file.py", "img2img.py",
              "quantized_medium.py", "t5_drop_small_machine.py", "lora.py", "controlnet_canny.py",
              "inpaint.py"}  # fmt: skip
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested


def test_app_progress_preview_cancel(tiny_root, tmp_path):
    out = run_example("app_progress_preview_cancel.py", tiny_root, "--steps", STEPS, "--size", SIZE, cwd=tmp_path)
    assert [ln.split()[1] for ln in out.splitlines() if ln.startswith("step ")] == ["1/2", "2/2"]
    previews = sorted(p.name for p in tmp_path.glob("preview_*.png"))
    assert previews == ["preview_01.png", "preview_02.png"]
    for name in previews + ["boat.png"]:
        assert png_size(tmp_path / name) == (SIZE, SIZE), name


def test_batch_from_prompt_file(tiny_root, tmp_path):
    prompts = ["a red fox in the snow", "a lighthouse at night"]
    (tmp_path / "prompts.txt").write_text(f"# my prompts\n{prompts[0]}\n\n{prompts[1]}\n", encoding="utf-8")
    out = run_example("batch_from_prompt_file.py", "prompts.txt", tiny_root, "--steps", STEPS, "--size", SIZE,
                      cwd=tmp_path)  # fmt: skip
    written = [tmp_path / line for line in out.split()]
    names = ["img.png"] + [f"img-{i}.png" for i in range(1, 6)]
    assert written == [tmp_path / "out" / n for n in names]  # three seeds per prompt, never overwritten
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(names)
    for path, (prompt, seed) in zip(written, [(p, s) for p in prompts for s in (1, 2, 3)]):
        assert png_size(path) == (SIZE, SIZE)
        meta = read_metadata(path)
        assert (meta["prompt"], meta["seed"], meta["steps"], meta["width"], meta["height"]) == (
            prompt, seed, STEPS, SIZE, SIZE)  # fmt: skip


def test_img2img(tiny_root, tmp_path):
    # The init pictures are not of the output size: the example resizes them. 4 steps, not 2:
    # denoising starts int(steps - steps·strength) steps in, which at strength 0.6 is step 1
    # (σ ≈ 0.86) of 4 but step 0 (σ = 1, pure noise: the picture is lost) of 2, as in diffusers.
    results = []
    for color in ((220, 40, 30), (30, 60, 220)):
        folder = tmp_path / f"rgb{color[0]}"
        folder.mkdir()
        Image.new("RGB", (96, 48), color).save(folder / "photo.png")
        run_example("img2img.py", "photo.png", tiny_root, "--steps", 4, "--size", SIZE, cwd=folder)
        assert png_size(folder / "sketch.png") == (SIZE, SIZE)
        results.append(Image.open(folder / "sketch.png").tobytes())
    assert results[0] != results[1], "the init image made no difference"


def test_quantized_medium(tiny_root, tmp_path):
    # Convert as the example's docstring says (the project's converter CLI), then run it.
    run_script(ROOT / "convert.py", "--hf-path", tiny_root, "--mlx-path", "sd35-medium-4bit",
               "--quantize", "transformer=4,t5=4", "--quiet", cwd=tmp_path)  # fmt: skip
    folder = tmp_path / "sd35-medium-4bit"
    components = json.loads((folder / "config.json").read_text())["components"]
    for name in ("transformer", "t5"):
        assert components[name]["quantization"]["bits"] == 4, name
        keys = [k for f in components[name]["files"] for k in read_header(folder / f)[0]]
        assert any(k.endswith(".scales") for k in keys), f"no quantized layer in {name}"

    out = run_example("quantized_medium.py", "sd35-medium-4bit", "--steps", STEPS, "--size", SIZE, cwd=tmp_path)
    assert out.startswith("seed 3 timings") and "denoise" in out
    assert png_size(tmp_path / "island.png") == (SIZE, SIZE)


def test_t5_drop_small_machine(tiny_root, tmp_path):
    # T5 is never loaded: the example runs from a copy of the model that has no T5 weights at all.
    no_t5 = tmp_path / "model-without-t5"
    shutil.copytree(tiny_root, no_t5, ignore=shutil.ignore_patterns("text_encoder_3"))
    out = run_example("t5_drop_small_machine.py", no_t5, "--steps", STEPS, "--size", SIZE, cwd=tmp_path)
    assert "metadata: dropped:256" in out
    assert png_size(tmp_path / "nook.png") == (SIZE, SIZE)


def test_lora(tiny_root, tmp_path):
    from lora_files import PEFT, dotted_key, linear_stems, random_lora, save
    from safetensors.torch import load_file

    state = load_file(str(tiny_root / "transformer" / "diffusion_pytorch_model.safetensors"))
    tensors, _ = random_lora(state, linear_stems(state), dotted_key("transformer."), suffixes=PEFT, with_alpha=False)
    save(tensors, tmp_path / "style.safetensors")
    out = run_example("lora.py", "style.safetensors", tiny_root, "--steps", STEPS, "--size", SIZE, cwd=tmp_path)
    assert out.startswith("style: diffusers/PEFT format on transformer")
    images = {}
    for name in ("lora.png", "lora-half.png", "no-lora.png"):
        assert png_size(tmp_path / name) == (SIZE, SIZE)
        images[name] = Image.open(tmp_path / name).tobytes()
    assert len(set(images.values())) == 3, "the LoRA's weight made no difference"
    assert [(r["name"], r["scale"]) for r in read_metadata(tmp_path / "lora.png")["loras"]] == [("style", 0.8)]
    assert "loras" not in read_metadata(tmp_path / "no-lora.png")


def test_controlnet_canny(tiny_root, tmp_path):
    """With a tiny ControlNet in Stability's single-file layout (image-only blocks)."""
    from control_assets import tiny_stability_controlnet, write_photo

    cn = tiny_stability_controlnet(tmp_path / "sd3.5_tiny_controlnet_canny.safetensors")
    write_photo(tmp_path / "photo.png")
    out = run_example("controlnet_canny.py", "photo.png", tiny_root, "--controlnet", cn, "--steps", STEPS,
                      "--size", SIZE, cwd=tmp_path)  # fmt: skip
    assert "control: canny scale 0.8" in out
    assert png_size(tmp_path / "watercolour.png") == (SIZE, SIZE)
    import numpy as np

    with Image.open(tmp_path / "edges.png") as edges:
        e = np.asarray(edges.convert("L"))
    assert e.shape == (SIZE, SIZE) and set(np.unique(e)) <= {0, 255} and e.max() == 255  # a canny map


def test_inpaint(tiny_root, tmp_path):
    from control_assets import write_mask, write_photo

    write_photo(tmp_path / "photo.png")
    write_mask(tmp_path / "mask.png")
    out = run_example("inpaint.py", "photo.png", "mask.png", tiny_root, "--steps", 4, "--size", SIZE, cwd=tmp_path)
    assert out.startswith("mask sha256:")
    assert png_size(tmp_path / "inpainted.png") == (SIZE, SIZE)

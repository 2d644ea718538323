"""`python -m sd35_mlx.generate` end to end on a tiny model folder, and its input checks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tiny_model import TinySpec, make_tiny_model

from sd35_mlx.generate import main
from sd35_mlx.images import read_metadata

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_cli")
    make_tiny_model(root, TinySpec(seed=1))
    return root


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sd35_mlx.generate", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def test_cli_writes_png_whose_metadata_regenerates_it(tiny_root, tmp_path):
    out = tmp_path / "img.png"
    r = run_cli("--model", str(tiny_root), "--prompt", "a red fox", "--negative-prompt", "fog",
                "-W", "64", "-H", "48", "--steps", "3", "--cfg", "4", "--seed", "123",
                "--t5-length", "77", "--dtype", "float32", "-o", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert out.is_file()
    meta = read_metadata(out)
    for key, value in dict(prompt="a red fox", negative_prompt="fog", seed=123, steps=3, cfg=4.0,
                           width=64, height=48, sampler="euler", t5="t5xxl:77").items():  # fmt: skip
        assert meta[key] == value, key
    assert meta["sd35_mlx_version"] and meta["model"] == str(tiny_root) and "quantization" in meta

    # regenerate from the metadata alone: same pixels, and the first file is not overwritten
    r2 = run_cli("--from-image", str(out), "--trust-metadata-model", "--dtype", "float32", "-o", str(out))
    assert r2.returncode == 0, r2.stderr
    second = tmp_path / "img-1.png"
    assert second.is_file()
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(second)))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--width", "100"], "multiple of 16"),
        (["--sampler", "ddim"], "invalid choice"),
        (["--steps", "0"], "steps"),
        (["--init-image", "/nonexistent.png"], "init image not found"),
        (["--init-image", "{img}", "--strength", "1.5"], "strength"),
        (["--init-image", "{img}", "--strength", "0"], "strength"),
        (["--prompt-file", "/nonexistent.txt"], "prompt file not found"),
        (["--t5-length", "600"], "t5_length"),
    ],
)
def test_bad_input_fails_before_loading(args, message, tmp_path, capsys, monkeypatch):
    img = tmp_path / "x.png"
    Image.new("RGB", (32, 32)).save(img)
    args = [a.replace("{img}", str(img)) for a in args]
    import sd35_mlx.pipeline as pipeline_module

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(pipeline_module.SD35Pipeline, "from_pretrained", no_loading)
    argv = ["--model", "/nonexistent-model", "--prompt", "x", *args]
    if "--prompt-file" in args:
        argv.remove("--prompt")
        argv.remove("x")
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own rejections
        code = e.code
    err = capsys.readouterr().err
    assert code != 0
    assert message in err


def test_memory_budget_defaults_to_this_machine(tiny_root, tmp_path, capsys, monkeypatch):
    """Without --memory-budget the CLI plans for what this machine can give (and says so when
    the plan changes something: tests/test_inputs.py); 'off' and --keep-loaded (everything
    resident: not a staged plan) do not plan."""
    import sd35_mlx.pipeline as pipeline_module

    plans = []
    real = pipeline_module.SD35Pipeline._apply_memory_plan
    monkeypatch.setattr(pipeline_module.SD35Pipeline, "_apply_memory_plan",
                        lambda self, *a: (plans.append(self.memory_budget), real(self, *a))[1])  # fmt: skip
    from sd35_mlx.generate import resolve_budget
    from sd35_mlx.memory import default_budget_bytes

    assert resolve_budget("auto", keep_loaded=False) == default_budget_bytes() / 1e9
    assert resolve_budget("auto", keep_loaded=True) is None
    assert resolve_budget("off", keep_loaded=False) is None
    assert resolve_budget(3.5, keep_loaded=True) == 3.5
    common = ["--model", str(tiny_root), "--prompt", "a fox", "-W", "32", "-H", "32", "--steps", "1",
              "--dtype", "float32"]  # fmt: skip
    for extra, planned in (([], True), (["--memory-budget", "off"], False), (["--keep-loaded"], False)):
        plans.clear()
        assert main([*common, *extra, "-o", str(tmp_path / "img.png")]) == 0
        assert bool(plans) == planned, extra
    with pytest.raises(SystemExit):
        main([*common, "--memory-budget", "lots"])
    assert "expected a number of GB, 'auto' or 'off'" in capsys.readouterr().err


def test_the_memory_plan_line_is_rounded_and_shown_when_it_changes_something(tiny_root, tmp_path, monkeypatch, capsys):
    """The tiny model fits any workable budget unchanged: no plan line. A plan that tiles the
    VAE (forced here) is printed once, with the budget rounded to 0.1 GB."""
    import sd35_mlx.memory as memory
    argv = ["-m", str(tiny_root), "-p", "a fox", "-W", "32", "-H", "32", "--steps", "1", "--dtype", "float32",
            "--memory-budget", "3.14159", "-o", str(tmp_path / "o.png")]  # fmt: skip
    assert main(argv) == 0
    assert "memory plan" not in capsys.readouterr().out
    real = memory.plan_memory
    monkeypatch.setattr(memory, "plan_memory", lambda *a, **k: __import__("dataclasses").replace(real(*a, **k), tile_vae=True))
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("memory plan for 3.1 GB at 32x32: ") == 1 and "VAE tiled" in out


@pytest.mark.parametrize("rule, skipped, slg_steps", [("diffusers", 5, [1]), ("stability", 5, [1, 2, 3])])
def test_img2img_rules_wire_truncation_and_the_slg_window(rule, skipped, slg_steps, tiny_root, tmp_path, monkeypatch):
    """10 steps at strength 0.5 run 5; SLG over (0.01, 0.4) of the steps: diffusers measures the
    window on the 5 steps run (step 1), Stability's sd3_infer.py on all 10 (steps 1–3)."""
    import sd35_mlx.pipeline as pipeline_module
    from sd35_mlx.settings import SkipLayerGuidance

    seen = {}

    class Recording(pipeline_module.Denoiser):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            seen["run"] = self.num_steps
            seen["slg"] = [i for i in range(self.num_steps) if self.slg_active(i)]

    monkeypatch.setattr(pipeline_module, "Denoiser", Recording)
    init = tmp_path / "init.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(init)
    pipe = pipeline_module.SD35Pipeline.from_pretrained(str(tiny_root), dtype=mx_float32())
    pipe.generate("a fox", init_image=str(init), strength=0.5, steps=10, cfg=4.0, seed=1, img2img_rule=rule,
                  skip_layer_guidance=SkipLayerGuidance(layers=(1,), start=0.01, end=0.4))  # fmt: skip
    assert seen == {"run": 10 - skipped, "slg": slg_steps}


def mx_float32():
    import mlx.core as mx

    return mx.float32


# ---- what is written is what was asked (issue 9) -------------------------------------------------
@pytest.fixture(scope="module")
def tiny_pipe(tiny_root):
    import os

    import mlx.core as mx

    from sd35_mlx.pipeline import SD35Pipeline

    here = os.getcwd()
    os.chdir(tiny_root.parent)
    try:  # a relative path, as a user types it
        pipe = SD35Pipeline.from_pretrained(tiny_root.name, dtype=mx.float32)
    finally:
        os.chdir(here)
    return pipe


QUICK = dict(steps=1, width=32, height=32, seed=1)


def test_metadata_records_a_model_path_that_resolves_anywhere(tiny_pipe, tiny_root):
    meta = tiny_pipe.generate("a fox", **QUICK).metadata
    assert meta["model"] == str(tiny_root.absolute())


def test_embeddings_reuse_records_the_real_negative_prompt(tiny_pipe):
    emb = tiny_pipe.encode_prompt("a paper boat", "blurry", t5_length=77)
    meta = tiny_pipe.generate(embeddings=emb, cfg=4.0, **QUICK).metadata
    assert (meta["prompt"], meta["negative_prompt"], meta["t5_length"]) == ("a paper boat", "blurry", 77)


def test_unused_negative_prompt_and_slg_are_said_and_not_recorded(tiny_pipe, caplog):
    from sd35_mlx.settings import SkipLayerGuidance

    with caplog.at_level("WARNING", logger="sd35_mlx"):
        meta = tiny_pipe.generate("a fox", negative_prompt="fog", cfg=1.0,
                                  skip_layer_guidance=SkipLayerGuidance(layers=(1,)), **QUICK).metadata  # fmt: skip
    assert "the negative prompt and skip-layer guidance is ignored" in caplog.text
    assert meta["negative_prompt"] == "" and meta["skip_layer_guidance"] is None and meta["cfg"] == 1.0


def test_img2img_takes_the_init_images_size(tiny_pipe, tmp_path):
    init = tmp_path / "init.png"
    Image.new("RGB", (50, 30), (10, 200, 10)).save(init)  # rounded to 48x32
    out = tiny_pipe.generate("a fox", init_image=str(init), strength=0.9, steps=2, seed=1)
    assert out.image.size == (48, 32) and (out.metadata["width"], out.metadata["height"]) == (48, 32)


def test_sizes_and_slg_layers_beyond_the_model_are_refused_before_any_step(tiny_pipe, monkeypatch):
    import sd35_mlx.pipeline as pipeline_module
    from sd35_mlx.errors import InputError
    from sd35_mlx.settings import SkipLayerGuidance

    monkeypatch.setattr(pipeline_module, "Denoiser", lambda *a, **k: pytest.fail("denoising started"))
    monkeypatch.setattr(tiny_pipe, "encode_prompt", lambda *a, **k: pytest.fail("encoding started"))
    for kwargs, expect in ((dict(width=512), "width 512 is not allowed"), (dict(height=272), "height 272"),
                           (dict(cfg=4.0, skip_layer_guidance=SkipLayerGuidance(layers=(1, 3))), r"layers \[3\] do not exist")):  # fmt: skip
        with pytest.raises(InputError, match=expect):
            tiny_pipe.generate("a fox", **{**QUICK, **kwargs})


def test_quiet_prints_only_the_paths(tiny_root, tmp_path):
    r = run_cli("--model", str(tiny_root), "-p", "a fox", "-W", "32", "-H", "32", "--steps", "1", "--seed", "4", "5",
                "--quiet", "-o", str(tmp_path / "q-{seed}.png"))  # fmt: skip
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout.split() == [str(tmp_path / "q-4.png"), str(tmp_path / "q-5.png")]

"""Every input checked at the door (issue 9, part 2), by kind, several examples each.

Nothing here loads a model: `from_pretrained` is replaced by a function that fails the test,
so each refusal is shown to happen before any loading. docs/reliability.md lists the findings.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin

import sd35_mlx.pipeline as pipeline_module
from sd35_mlx.errors import InputError
from sd35_mlx.generate import expand_seeds, main, read_prompt_file
from sd35_mlx.images import METADATA_KEY, init_image_size, read_metadata, save_png
from sd35_mlx.settings import GenerationSettings, SkipLayerSettings

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_loading(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(pipeline_module.SD35Pipeline, "from_pretrained", refuse)


def refused(argv, capsys, tmp_path, expect: str) -> str:
    """Run the CLI; it must refuse with exit 2, one line naming `expect`, and write nothing."""
    before = set(tmp_path.rglob("*"))
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's refusals
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, (argv, err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert expect in err, (expect, err)
    assert set(tmp_path.rglob("*")) == before, "something was written on refusal"
    return err


def cli(tmp_path, *extra, model="/nonexistent-model"):
    return ["--model", model, "--prompt", "x", "-o", str(tmp_path / "o.png"), *extra]


# ---- unbounded work ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "extra, expect",
    [
        (["--steps", "1000000000"], "steps must be between 1 and 1000"),
        (["--steps", "1001"], "steps must be between 1 and 1000"),
        (["--width", "1000000"], "width must be a multiple of 16 between 16 and 12288"),
        (["--height", "999984"], "height must be a multiple of 16 between 16 and"),
        (["-N", "100000"], "--num-images must be between 1 and 10000"),
        (["-N", "0"], "--num-images must be between 1"),
        (["--seed", *map(str, range(0, 20002, 2))], "at most 10,000"),
        (["--seed", *map(str, range(0, 400, 4)), "-N", "101"], "seed 4 twice"),  # overlap checked first
        (["--t5-length", "100000"], "t5_length must be between 77 and 512"),
        (["--slg", "--slg-layers", *map(str, range(70))], "at most 64"),
        (["--slg", "--slg-layers", "1000"], "layer must be between 0 and 63"),
    ],
)
def test_unbounded_work_is_refused_before_loading(extra, expect, tmp_path, capsys, no_loading):
    refused(cli(tmp_path, *extra), capsys, tmp_path, expect)


def test_prompt_file_and_prompt_sizes_are_bounded(tmp_path, capsys, no_loading):
    many = tmp_path / "many.txt"
    many.write_text("\n".join(f"prompt {i}" for i in range(10_001)))
    refused(["-m", "m", "--prompt-file", str(many), "-o", str(tmp_path / "o.png")], capsys, tmp_path, "10,001 prompts")
    big = tmp_path / "big.txt"
    big.write_bytes(b"a" * (16 * 2**20 + 1))
    refused(["--model", "m", "--prompt-file", str(big), "-o", str(tmp_path / "o.png")], capsys, tmp_path, "bytes; at most")
    refused(["-m", "m", "-p", "x" * 20_001, "-o", str(tmp_path / "o.png")], capsys, tmp_path, "prompt is 20,001 characters")
    few = tmp_path / "few.txt"  # 3 prompts × 4000 seeds: 12,000 images
    few.write_text("a\nb\nc\n")
    argv = ["--model", "m", "--prompt-file", str(few), "--seed", "0", "-N", "4000", "-o", str(tmp_path / "o.png")]
    refused(argv, capsys, tmp_path, "12,000 images; at most 10,000")


@pytest.mark.parametrize("gb", ["0.00001", "1e6", "nan", "inf", "-1"])
def test_converter_shard_size_is_bounded(gb, tmp_path, capsys):
    from sd35_mlx.convert import convert, main as convert_main

    with pytest.raises(SystemExit) as e:
        convert_main(["--hf-path", str(tmp_path), "--mlx-path", str(tmp_path / "o"), "--max-shard-size", gb])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--max-shard-size" in err and len(err.strip().splitlines()) == 1
    for n in (0, 10, 10**13, 2.5e9):
        with pytest.raises(InputError, match="max_shard_bytes"):
            convert(str(tmp_path), str(tmp_path / "o"), max_shard_bytes=n, quiet=True)
    assert not (tmp_path / "o").exists()


# ---- numbers that are not numbers --------------------------------------------------------------
@pytest.mark.parametrize(
    "extra, expect",
    [
        (["--cfg", "nan"], "cfg must be a finite number"),
        (["--cfg", "inf"], "cfg must be a finite number"),
        (["--cfg=-inf"], "cfg must be a finite number"),
        (["--cfg", "1e300"], "cfg must be in [0.0, 100.0]"),
        (["--shift", "nan"], "shift must be a finite number"),
        (["--shift", "inf"], "shift must be a finite number"),
        (["--shift", "0"], "shift must be in (0.0"),
        (["--init-image", "{img}", "--strength", "nan"], "strength must be a finite number"),
        (["--init-image", "{img}", "--strength", "inf"], "strength must be a finite number"),
        (["--slg", "--slg-scale", "nan"], "skip-layer guidance scale must be a finite number"),
        (["--slg", "--slg-start", "nan"], "skip-layer guidance start must be a finite number"),
        (["--slg", "--slg-end", "inf"], "skip-layer guidance end must be a finite number"),
        (["--memory-budget", "nan"], "--memory-budget"),
        (["--memory-budget", "inf"], "--memory-budget"),
        (["--memory-budget", "-3"], "--memory-budget"),
        (["--memory-budget", "0"], "--memory-budget"),
    ],
)
def test_nan_and_inf_are_refused(extra, expect, tmp_path, capsys, no_loading):
    img = tmp_path / "init.png"
    Image.new("RGB", (32, 32)).save(img)
    refused(cli(tmp_path, *[a.replace("{img}", str(img)) for a in extra]), capsys, tmp_path, expect)


@pytest.mark.parametrize("field", ["cfg", "shift", "strength"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_python_api_refuses_nan_and_inf(field, value):
    with pytest.raises(InputError, match=f"{field} must be a finite number"):
        GenerationSettings(**{field: value}).validate()


def test_python_api_refuses_a_nan_budget_before_any_download(monkeypatch):
    import sd35_mlx.hub as hub

    monkeypatch.setattr(hub, "resolve_model_path", lambda *a, **k: pytest.fail("download attempted"))
    for budget in (math.nan, math.inf, 0.0, -1.0):
        with pytest.raises(InputError, match="memory_budget"):
            pipeline_module.SD35Pipeline.from_pretrained("some/repo", memory_budget=budget)


@pytest.mark.parametrize(
    "kwargs, expect",
    [
        (dict(steps=1.5), "steps must be a whole number"),
        (dict(steps=True), "steps must be a whole number"),
        (dict(width="512"), "width must be a whole number"),
        (dict(seed=-1), "seed must be between 0"),
        (dict(seed=2**64), "seed must be between 0"),
        (dict(prompt=["a"]), "prompt must be text"),
        (dict(cfg="4"), "cfg must be a number"),
        (dict(skip_layer_guidance={"layers": [7]}), "must be a SkipLayerGuidance"),
        (dict(img2img_rule="sai"), "unknown img2img_rule"),
    ],
)
def test_python_api_checks_types(kwargs, expect):
    with pytest.raises(InputError, match=expect.replace("(", r"\(")):
        GenerationSettings(**kwargs).validate()


@pytest.mark.parametrize(
    "kwargs, expect",
    [
        (dict(layers=(7, 7)), "names a layer twice"),
        (dict(layers=()), "layers must name at least one block"),
        (dict(layers=(1.5,)), "layer must be a whole number"),
        (dict(layers=tuple(range(65))), "at most 64"),
        (dict(start=0.5, end=0.2), "start < end"),
        (dict(scale=math.nan), "scale must be a finite number"),
        (dict(start=math.nan), "start must be a finite number"),
        (dict(end=math.inf), "end must be a finite number"),
        (dict(scale="2"), "scale must be a number"),
    ],
)
def test_skip_layer_guidance_is_checked_when_made(kwargs, expect):
    with pytest.raises(InputError, match=expect):
        SkipLayerSettings(**kwargs)


# ---- malformed files ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "content, expect",
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "is binary"),
        (b"a fox\n\xff\xfe in the snow\n", "is not UTF-8 text (byte 0xff on line 2)"),
        (b"caf\xe9\n", "is not UTF-8 text"),
        (b"# only comments\n\n   \n", "holds no prompts"),
    ],
)
def test_malformed_prompt_files(content, expect, tmp_path, capsys, no_loading):
    f = tmp_path / "prompts.txt"
    f.write_bytes(content)
    with pytest.raises(InputError, match=expect.replace("(", r"\(").replace(")", r"\)")):
        read_prompt_file(str(f))
    err = refused(["--model", "m", "--prompt-file", str(f), "-o", str(tmp_path / "o.png")], capsys, tmp_path, expect)
    assert str(f) in err


def test_a_utf8_prompt_file_with_bom_is_read(tmp_path):
    f = tmp_path / "p.txt"
    f.write_bytes("\ufeffun renard\n# note\nkitsune 狐\n".encode("utf-8"))
    assert read_prompt_file(str(f)) == ["un renard", "kitsune 狐"]


def png_with(tmp_path: Path, raw, name="meta.png") -> Path:
    path = tmp_path / name
    info = PngImagePlugin.PngInfo()
    if raw is not None:
        info.add_itxt(METADATA_KEY, raw if isinstance(raw, str) else json.dumps(raw))
    Image.new("RGB", (16, 16)).save(path, pnginfo=info)
    return path


GOOD = {"prompt": "a fox", "negative_prompt": "", "steps": 4, "cfg": 4.5, "seed": 3, "width": 64,
        "height": 48, "sampler": "euler", "shift": 3.0, "t5_length": 77, "strength": 0.6,
        "skip_layer_guidance": None, "init_image": None, "model": "/models/x", "quantization": "none",
        "t5": "t5xxl:77"}  # fmt: skip


@pytest.mark.parametrize(
    "raw, expect",
    [
        ("not json {", "is not valid JSON"),
        ("[1, 2, 3]", "is a JSON list, not an object"),
        ('"text"', "is a JSON str, not an object"),
        ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
        ({**GOOD, "steps": "28"}, "metadata field steps must be a whole number"),
        ({**GOOD, "steps": 10**9}, "metadata field steps must be between 1 and 1000"),
        ({**GOOD, "steps": 2.5}, "steps must be a whole number"),
        ({**GOOD, "cfg": "NaN"}, "cfg must be a number"),
        ({**GOOD, "width": True}, "width must be a whole number"),
        ({**GOOD, "width": 10**8}, "width must be a multiple of 16 between 16 and"),
        ({**GOOD, "seed": -5}, "seed must be between 0"),
        ({**GOOD, "prompt": {"a": 1}}, "prompt must be text"),
        ({**GOOD, "sampler": 3}, "unknown sampler"),
        ({**GOOD, "skip_layer_guidance": [7, 8, 9]}, "skip_layer_guidance must be an object"),
        ({**GOOD, "skip_layer_guidance": {"layers": "789"}}, "layers must be a list"),
        ({**GOOD, "skip_layer_guidance": {"layers": [7], "scale": "big"}}, "scale must be a number"),
        ({**GOOD, "skip_layer_guidance": {"layers": [7], "extra": 1}}, "unknown fields: extra"),
        ({**GOOD, "skip_layer_guidance": {"layers": [7], "start": 0.9, "end": 0.1}}, "start < end"),
        ({**GOOD, "quantization": "transformer=banana"}, "metadata field"),
        ({**GOOD, "quantization": 4}, "quantization must be text"),
        ({**GOOD, "t5": 1}, "t5 must be text"),
        ({**GOOD, "model": ["a"]}, "model must be text"),
    ],
)
def test_malformed_png_metadata(raw, expect, tmp_path, capsys, no_loading):
    png = png_with(tmp_path, raw)
    err = refused(["--from-image", str(png), "--model", "m", "-o", str(tmp_path / "o.png")], capsys, tmp_path, expect)
    assert str(png) in err


def test_unreadable_images(tmp_path, capsys, no_loading):
    fake = tmp_path / "fake.png"
    fake.write_text("not an image")
    refused(["--from-image", str(fake), "--model", "m"], capsys, tmp_path, "not a readable image")
    cut = png_with(tmp_path, GOOD, "cut.png")
    cut.write_bytes(cut.read_bytes()[:40])
    refused(["--from-image", str(cut), "--model", "m"], capsys, tmp_path, str(cut))
    bare = png_with(tmp_path, None, "bare.png")
    refused(["--from-image", str(bare), "--model", "m"], capsys, tmp_path, "carries no sd35_mlx metadata")
    with pytest.raises(InputError, match="not a readable image"):
        read_metadata(fake)


# ---- PNG metadata is untrusted -----------------------------------------------------------------
def test_metadata_model_is_used_only_when_asked(tmp_path, capsys, no_loading):
    from sd35_mlx.generate import build_parser, plan

    png = png_with(tmp_path, {**GOOD, "model": "someone/evil-repo"})
    refused(["--from-image", str(png)], capsys, tmp_path, "pass --model someone/evil-repo (or --trust-metadata-model)")
    model, _, jobs = plan(build_parser().parse_args(["--from-image", str(png), "--trust-metadata-model", "-o", str(tmp_path / "o.png")]))
    assert model == "someone/evil-repo" and jobs[0].steps == 4 and jobs[0].seed == 3
    model, _, _ = plan(build_parser().parse_args(["--from-image", str(png), "--model", "mine", "-o", str(tmp_path / "o.png")]))
    assert model == "mine"


def test_metadata_init_image_is_never_read_unless_passed(tmp_path, capsys, no_loading):
    from sd35_mlx.generate import build_parser, plan

    secret = tmp_path / "secret.png"
    Image.new("RGB", (32, 32)).save(secret)
    png = png_with(tmp_path, {**GOOD, "init_image": str(secret), "strength": 0.5})
    refused(["--from-image", str(png), "--model", "m"], capsys, tmp_path, "pass --init-image PATH")
    args = build_parser().parse_args(["--from-image", str(png), "--model", "m", "--init-image", str(secret),
                                      "--strength", "0.5", "-o", str(tmp_path / "o.png")])  # fmt: skip
    _, _, jobs = plan(args)
    assert jobs[0].init_image == str(secret)


def test_from_image_says_what_it_will_use(tmp_path, capsys, monkeypatch):
    from sd35_mlx import generate

    monkeypatch.setattr(generate, "run", lambda *a: 0)
    png = png_with(tmp_path, {**GOOD, "model": "someone/repo", "quantization": "transformer=4", "t5": "dropped:77"})
    assert main(["--from-image", str(png), "--trust-metadata-model", "-o", str(tmp_path / "o.png")]) == 0
    assert f"from {png}: model someone/repo (T5 dropped), quantization transformer=4" in capsys.readouterr().out


def test_metadata_loras_are_untrusted_like_the_model(tmp_path, capsys, no_loading):
    from sd35_mlx.generate import build_parser, plan

    png = png_with(tmp_path, {**GOOD, "loras": [{"source": "/home/x/secret.safetensors", "scale": 0.8}]})
    refused(["--from-image", str(png), "--model", "m"], capsys, tmp_path, "--lora /home/x/secret.safetensors:0.8")
    for bad, expect in (([{"source": "a", "scale": "big"}], "metadata field"), ({"source": "a"}, "not a list of LoRA"),
                        ([{"source": "a", "scale": float("nan")}], "metadata field LoRA a: the scale must be a finite number")):  # fmt: skip
        bad_png = png_with(tmp_path, {**GOOD, "loras": bad}, name="bad.png")
        refused(["--from-image", str(bad_png), "--model", "m"], capsys, tmp_path, expect)
    out = ["-o", str(tmp_path / "o.png")]
    args = build_parser().parse_args(["--from-image", str(png), "--model", "m", "--trust-metadata-model", *out])
    plan(args)
    assert [(s.source, s.scale) for s in args.lora_specs] == [("/home/x/secret.safetensors", 0.8)]
    args = build_parser().parse_args(["--from-image", str(png), "--model", "m", "--lora", "mine.safetensors", *out])
    plan(args)
    assert [s.source for s in args.lora_specs] == ["mine.safetensors"]


def test_metadata_quantization_and_t5_mode_are_carried(tmp_path):
    from sd35_mlx.generate import build_parser, plan

    png = png_with(tmp_path, {**GOOD, "quantization": "transformer=4", "t5": "dropped:77"})
    args = build_parser().parse_args(["--from-image", str(png), "--model", "m", "-o", str(tmp_path / "o.png")])
    _, t5, _ = plan(args)
    assert args.quantize == "transformer=4" and t5 is False


# ---- what is written is what was asked -----------------------------------------------------------
def test_flags_without_effect_are_named(tmp_path, capsys, monkeypatch):
    from sd35_mlx import generate

    monkeypatch.setattr(generate, "run", lambda *a: 0)
    assert main(["-m", "m", "-p", "x", "--slg-scale", "3", "--slg-end", "0.5", "--strength", "0.3",
                 "--img2img-rule", "stability", "--trust-metadata-model", "-o", str(tmp_path / "o.png")]) == 0  # fmt: skip
    err = capsys.readouterr().err.splitlines()
    assert err == ["warning: --slg-scale has no effect without --slg", "warning: --slg-end has no effect without --slg",
                   "warning: --strength has no effect without --init-image",
                   "warning: --img2img-rule has no effect without --init-image",
                   "warning: --trust-metadata-model has no effect without --from-image"]  # fmt: skip
    assert main(["-m", "m", "-p", "x", "--slg", "--slg-scale", "3", "-o", str(tmp_path / "o.png")]) == 0
    assert capsys.readouterr().err == ""


def test_seed_rule():
    assert expand_seeds([1], 3) == [1, 2, 3]
    assert expand_seeds([1, 5], 2) == [1, 2, 5, 6]
    assert expand_seeds(None, 2) == [None, None]
    for seeds, n in (([1, 2], 2), ([5, 3], 3), ([7, 7], 1), ([0, 10, 9], 2)):
        with pytest.raises(InputError, match="twice"):
            expand_seeds(seeds, n)
    with pytest.raises(InputError, match="seed must be between 0"):
        expand_seeds([2**63 - 1], 2)  # seed + 1 would not be a valid seed


@pytest.mark.parametrize(
    "size, asked, expected",
    [
        ((1000, 750), (None, None), (1008, 752)),  # its own size, rounded to 16
        ((640, 480), (None, None), (640, 480)),
        ((640, 480), (320, None), (320, 240)),  # one side given: the other follows the aspect ratio
        ((640, 480), (None, 96), (128, 96)),
        ((640, 480), (512, 512), (512, 512)),  # both given: as asked (cropped when loaded)
    ],
)
def test_img2img_size_follows_the_init_image(size, asked, expected, tmp_path):
    img = tmp_path / "init.png"
    Image.new("RGB", size).save(img)
    assert init_image_size(img, *asked) == expected


def test_img2img_other_aspect_is_cropped_with_a_warning(tmp_path, caplog):
    import numpy as np

    from sd35_mlx.images import load_image

    img = tmp_path / "wide.png"
    arr = np.zeros((64, 128, 3), np.uint8)
    arr[:, 32:96] = 255  # a white centre square on black sides
    Image.fromarray(arr).save(img)
    with caplog.at_level("WARNING", logger="sd35_mlx"):
        x = np.array(load_image(img, 32, 32))
    assert "cropped to 64x64 around the centre" in caplog.text
    assert x.shape == (1, 32, 32, 3) and x.min() > 0.99  # the sides were cut, not squeezed in
    caplog.clear()
    with caplog.at_level("WARNING", logger="sd35_mlx"):
        load_image(img, 64, 32)  # same aspect ratio: only resized
    assert caplog.text == ""


# ---- nothing lost --------------------------------------------------------------------------------
WRITER = """
import sys
from PIL import Image
from sd35_mlx.images import save_png
for i in range(int(sys.argv[2])):
    save_png(Image.new("RGB", (8, 8), (int(sys.argv[3]), i, 0)), sys.argv[1], {"i": i})
"""


def test_parallel_writers_never_lose_an_image(tmp_path):
    out = tmp_path / "same.png"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(out), "40", str(k)], cwd=ROOT) for k in range(4)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    files = sorted(tmp_path.glob("same*.png"))
    assert len(files) == 160
    pixels = {Image.open(f).getpixel((0, 0)) for f in files}
    assert len(pixels) == 160  # every image written once, none overwritten
    assert not list(tmp_path.glob(".*"))  # no temp file left


@pytest.mark.parametrize("name", ["out.jpg", "out", "out.PNG.txt", "o.webp"])
def test_an_extension_the_writer_cannot_honour_is_refused(name, tmp_path, capsys, no_loading):
    refused(["--model", "m", "-p", "x", "-o", str(tmp_path / name)], capsys, tmp_path, "only PNG files are written")
    with pytest.raises(InputError):
        save_png(Image.new("RGB", (8, 8)), tmp_path / name, {})


def test_unwritable_output_is_found_before_loading(tmp_path, capsys, no_loading):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    refused(["--model", "m", "-p", "x", "-o", str(blocker / "sub" / "o.png")], capsys, tmp_path, "is not a folder")
    refused(["--model", "m", "-p", "x", "-o", "/proc/sd35/o.png"], capsys, tmp_path, "cannot write images into /proc/sd35")


def test_output_template(tmp_path, capsys, no_loading):
    from sd35_mlx.generate import output_path

    job = GenerationSettings(seed=42)
    assert output_path("out-{seed}-{index}.png", job, 3) == Path("out-42-3.png")
    for bad in ("out-{prompt}.png", "out-{0}.png", "out-{seed.x}.png", "out-{.png"):
        refused(["--model", "m", "-p", "x", "--seed", "1", "-o", str(tmp_path / bad)], capsys, tmp_path, "--output")


def test_a_finished_image_is_never_dropped(tmp_path, monkeypatch, capsys):
    import tempfile

    from sd35_mlx import generate

    class Result:
        image = Image.new("RGB", (8, 8))
        metadata = {"seed": 1}

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "fallback"))
    (tmp_path / "fallback").mkdir()
    gone = tmp_path / "gone"
    gone.write_text("a file where the folder should be")  # e.g. the folder was replaced meanwhile
    path, saved = generate.save_or_fallback(Result(), gone / "img.png")
    assert not saved and path.parent == tmp_path / "fallback" and path.is_file()
    assert f"the image was saved as {path} instead" in capsys.readouterr().err


# ---- CLI conventions -----------------------------------------------------------------------------
@pytest.mark.parametrize("module", ["sd35_mlx.generate", "sd35_mlx.convert"])
def test_version(module):
    from sd35_mlx import __version__

    r = subprocess.run([sys.executable, "-m", module, "--version"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == f"sd35_mlx {__version__}"


def test_generate_has_no_q_and_parser_errors_are_one_line(tmp_path, capsys, no_loading):
    refused(["-m", "m", "-p", "x", "-q"], capsys, tmp_path, "unrecognized arguments: -q")
    refused(["-m", "m", "-p", "x", "--steps", "many"], capsys, tmp_path, "argument --steps: invalid int value")


def test_progress_covers_every_stage_and_degrades_to_lines():
    import io

    from sd35_mlx.callbacks import StepInfo
    from sd35_mlx.progress import Progress

    out = io.StringIO()  # not a terminal
    p = Progress(label="[1/1] seed 3", stream=out)
    for i in range(1, 21):
        p(StepInfo(step=i, total=20, sigma=0.0, latents=None, seed=3))
    p.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "[1/1] seed 3: encoding the prompt…" and lines[-1] == "[1/1] seed 3: decoding…"
    steps = [ln for ln in lines if "denoising" in ln]
    assert 2 <= len(steps) <= 12 and "20/20" in steps[-1] and "\r" not in out.getvalue()


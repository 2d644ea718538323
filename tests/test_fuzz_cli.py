"""Bounded fuzzing of the generate CLI's argument parsing and of --from-image metadata.

Fixed seeds, fixed counts, parse/validate only (no model runs: `run` is replaced by a function
that accepts). Every case must end with exit code 0 (accepted) or 2 (refused); a refusal is
one line on stderr, never a traceback, and nothing is written anywhere.
"""

from __future__ import annotations

import json
import random
import string

import pytest
from PIL import Image, PngImagePlugin

from sd35_mlx import generate
from sd35_mlx.images import METADATA_KEY

CASES = 400
NUMBERS = ["0", "1", "-1", "2", "3.5", "16", "48", "64", "100", "1000", "1001", "1e9", "1e309", "-1e309",
           "nan", "inf", "-inf", "NaN", "0x10", "1_000", "", " ", "abc", "٣", "1.5", "2**63", str(2**63),
           str(2**64), "9" * 40, "-0", "0.0"]  # fmt: skip
TEXTS = ["a fox", "", " ", "x" * 30_000, "\x00", "é", "狐", "{seed}", "--steps", "-p", "\n\n"]


def _files(tmp_path):
    good = tmp_path / "init.png"
    Image.new("RGB", (40, 24)).save(good)
    binary = tmp_path / "binary.txt"
    binary.write_bytes(bytes(range(256)))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a fox\n# c\nan owl\n")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes(b"caf\xe9\n")
    return [str(good), str(binary), str(prompts), str(latin), str(tmp_path), str(tmp_path / "missing.png"), "", "-"]


def _random_argv(rng: random.Random, files, out_dir) -> list:
    outputs = [str(out_dir / n) for n in ("o.png", "o-{seed}.png", "o-{index}.png", "o.jpg", "o", "o-{x}.png",
                                          "o-{.png", "sub/o.png")] + ["/proc/sd35/o.png", ""]  # fmt: skip
    flags = {
        "--model": lambda: rng.choice(["/nonexistent-model", "user/repo", "", files[4]]),
        "--prompt": lambda: rng.choice(TEXTS),
        "--negative-prompt": lambda: rng.choice(TEXTS),
        "--prompt-file": lambda: rng.choice(files),
        "--t5-length": lambda: rng.choice(NUMBERS),
        "--steps": lambda: rng.choice(NUMBERS),
        "--cfg": lambda: rng.choice(NUMBERS),
        "--shift": lambda: rng.choice(NUMBERS),
        "--width": lambda: rng.choice(NUMBERS),
        "--height": lambda: rng.choice(NUMBERS),
        "--sampler": lambda: rng.choice(["euler", "dpmpp_2m", "ddim", ""]),
        "--seed": lambda: [rng.choice(NUMBERS) for _ in range(rng.randint(1, 4))],
        "--num-images": lambda: rng.choice(NUMBERS),
        "--slg": None,
        "--slg-layers": lambda: [rng.choice(NUMBERS) for _ in range(rng.randint(1, 3))],
        "--slg-scale": lambda: rng.choice(NUMBERS),
        "--slg-start": lambda: rng.choice(NUMBERS),
        "--slg-end": lambda: rng.choice(NUMBERS),
        "--init-image": lambda: rng.choice(files),
        "--strength": lambda: rng.choice(NUMBERS),
        "--memory-budget": lambda: rng.choice(NUMBERS + ["auto", "off", "lots"]),
        "--quantize": lambda: rng.choice(["transformer=4", "t5=4,clip_g=8", "banana", "transformer=3", ""]),
        "--dtype": lambda: rng.choice(["bfloat16", "float16", "int8"]),
        "--tile-vae": lambda: rng.choice(["auto", "on", "maybe"]),
        "--output": lambda: rng.choice(outputs),
        "--no-t5": None,
        "--quiet": None,
        "--keep-loaded": None,
    }
    argv = ["--model", "/m", "--prompt", "a fox"] if rng.random() < 0.8 else []  # later flags override
    for flag in rng.sample(sorted(flags), rng.randint(0, 6)):
        value = flags[flag]() if flags[flag] else None
        if value is None:
            argv.append(flag)
        elif isinstance(value, list):  # nargs="+": argparse takes "-1" as a value, "-inf" as a flag
            argv += [flag, *value]
        else:  # "--cfg=-inf": how a value that starts with "-" is passed
            argv += [f"{flag}={value}"] if value.startswith("-") else [flag, value]
    if "--output" not in argv:
        argv += ["--output", str(out_dir / "o.png")]
    return argv


def _random_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(10 if depth < 2 else 7)
    if kind == 0:
        return rng.choice([0, 1, -1, 7, 28, 2**63, 10**30, -(10**9)])
    if kind == 1:
        return rng.choice([0.0, 0.5, 1.0, 3.5, -2.0, 1e300, float("nan"), float("inf")])
    if kind == 2:
        return rng.choice([True, False, None])
    if kind == 3:
        return "".join(rng.choice(string.printable) for _ in range(rng.randint(0, 12)))
    if kind == 4:
        return rng.choice(["euler", "dpmpp_2m", "t5xxl:77", "dropped:77", "none", "transformer=4", "/etc/passwd"])
    if kind == 5:
        return "x" * rng.choice([1, 5000, 30000])
    if kind == 6:
        return rng.choice([16, 32, 48, 64, 100, 4096, 99999])
    if kind == 7:
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    keys = ["layers", "scale", "start", "end", "x"]
    return {rng.choice(keys): _random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))}


FIELDS = ["prompt", "negative_prompt", "width", "height", "steps", "cfg", "sampler", "shift", "seed", "t5_length",
          "skip_layer_guidance", "init_image", "strength", "model", "quantization", "t5", "variant", "dtype", "loras",
          "img2img_rule"]  # fmt: skip


def _random_png(rng: random.Random, path) -> None:
    base = {"prompt": "a fox", "steps": 4, "seed": 3, "width": 64, "height": 48, "model": "user/repo"}
    if rng.random() < 0.1:
        raw = rng.choice(["{", "[]", "null", "1", '"s"', "[" * 5000])
    else:
        meta = {k: v for k, v in base.items() if rng.random() < 0.7}
        for field in rng.sample(FIELDS, rng.randint(0, 5)):
            meta[field] = _random_value(rng)
        raw = json.dumps(meta)  # NaN / Infinity are written as JSON extensions, which json.loads reads
    info = PngImagePlugin.PngInfo()
    info.add_itxt(METADATA_KEY, raw)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)


def _snapshot(*folders):
    return {p: p.stat().st_size for f in folders for p in f.rglob("*") if p.is_file()}


def _check(argv, capsys, watched) -> int:
    before = _snapshot(*watched)
    try:
        code = generate.main(argv)
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    assert code in (0, 2), (argv, code, captured.err)
    assert "Traceback" not in captured.err, (argv, captured.err)
    if code == 2:
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and "error" in lines[0], (argv, captured.err)
        assert _snapshot(*watched) == before, (argv, "something was written on refusal")
    return code


@pytest.fixture
def accept_without_running(monkeypatch):
    monkeypatch.setattr(generate, "run", lambda args, model, t5, jobs: 0)


def test_fuzz_cli_arguments(tmp_path, capsys, accept_without_running, monkeypatch):
    rng = random.Random(20261201)
    files = _files(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.chdir(out)
    codes = [_check(_random_argv(rng, files, out), capsys, [tmp_path]) for _ in range(CASES)]
    assert codes.count(0) >= CASES // 10 and codes.count(2) >= CASES // 2, codes.count(0)  # both outcomes exercised


def test_fuzz_from_image_metadata(tmp_path, capsys, accept_without_running, monkeypatch):
    rng = random.Random(7)
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.chdir(out)
    codes = []
    for i in range(CASES):
        png = tmp_path / f"m{i}.png"
        _random_png(rng, png)
        extra = rng.choice([[], ["--model", "/m"], ["--trust-metadata-model"], ["--steps", "2"]])
        codes.append(_check(["--from-image", str(png), *extra, "-o", str(out / "o.png")], capsys, [out]))
    assert codes.count(0) >= CASES // 20 and codes.count(2) >= CASES // 2, codes.count(0)

"""Every code block of README.md runs, on a tiny random model: the README is a contract.

How it works (read this before adding a block to the README):
- Fenced blocks are ```bash, ```python, ```json or ```text. `text` blocks (console transcripts,
  file trees) are shown, not run; `json` blocks must parse. Any other fence, or none, fails
  `test_every_block_is_accounted_for`: nothing is skipped silently.
- All blocks run in README order in one shared temp folder (so a later block may use what an
  earlier one wrote, e.g. a converted folder). bash: each command (continuation lines joined,
  comments dropped) runs with `bash -c` and must exit 0; `python` is this interpreter, the
  package is this checkout, the hub is offline. python: the blocks share one namespace, like
  a notebook (a later block may use an earlier one's `pipe`), and must not raise.
- What cannot exist here is replaced first, by SUBSTITUTIONS (old text -> new text, applied to
  every block): the official repo ids become the tiny model, sizes beyond its 64 px position
  grid shrink, step counts drop to 2-3. Each substitution must match somewhere, so a stale one fails.
- A command that cannot run here at all (a server, several processes, the suite itself) goes
  in NOT_RUN with the reason and what checks it instead; a python block is named by its first
  line. Each must appear in the README verbatim.
- The temp folder holds the tiny model in the diffusers layout (for every repo id) and
  Stability's file names (`sd3.5_medium.safetensors`, `text_encoders/...`) and two random LoRAs
  for it (`style.safetensors`, `their-lora.safetensors`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TINY = "{tiny}"  # replaced by the tiny diffusers folder's path

SUBSTITUTIONS = [
    # the official repos: the tiny random model, in the same diffusers layout
    ("stabilityai/stable-diffusion-3.5-large-turbo", TINY),
    ("stabilityai/stable-diffusion-3.5-medium", TINY),
    ("stabilityai/stable-diffusion-3.5-large", TINY),
    # the tiny model's position grid ends at 64 px (its default size)
    ("width=1024, height=768", "width=64, height=48"),
    ("side = 1024 // 8", "side = 64 // 8"),
    # fewer steps (the tiny model's default is 28): the test checks that the code runs, not images
    ("python -m sd35_mlx.generate -m", "python -m sd35_mlx.generate --steps 2 -m"),
    ('pipe.generate("a lighthouse on a cliff at dawn", seed=7)', 'pipe.generate("a lighthouse on a cliff at dawn", seed=7, steps=2)'),
    ("steps=30", "steps=3"),
    ("--steps 60 --cfg 3.5", "--steps 2 --cfg 3.5"),
    # a hub ControlNet file: a tiny one in Stability's layout stands in (hub files: tests/test_hub.py)
    ("stabilityai/stable-diffusion-3.5-controlnets/sd3.5_large_controlnet_canny.safetensors",
     "sd3.5_large_controlnet_canny.safetensors"),
    ("if step.step == 10:", "if step.step == 2:"),
    ("embeddings=emb, seed=seed)", "embeddings=emb, seed=seed, steps=2)"),
    ("callback=lambda info: print(info.step))", "callback=lambda info: print(info.step), steps=2)"),
    # a clone's root is this checkout: verified by a dry run (the metadata is built, nothing installed)
    ("pip install .  ", "pip install --dry-run --no-deps --no-build-isolation --no-index {root}  "),
    # `python convert.py` runs from the clone's root; here the blocks run in a temp folder
    ("python convert.py", "python {root}/convert.py"),
    # no network: the upload itself is checked against a stand-in hub in tests/test_convert.py
    (" --upload-repo me/sd35m-mlx", ""),
]

NOT_RUN = {
    "pip install torch==2.13.0 && pip install -e \".[test]\"": ".ci/run runs exactly this on a fresh clone",
    "python -m pytest tests": "this is the test suite itself (.ci/run runs it)",
    "python -m sd35_mlx.serve --model stabilityai/stable-diffusion-3.5-large-turbo --port 8000 &":
        "starts a server; tests/test_serve.py serves the tiny model over HTTP",
    "curl -s http://127.0.0.1:8000/v1/images/generations -H \"Content-Type: application/json\" "
    "-d '{\"prompt\": \"a corgi astronaut\", \"size\": \"1024x1024\", \"seed\": 7, \"steps\": 4}' > corgi.json":
        "needs that server; tests/test_serve.py sends the same request",
    "from openai import OpenAI": "the OpenAI client is not a dependency; tests/test_serve.py checks its request shapes",
    "sudo apt-get install libopenblas0-pthread # Debian / Ubuntu (Fedora: dnf install openblas)":
        "a system package; tests/test_cpu_compute.py checks the OpenBLAS preload with whatever is installed",
    "SD35_MLX_BLAS=off python -m sd35_mlx.generate ... # opt out; or =/path/to/libopenblas.so":
        "an illustration of the variable (the '...' is any generate command); tests/test_cpu_compute.py tests it",
}

FENCE = re.compile(r"^```(\S*)\n(.*?)^```$", re.S | re.M)


def blocks():
    return [(lang, body) for lang, body in FENCE.findall(README.read_text())]


def commands(body: str):
    """bash commands of a block: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", body)
    return [ln.strip() for ln in joined.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def normalized(command: str) -> str:
    return " ".join(command.split())


def test_every_block_is_accounted_for():
    langs = [lang for lang, _ in blocks()]
    assert langs and set(langs) <= {"bash", "python", "json", "text"}, langs
    for lang, body in blocks():
        if lang == "json":
            json.loads(body)
    text = README.read_text()
    for old, _ in SUBSTITUTIONS:
        assert old in text, f"stale substitution: {old!r} is no longer in README.md"
    flat = normalized(re.sub(r"\\\n\s*", " ", text))  # continuation lines joined
    for command, reason in NOT_RUN.items():
        assert normalized(command) in flat, f"NOT_RUN lists {command!r} ({reason}) but README.md no longer has it"
    ci = (ROOT / ".ci" / "run").read_text()
    for part in ("pip install -q \"torch==2.13.0\"", "pip install -q -e \".[test]\"", "python -m pytest tests"):
        assert part in ci, f".ci/run no longer runs {part!r}, which the README's test section promises"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from lora_files import PEFT, dotted_key, linear_stems, random_lora, save
    from test_layouts import build_tiny_model
    from tiny_model import TinySpec, make_tiny_model

    base = tmp_path_factory.mktemp("readme")
    work = base / "work"
    model = work / "models" / "tiny-sd35"
    pipe = make_tiny_model(model, TinySpec(seed=5, pos_embed_max_size=4))  # generates; too narrow for Stability's config-less files
    state = pipe.transformer.state_dict()
    for seed, name in ((1, "style"), (2, "their-lora")):
        tensors, _ = random_lora(state, linear_stems(state), dotted_key("transformer."), suffixes=PEFT, with_alpha=False, seed=seed)
        save(tensors, work / f"{name}.safetensors")
    stability = build_tiny_model(base / "layouts").stability  # widths Stability files can describe: converted only
    shutil.copy(stability / "sd3.5_tiny.safetensors", work / "sd3.5_medium.safetensors")
    shutil.copytree(stability / "text_encoders", work / "text_encoders")
    from control_assets import tiny_stability_controlnet, write_mask, write_photo

    tiny_stability_controlnet(work / "sd3.5_large_controlnet_canny.safetensors")
    write_photo(work / "photo.png")
    write_photo(work / "room.png", side=64)  # the tiny model's position grid ends at 64 px
    write_mask(work / "mask.png", side=64)
    bindir = base / "bin"  # `python` in the blocks is this interpreter
    bindir.mkdir()
    (bindir / "python").symlink_to(sys.executable)
    return work, model, bindir


def substituted(body: str, model: Path) -> str:
    for old, new in SUBSTITUTIONS:
        body = body.replace(old, new.replace(TINY, str(model)).replace("{root}", str(ROOT)))
    return body


def test_readme_blocks_run(workdir, monkeypatch):
    work, model, bindir = workdir
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    monkeypatch.chdir(work)
    ran = {"bash": 0, "python": 0}
    namespace = {"__name__": "readme"}
    for n, (lang, body) in enumerate(blocks()):
        if lang in ("text", "json"):
            continue
        if lang == "python":
            if body.strip().splitlines()[0] in NOT_RUN:
                continue
            exec(compile(substituted(body, model), f"README.md block {n}", "exec"), namespace)
            ran["python"] += 1
            continue
        for command in commands(body):
            if normalized(command) in {normalized(c) for c in NOT_RUN}:
                continue
            line = substituted(command, model)
            r = subprocess.run(["bash", "-c", line], cwd=work, env=env, capture_output=True, text=True, timeout=600)
            assert r.returncode == 0, f"README.md block {n}: {command}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
            ran["bash"] += 1
    assert ran["bash"] >= 8 and ran["python"] >= 3, ran
    assert (work / "lighthouse.png").is_file() and (work / "sd35m-4bit" / "config.json").is_file()

    # The model card the converter wrote is a contract too: its blocks run on the folder it describes.
    card = (work / "sd35m-4bit" / "README.md").read_text()
    assert "pip install sd35_mlx" not in card and "pip install ." in card  # not on PyPI
    card_blocks = FENCE.findall(card)
    assert [lang for lang, _ in card_blocks] == ["bash", "python"]
    for lang, body in card_blocks:
        body = body.replace("path/to/this/folder", str(work / "sd35m-4bit")).replace("generate --model", "generate --steps 2 --model")
        if lang == "python":
            exec(compile(body.replace("seed=0)", "seed=0, steps=2)"), "model card", "exec"), {})
        for command in commands(body) if lang == "bash" else ():
            r = subprocess.run(["bash", "-c", command], cwd=work, env=env, capture_output=True, text=True, timeout=600)
            assert r.returncode == 0, f"model card: {command}\n{r.stderr[-3000:]}"

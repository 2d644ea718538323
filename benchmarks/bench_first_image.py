"""Time to the first image of a fresh process: sd35_mlx's CLI against diffusers' load + first generation.

    python benchmarks/bench_first_image.py --model medium --size 1024 --steps 28 --tokenizers build/tok

1. An official diffusers folder of the model is written with random full-size weights (bf16,
   built by diffusers / transformers themselves on the torch device and saved with
   `save_pretrained`; tokenizer folders from --tokenizers), unless --workdir already has one.
2. `cold` (only with --cold, meant as the first MLX program of a fresh machine): the CLI on the
   diffusers folder while MLX's CUDA kernels are not yet JIT-compiled.
3. The folder is converted (`python -m sd35_mlx.convert --quantize none`, bf16; timed apart).
4. Both sides' imports run once, untimed (byte code compiled, libraries in the file cache).
5. --repeat rounds, each a fresh process per case, interleaved so each sees the same page cache
   (the files were just written: a warm file cache): `python -m sd35_mlx.generate` on the
   converted folder and on the diffusers folder, and diffusers' `StableDiffusion3Pipeline`
   (`from_pretrained(torch_dtype=bfloat16).to(device)` + one generation).
   Wall time of the whole process (imports included), the CLI's own stage times, and for
   diffusers load / generate apart.
6. `breakdown`: one more fresh process per folder through the Python API (`--breakdown`) that
   times each phase: imports, pipeline construction, each encoder (load + run), the
   transformer's load, the first step (compile), the other steps, the decode.

Results: <results-dir>/<machine-slug>-<date>.json (key first-image-<model>-<size>) and, with
--write-docs, a table in the machine's section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from statistics import median
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402

PROMPT = "a lighthouse on a cliff at dusk, oil painting"
CLIP_AND_T5_TOKENS = 77 + 256
SEED = 0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="medium", choices=sorted(C.MODELS))
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--cold", action="store_true", help="first run the CLI once before anything else used MLX here")
    p.add_argument("--tokenizers", type=Path, required=True, help="folder with tokenizer/ tokenizer_2/ tokenizer_3/")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/sd35-first-image"))
    p.add_argument("--torch-device", default="cuda")
    p.add_argument("--no-breakdown", action="store_true", help="skip the phase-by-phase runs")
    p.add_argument("--breakdown", type=Path, default=None, help=argparse.SUPPRESS)  # child mode
    C.add_output_args(p)
    return p.parse_args(argv)


def log(msg: str) -> None:
    print(msg, flush=True)


# ---- the folders ---------------------------------------------------------------------------------
def write_diffusers_folder(root: Path, model_key: str, tokenizers: Path, device: str) -> float:
    """The official layout, written by diffusers' own save_pretrained; returns seconds."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTokenizer, T5TokenizerFast

    import torch_reference as R

    t0 = time.perf_counter()
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        shutil.copytree(tokenizers / name, tmp / name)
    pipe = StableDiffusion3Pipeline(
        tokenizer=CLIPTokenizer.from_pretrained(tmp / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(tmp / "tokenizer_2"),
        tokenizer_3=T5TokenizerFast.from_pretrained(tmp / "tokenizer_3"),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        **R.pipeline_components(C.MODELS[model_key][1], device),
    )
    pipe.save_pretrained(tmp)
    del pipe
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    tmp.rename(root)
    return time.perf_counter() - t0


def _run(cmd: List[str], env: Dict[str, str] | None = None) -> Dict[str, Any]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return {"wall_s": wall, "stdout": proc.stdout[-3000:], "stderr": proc.stderr[-1500:]}


def cli_run(folder: Path, out: Path, args) -> Dict[str, Any]:
    """A fresh `python -m sd35_mlx.generate` as a user runs it (defaults otherwise)."""
    cmd = [sys.executable, "-m", "sd35_mlx.generate", "-m", str(folder), "-p", PROMPT, "--seed", str(SEED),
           "--steps", str(args.steps), "-W", str(args.size), "-H", str(args.size), "-o", str(out)]  # fmt: skip
    r = _run(cmd)
    m = re.search(r"loaded in ([\d.]+) s", r["stdout"])
    r["construct_s"] = float(m.group(1)) if m else None
    m = re.search(r"saved .*\((.*); peak memory ([\d.]+) GB\)", r["stdout"])
    if m:
        r["stages_s"] = {k: float(v) for k, v in re.findall(r"(\w+) ([\d.]+) s", m.group(1))}
        r["peak_gb"] = float(m.group(2))
    return r


DIFFUSERS_CHILD = r"""
import sys, time, json
t0 = time.perf_counter()
import torch
from diffusers import StableDiffusion3Pipeline
t1 = time.perf_counter()
pipe = StableDiffusion3Pipeline.from_pretrained(sys.argv[1], torch_dtype=torch.bfloat16).to(sys.argv[2])
cuda = sys.argv[2].startswith("cuda")
if cuda:
    torch.cuda.synchronize()
t2 = time.perf_counter()
g = torch.Generator(device=sys.argv[2]).manual_seed(0)
image = pipe(sys.argv[3], num_inference_steps=int(sys.argv[4]), height=int(sys.argv[5]), width=int(sys.argv[5]),
             guidance_scale=4.5, generator=g).images[0]
image.save(sys.argv[6])
t3 = time.perf_counter()
print("TIMES " + json.dumps(dict(import_s=t1 - t0, load_s=t2 - t1, generate_s=t3 - t2,
                                 peak_gb=torch.cuda.max_memory_allocated() / 1e9 if cuda else None)))
"""


def diffusers_run(folder: Path, out: Path, args) -> Dict[str, Any]:
    r = _run([sys.executable, "-c", DIFFUSERS_CHILD, str(folder), args.torch_device, PROMPT, str(args.steps),
              str(args.size), str(out)])  # fmt: skip
    m = re.search(r"TIMES (\{.*\})", r["stdout"])
    r.update(json.loads(m.group(1)) if m else {})
    return r


# ---- the phase breakdown (child process) -------------------------------------------------------------
def breakdown(folder: Path, args) -> None:
    t_start = time.perf_counter()
    import mlx.core as mx

    from sd35_mlx.pipeline import SD35Pipeline, initial_noise
    from sd35_mlx.settings import GenerationSettings

    phases: Dict[str, float] = {}

    def mark(name: str, t0: float) -> float:
        now = time.perf_counter()
        phases[name] = now - t0
        return now

    t = time.perf_counter()
    pipe = SD35Pipeline.from_pretrained(str(folder), low_memory=True)
    t = mark("construct", t)
    enc = pipe._load_encoders()
    for name in ("clip_l", "clip_g", "t5"):
        if getattr(enc, name) is not None:
            mx.eval(getattr(enc, name).parameters())
            t = mark(f"load {name}", t)
    emb = pipe.encode_prompt(PROMPT, "", t5_length=256)
    t = mark("encode (run)", t)
    mx.eval(pipe._load_transformer().parameters())
    t = mark("load transformer", t)
    # The process's first GEMM and attention at the step's shapes (cuBLASLt handle and
    # heuristics, cuDNN's attention graph), apart from what the first step costs beyond them.
    cfg = pipe._load_transformer().config
    tokens, hidden = (args.size // 16) ** 2 + CLIP_AND_T5_TOKENS, cfg.hidden_size
    x = mx.random.normal((2, tokens, hidden)).astype(mx.bfloat16)
    q = x.reshape(2, tokens, cfg.num_heads, hidden // cfg.num_heads).transpose(0, 2, 1, 3)
    mx.eval(x, q)
    t = time.perf_counter()
    mx.eval(x @ x[0, :hidden].T, mx.fast.scaled_dot_product_attention(q, q, q, scale=0.125))
    t = mark("first GEMM + attention of the process", t)
    s = GenerationSettings(prompt=PROMPT, steps=args.steps, width=args.size, height=args.size, seed=SEED)
    steps = pipe.generate_latents(s, embeddings=emb, noise=initial_noise(SEED, args.size // 8, args.size // 8))
    first = next(steps)
    t = mark("denoiser setup + first step", t)
    final = first
    for final in steps:
        pass
    t = mark(f"steps 2-{args.steps}", t)
    images = pipe.decode(final.latents)
    mx.eval(images)
    t = mark("load VAE + decode", t)
    phases["total"] = time.perf_counter() - t_start
    print("PHASES " + json.dumps(phases))


def breakdown_run(folder: Path, args) -> Dict[str, float]:
    r = _run([sys.executable, __file__, "--breakdown", str(folder), "--tokenizers", str(args.tokenizers),
              "--size", str(args.size), "--steps", str(args.steps)])  # fmt: skip
    m = re.search(r"PHASES (\{.*\})", r["stdout"])
    phases = json.loads(m.group(1)) if m else {}
    if "total" in phases:
        phases = {"process start + imports": r["wall_s"] - phases["total"], **phases}
    return {"wall_s": r["wall_s"], **phases}


# ---- report ---------------------------------------------------------------------------------------
def ratio(a, b):
    return a / b if a is not None and b else None


def report(args, info, res) -> str:
    def med(case, field="wall_s"):
        vals = [r[field] for r in res["runs"][case] if r.get(field) is not None]
        return median(vals) if vals else None

    theirs = med("diffusers")
    rows = []
    if res.get("cold"):
        rows.append(["sd35_mlx CLI, diffusers folder, **cold** (MLX CUDA kernels not yet JIT-compiled)",
                     f"{res['cold']['wall_s']:.1f} s", C.fmt_ratio(ratio(res["cold"]["wall_s"], theirs)),
                     _stages(res["cold"])])  # fmt: skip
    for case, label in (("converted", "sd35_mlx CLI, converted folder (bf16)"),
                        ("diffusers_folder", "sd35_mlx CLI, official diffusers folder")):  # fmt: skip
        rows.append([label, f"{med(case):.1f} s", C.fmt_ratio(ratio(med(case), theirs), 1.0),
                     _stages(res["runs"][case][-1])])  # fmt: skip
    rows.append(["diffusers: import + `from_pretrained(...).to(cuda)` + first generation", f"{theirs:.1f} s", "1.00×",
                 f"import {med('diffusers', 'import_s'):.1f} s, load {med('diffusers', 'load_s'):.1f} s, "
                 f"generate {med('diffusers', 'generate_s'):.1f} s; peak {C.fmt_gb((med('diffusers', 'peak_gb') or 0) * C.GB)}"])  # fmt: skip
    name = C.MODELS[args.model][0]
    lines = [f"### First image of a fresh process: {name}, {args.size}², {args.steps} steps",
             f"_{C.versions_line(info)}_  \n_command: `{info['command']}`_",
             f"Random full-size weights (bf16) in an official diffusers folder written by diffusers' `save_pretrained` "
             f"({res['write_s']:.0f} s), and its conversion (`--quantize none`, {res['convert_s']:.0f} s, not counted). "
             f"Each figure is the wall time of a fresh process (imports included), median of {args.repeat} "
             f"interleaved round(s), warm file cache; the CLI with its defaults (`--memory-budget auto`).",
             C.markdown_table(["run", "wall time", "vs diffusers", "stages"], rows)]  # fmt: skip
    if res.get("breakdown"):
        keys = list(next(iter(res["breakdown"].values())).keys())
        brows = [[k] + [f"{res['breakdown'][f].get(k, float('nan')):.2f} s" for f in res["breakdown"]] for k in keys]
        lines.append("**Where the seconds go** (the Python API in a fresh process, phase by phase)\n\n"
                     + C.markdown_table(["phase"] + list(res["breakdown"]), brows))  # fmt: skip
    return "\n\n".join(lines)


def _stages(r: Dict[str, Any]) -> str:
    parts = [f"construct {r['construct_s']:.1f} s"] if r.get("construct_s") is not None else []
    parts += [f"{k} {v:.1f} s" for k, v in r.get("stages_s", {}).items()]
    if r.get("peak_gb") is not None:
        parts.append(f"peak {r['peak_gb']:.1f} GB")
    return ", ".join(parts)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.breakdown is not None:
        breakdown(args.breakdown, args)
        return 0
    t_start = time.perf_counter()
    args.workdir.mkdir(parents=True, exist_ok=True)
    root, conv = args.workdir / f"{args.model}-diffusers", args.workdir / f"{args.model}-converted"
    res: Dict[str, Any] = {"settings": {k: str(v) for k, v in vars(args).items()}, "write_s": 0.0}
    if not root.exists():
        log(f"writing {root} (random weights, diffusers' save_pretrained)")
        res["write_s"] = write_diffusers_folder(root, args.model, args.tokenizers, args.torch_device)
        log(f"  {res['write_s']:.0f} s")
    if args.cold:
        res["cold"] = cli_run(root, args.workdir / "cold.png", args)
        log(f"cold CLI run: {res['cold']['wall_s']:.1f} s")
    t0 = time.perf_counter()
    if not conv.exists():
        _run([sys.executable, "-m", "sd35_mlx.convert", "--hf-path", str(root), "--mlx-path", str(conv),
              "--quantize", "none", "--quiet"])  # fmt: skip
    res["convert_s"] = time.perf_counter() - t0
    # Both sides' imports once, untimed: byte code compiled and shared libraries in the file
    # cache, as on a machine that has run them before (a fresh --no-compile install of diffusers
    # otherwise spends ~10 s of its first import compiling).
    t0 = time.perf_counter()
    _run([sys.executable, "-c", "import torch, diffusers; from diffusers import StableDiffusion3Pipeline"])
    _run([sys.executable, "-c", "import sd35_mlx.generate, sd35_mlx.pipeline"])
    res["warm_imports_s"] = time.perf_counter() - t0
    res["runs"] = {"converted": [], "diffusers_folder": [], "diffusers": []}
    for i in range(args.repeat):
        for case, fn, folder in (("converted", cli_run, conv), ("diffusers_folder", cli_run, root),
                                 ("diffusers", diffusers_run, root)):  # fmt: skip
            r = fn(folder, args.workdir / f"{case}-{i}.png", args)
            res["runs"][case].append(r)
            log(f"{case} round {i + 1}: {r['wall_s']:.1f} s  {_stages(r)}")
    if not args.no_breakdown:
        res["breakdown"] = {"converted": breakdown_run(conv, args), "diffusers folder": breakdown_run(root, args)}
        log(json.dumps(res["breakdown"], indent=1))
    res["wall_s"] = time.perf_counter() - t_start
    info = C.machine_info(args.torch_device)
    body = report(args, info, res)
    print("\n" + body + "\n")
    C.publish(args, info, f"first-image-{args.model}-{args.size}", body, res, log)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

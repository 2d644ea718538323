"""MLX's Linux CPU build with and without OpenBLAS and float32 compute (sd35_mlx.cpu_blas, cpu_compute).

    python benchmarks/bench_cpu_blas.py --write-docs

Each setting runs in a fresh process (the BLAS must be chosen before MLX is imported):
- `before`: MLX's bundled reference BLAS (`SD35_MLX_BLAS=off`), 16-bit work computed in 16-bit
  (`KERNELS.cpu_float32 = False`): what the project did until now;
- `OpenBLAS`: the BLAS preloaded, 16-bit still computed in 16-bit;
- `after`: OpenBLAS and float32 compute (the defaults now).
and measures: dense matmul GFLOP/s (1024³, fp32 and bf16); one denoising step of SD3.5 Medium
at full width with 1 block (256², CFG batch 2, 333 text tokens, bf16 weights, the pipeline's
Denoiser); a whole generation of the tiny test model (tests/tiny_model.py: 128², 4 steps, bf16,
kept loaded, after one warm-up generation). Medians of --repeat; ratios against `before` of the
same run (this machine's other load makes ±10-20 % noise).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from statistics import median
from typing import Any, Dict

HERE = Path(__file__).resolve().parent
SETTINGS = {  # name -> (SD35_MLX_BLAS, float32 compute)
    "before": ("off", False),
    "OpenBLAS": ("", False),
    "after": ("", True),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--tiny", type=Path, default=Path("/tmp/sd35-bench-tiny"), help="where the tiny model is written")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--results-dir", type=Path, default=None)
    p.add_argument("--docs", type=Path, default=None)
    p.add_argument("--write-docs", action="store_true")
    return p.parse_args(argv)


def child(args) -> Dict[str, Any]:
    """One setting, in this (fresh) process."""
    import sd35_mlx  # noqa: F401  (first: it picks the BLAS before mlx.core is imported)
    import mlx.core as mx

    sys.path.insert(0, str(HERE))
    import common as C

    from sd35_mlx import cpu_blas
    from sd35_mlx.backend import KERNELS

    KERNELS.cpu_float32 = SETTINGS[args.child][1]
    mx.set_default_device(mx.cpu)
    out: Dict[str, Any] = {"blas": cpu_blas.loaded()}
    for name, dt in (("fp32", mx.float32), ("bf16", mx.bfloat16)):
        a = mx.random.normal((1024, 1024), key=mx.random.key(0)).astype(dt)
        t = C.time_calls(lambda a=a: a @ a, C.mlx_sync, 1, args.repeat)
        out[f"matmul_{name}_gflops"] = 2 * 1024**3 / t.median / 1e9

    name, cfg = C.MODELS["medium"]
    model = C.random_network("transformer", C.truncated(cfg, 1), mx.bfloat16)
    cond = C.random_conditioning(2, 256, mx.bfloat16)
    sigmas, sampler = C.schedule(args.repeat + 1)
    den, _ = C.make_denoiser(model, cond[1], cond[0], sigmas=sigmas)
    noise = mx.random.normal((1, 32, 32, 16), key=mx.random.key(1))
    steps = []
    x = noise
    for i in range(args.repeat + 1):
        start = time.perf_counter()
        x = C.denoise_step(den, x, i, sampler)
        mx.eval(x)
        steps.append(time.perf_counter() - start)
    out["step_s"] = median(steps[1:])  # the first compiles
    del den, model

    from sd35_mlx.pipeline import SD35Pipeline

    pipe = SD35Pipeline.from_pretrained(str(args.tiny), dtype=mx.bfloat16, low_memory=False)
    gens = []
    for seed in range(args.repeat + 1):
        start = time.perf_counter()
        pipe.generate("a lighthouse on a cliff", seed=seed, steps=4, width=128, height=128)
        gens.append(time.perf_counter() - start)
    out["tiny_generation_s"] = median(gens[1:])
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return 0
    sys.path.insert(0, str(HERE))
    import common as C

    t0 = time.perf_counter()
    if not (args.tiny / "model_index.json").exists():
        sys.path.insert(0, str(C.REPO / "tests"))
        from tiny_model import make_tiny_model

        make_tiny_model(args.tiny)
    res: Dict[str, Any] = {"settings": {k: str(v) for k, v in vars(args).items()}, "runs": {}}
    for name, (blas, _) in SETTINGS.items():
        env = {**os.environ, "SD35_MLX_BLAS": blas} if blas else {k: v for k, v in os.environ.items() if k != "SD35_MLX_BLAS"}
        env["PYTHONPATH"] = os.pathsep.join([str(C.REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        cmd = [sys.executable, __file__, "--child", name, "--repeat", str(args.repeat), "--tiny", str(args.tiny)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            raise RuntimeError(f"{name}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        res["runs"][name] = json.loads(line[len("RESULT "):])
        print(name, res["runs"][name], flush=True)
    res["wall_s"] = time.perf_counter() - t0
    base = res["runs"]["before"]
    rows = []
    for name, r in res["runs"].items():
        rows.append([name, r["blas"] or "MLX's bundled reference BLAS", "yes" if SETTINGS[name][1] else "no",
                     f"{r['matmul_fp32_gflops']:.1f}", f"{r['matmul_bf16_gflops']:.1f}",
                     f"{r['step_s']:.2f} s ({base['step_s'] / r['step_s']:.1f}× faster)",
                     f"{r['tiny_generation_s']:.2f} s ({base['tiny_generation_s'] / r['tiny_generation_s']:.1f}× faster)"])  # fmt: skip
    info = C.machine_info()
    body = "\n\n".join([
        "### CPU: OpenBLAS and float32 compute (before / after)",
        f"_{C.versions_line(info)}_  \n_command: `{info['command']}`_",
        f"Each row a fresh process; medians of {args.repeat}. Step: SD3.5 Medium at full width, 1 block, 256², "
        "CFG batch 2, 333 text tokens, bf16 weights. Tiny generation: tests/tiny_model.py at 128², 4 steps, bf16.",
        C.markdown_table(["setting", "BLAS", "16-bit computed in float32", "matmul fp32 GFLOP/s", "matmul bf16 GFLOP/s",
                          "1-block full-width step", "tiny generation"], rows),
    ])  # fmt: skip
    print("\n" + body + "\n")
    args.results_dir = args.results_dir or C.RESULTS_DIR
    args.docs = args.docs or C.DOCS_PAGE
    C.publish(args, info, "cpu-blas", body, res, print)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

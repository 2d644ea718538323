"""The joint block's matrix products alone: MLX's Linear against torch's, same shapes, same GPU.

    python benchmarks/bench_gemm.py --torch --write-docs

Each Linear of an SD3.5 Medium / Large joint block (CFG batch 2 flattened: 2 × 4096 image rows at
1024², 2 × 333 text rows), bf16. Per variant, --calls independent products are queued and
evaluated at once (so launch and sync costs are spread, not timed per call); the median of
--repeat such batches, divided by --calls. MLX variants: `mx.addmm(b, x, w.T)` (what nn.Linear
runs), the same on the (2, N, K) input, `x @ w.T` without bias, `x @ w` with w stored
transposed; torch: `F.linear` with and without bias. TFLOP/s = 2·M·K·N / time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402
import mlx.core as mx  # noqa: E402

SHAPES = [  # name, M, K, N
    ("Medium x qkv", 8192, 1536, 4608), ("Medium x fc1", 8192, 1536, 6144), ("Medium x fc2", 8192, 6144, 1536),
    ("Medium x proj", 8192, 1536, 1536), ("Medium ctx fc1", 666, 1536, 6144),
    ("Large x qkv", 8192, 2432, 7296), ("Large x fc1", 8192, 2432, 9728), ("Large x fc2", 8192, 9728, 2432),
    ("Large 512² x fc1", 2048, 2432, 9728),
]  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=16)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--torch", action="store_true", help="also time torch's F.linear on the CUDA device")
    C.add_output_args(p)
    return p.parse_args(argv)


def per_call(run_batch: Callable[[], None], calls: int, repeat: int) -> float:
    times: List[float] = []
    for _ in range(repeat + 1):  # the first batch warms up
        start = time.perf_counter()
        run_batch()
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[repeat // 2] / calls


def mlx_variants(m: int, k: int, n: int, calls: int, repeat: int) -> Dict[str, float]:
    x = mx.random.normal((m, k)).astype(mx.bfloat16)
    x3 = x.reshape(2, m // 2, k)
    w = (mx.random.normal((n, k)) * 0.02).astype(mx.bfloat16)
    wt = mx.contiguous(w.T)
    b = mx.random.normal((n,)).astype(mx.bfloat16)
    mx.eval(x, x3, w, wt, b)
    variants = {
        "addmm(b, x, w.T)": lambda: mx.addmm(b, x, w.T),
        "addmm, (2, N, K) input": lambda: mx.addmm(b, x3, w.T),
        "x @ w.T": lambda: x @ w.T,
        "x @ w (w stored transposed)": lambda: x @ wt,
    }
    out = {}
    for name, fn in variants.items():
        def batch(fn=fn):
            results = [fn() for _ in range(calls)]
            mx.eval(results)
            mx.synchronize()
        out[name] = per_call(batch, calls, repeat)
    return out


def torch_variants(m: int, k: int, n: int, calls: int, repeat: int) -> Dict[str, float]:
    import torch
    import torch.nn.functional as F

    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    out = {}
    for name, fn in {"torch F.linear": lambda: F.linear(x, w, b), "torch F.linear, no bias": lambda: F.linear(x, w)}.items():
        def batch(fn=fn):
            results = [fn() for _ in range(calls)]
            torch.cuda.synchronize()
            del results
        out[name] = per_call(batch, calls, repeat)
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    info = C.machine_info("cuda" if args.torch else None)
    rows, payload = [], []
    for name, m, k, n in SHAPES:
        times = mlx_variants(m, k, n, args.calls, args.repeat)
        if args.torch:
            times.update(torch_variants(m, k, n, args.calls, args.repeat))
        flop = 2 * m * k * n
        payload.append(dict(name=name, m=m, k=k, n=n, seconds=times))
        ours = times["addmm(b, x, w.T)"]
        theirs = times.get("torch F.linear")
        cells = [f"{t * 1e3:.3f} ms ({flop / t / 1e12:.0f})" for t in times.values()]
        rows.append([f"{name} ({m}×{k}→{n})", *cells, C.fmt_ratio(ours / theirs) if theirs else "–"])
        print(f"{name}: " + ", ".join(f"{v}={t * 1e3:.3f} ms" for v, t in times.items()), flush=True)
    headers = ["product", *payload[0]["seconds"].keys(), "nn.Linear / torch"]
    body = "\n".join([
        "### The block's matrix products alone (`benchmarks/bench_gemm.py`)",
        "",
        f"_{C.versions_line(info)}_  ",
        f"_command: `{info['command']}`_",
        "",
        f"bf16; time per product (TFLOP/s in brackets), median of {args.repeat} batches of {args.calls} queued products.",
        "",
        C.markdown_table(headers, rows),
    ])  # fmt: skip
    C.publish(args, info, "gemm", body, {"shapes": payload, "wall_s": time.perf_counter() - started}, print)


if __name__ == "__main__":
    main()

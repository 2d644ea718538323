"""What running CFG as two batch-1 passes (`Denoiser(split_cfg=True)`, used under a memory
budget) costs in time and saves in peak memory, against the batch of 2, in one run.

    python benchmarks/bench_split_cfg.py --model medium --size 1024 [--bits 4] [--layers N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).parent))
import common as C  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="medium", choices=sorted(C.MODELS))
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--bits", type=int, default=16)
    p.add_argument("--layers", type=int)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    name, config = C.MODELS[args.model]
    config = C.truncated(config, args.layers)
    model = C.random_network("transformer", config, mx.bfloat16, None if args.bits == 16 else args.bits)
    positive = C.random_conditioning(1, 256, mx.bfloat16, seed=1)
    negative = C.random_conditioning(1, 256, mx.bfloat16, seed=2)
    sigmas, sampler = C.schedule(28)
    noise = mx.random.normal((1, args.size // 8, args.size // 8, 16))
    print(f"{C.machine_title(C.machine_info())}: {name} {args.size}² {args.bits}-bit"
          + (f" ({args.layers} layers)" if args.layers else ""))
    for split in (False, True):
        den, _ = C.make_denoiser(model, positive, negative, sigmas=sigmas, split_cfg=split)
        x = C.denoise_step(den, noise, 0, sampler)  # warm-up (compiles)
        mx.eval(x)
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        timing = C.time_calls(lambda: C.denoise_step(den, noise, 1, sampler), C.mlx_sync, 0, args.steps)
        print(f"  split_cfg={split}: {timing.median * 1e3:.1f} ms/step, "
              f"peak above resident {(mx.get_peak_memory() - base) / 1e9:.2f} GB")


if __name__ == "__main__":
    main()

"""One rank of the distributed tests (tests/test_distributed.py starts it under mlx.launch).

Runs a CFG-parallel generation through the Python API and saves this rank's final latents as
rank<R>-<dtype>.npy in --out (--bf16-too: then a bfloat16 one without skip-layer guidance),
and what the group agreed on (ranks on this host, memory budget, random seeds) as rank<R>.json. --die-at-step / --stall-at-step make rank 1 exit / stop answering after
that step, from the step callback (the way a crash or a hung host looks to its peer).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np

from sd35_mlx import GenerationSettings, SD35Pipeline
from sd35_mlx.distributed import CFGExchange, Ranks, agree_on_budget, agree_on_seeds, exit_on_terminate


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--slg", action="store_true")
    p.add_argument("--bf16-too", action="store_true")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--timeout", type=float, default=60.0, help="peer timeout from step 1 on (before: 60 s)")
    p.add_argument("--die-at-step", type=int)
    p.add_argument("--stall-at-step", type=int)
    args = p.parse_args()

    ranks = Ranks.init(timeout_s=60.0)  # the ranks start and load at their own pace
    exit_on_terminate(ranks.rank)
    exchange = CFGExchange(ranks)
    agreed = dict(on_this_host=ranks.on_this_host(),
                  budget=agree_on_budget(ranks, 12.0 if ranks.rank == 0 else 16.0, machine_wide=True),
                  seeds=[job.seed for job in agree_on_seeds(ranks, [GenerationSettings()] * 3)])  # fmt: skip
    (Path(args.out) / f"rank{ranks.rank}.json").write_text(json.dumps(agreed))
    runs = [(args.dtype, args.slg)] + ([("bfloat16", False)] if args.bf16_too else [])

    def callback(info):
        if info.step == 1:
            exchange.ranks = replace(ranks, timeout_s=args.timeout)
        if ranks.rank == 1 and info.step == args.die_at_step:
            print("rank 1: exiting on purpose", file=sys.stderr, flush=True)
            os._exit(3)
        if ranks.rank == 1 and info.step == args.stall_at_step:
            print("rank 1: stalling on purpose", file=sys.stderr, flush=True)
            time.sleep(600)

    for dtype, slg in runs:
        pipe = SD35Pipeline.from_pretrained(args.model, dtype=getattr(mx, dtype))
        result = pipe.generate(
            "a red fox", negative_prompt="fog", width=64, height=48, steps=args.steps, cfg=4.0, seed=7,
            t5_length=77, skip_layer_guidance=dict(layers=(1,), scale=2.0, start=0.0, end=0.6) if slg else None,
            cfg_exchange=exchange, callback=callback,
        )  # fmt: skip
        np.save(Path(args.out) / f"rank{ranks.rank}-{dtype}.npy", np.array(result.latents))
    return 0


if __name__ == "__main__":
    sys.exit(main())

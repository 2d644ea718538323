"""Reading weights from a safetensors file into MLX: the default stream against the CPU stream.

    python benchmarks/bench_weight_read.py --gb 2 --write-docs

A file of --gb gigabytes of bf16 tensors (6144 × 4096 each, the size of a large Linear) is
written once (warm file cache: the figures are reading from memory, not from the disk), then
read --repeat times per way, interleaved:
- `mx.load`, evaluated on the default stream (what the loaders do,
  `sd35_mlx.weights.safetensors_file.lazy_tensors`; on CUDA each tensor is read into a fresh
  malloc'ed host buffer, then copied to the device);
- `mx.load(..., stream=mx.cpu)`: read straight into MLX's own buffer (on CUDA: managed memory).
Each read is followed by one reduction of every tensor on the default device. That pass over
the tensors is friendlier to managed memory than a denoising step is: the CPU-stream way wins
here and lost in a real first image (see safetensors_file's docstring). GB/s = file bytes /
seconds.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Callable, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402
import mlx.core as mx  # noqa: E402

from sd35_mlx.weights.safetensors_file import lazy_tensors  # noqa: E402

TENSOR_SHAPE = (6144, 4096)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=2.0, help="file size in GB")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--workdir", type=Path, default=None, help="where the file goes (default: a temp dir)")
    C.add_output_args(p)
    return p.parse_args(argv)


def write_file(path: Path, gb: float) -> int:
    per = TENSOR_SHAPE[0] * TENSOR_SHAPE[1] * 2
    count = max(1, round(gb * 1e9 / per))
    tensors = {f"w{i}": mx.random.normal(TENSOR_SHAPE).astype(mx.bfloat16) for i in range(count)}
    mx.eval(tensors)
    mx.save_safetensors(str(path), tensors)
    del tensors
    mx.clear_cache()
    return count * per


def first_use(tensors: Dict[str, mx.array]) -> None:
    mx.eval([t.astype(mx.float32).sum() for t in tensors.values()])


def ways(path: Path) -> Dict[str, Callable[[], None]]:
    def default_stream():
        t = lazy_tensors(path)
        mx.eval(list(t.values()))
        first_use(t)

    def cpu_stream():
        t = dict(mx.load(str(path), stream=mx.cpu))
        mx.eval(list(t.values()))
        first_use(t)

    return {"mx.load, default stream": default_stream, "mx.load, CPU stream": cpu_stream}


def main(argv=None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    info = C.machine_info()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        path = Path(tmp) / "weights.safetensors"
        nbytes = write_file(path, args.gb)
        runs = ways(path)
        seconds: Dict[str, List[float]] = {name: [] for name in runs}
        for _ in range(args.repeat):
            for name, run in runs.items():
                mx.clear_cache()
                start = time.perf_counter()
                run()
                seconds[name].append(time.perf_counter() - start)
                mx.clear_cache()
        os.remove(path)
    base = median(seconds["mx.load, default stream"])
    rows = []
    for name, ts in seconds.items():
        s = median(ts)
        rows.append([name, f"{s:.2f} s", f"{nbytes / s / 1e9:.2f} GB/s", C.fmt_ratio(s / base)])
        print(f"{name}: {s:.3f} s, {nbytes / s / 1e9:.2f} GB/s", flush=True)
    body = "\n".join([
        "### Reading weights: default stream against the CPU stream (`benchmarks/bench_weight_read.py`)",
        "",
        f"_{C.versions_line(info)}_  ",
        f"_command: `{info['command']}`_",
        "",
        f"{nbytes / 1e9:.2f} GB of bf16 tensors from a just-written file (warm file cache), each read followed by "
        f"a reduction of every tensor on the default device; median of {args.repeat}.",
        "",
        C.markdown_table(["way", "time", "rate", "vs default stream"], rows),
    ])  # fmt: skip
    payload = {"bytes": nbytes, "seconds": seconds, "wall_s": time.perf_counter() - started}
    C.publish(args, info, "weight-read", body, payload, print)


if __name__ == "__main__":
    main()

"""Where the VAE decode's time goes: each kind of op at the decoder's real shapes.

    python benchmarks/profile_vae.py --size 512 [--torch]

Times (median of --repeat, after a warm-up) a 3x3 conv, our GroupNorm and alternatives,
nearest upsampling and the mid-block attention at every decoder level, with PyTorch's
equivalents on the same shapes when --torch is given. Prints a table; nothing is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from sd35_mlx.config import SD3_VAE
from sd35_mlx.models.vae import VAE, GroupNorm

sys.path.insert(0, str(Path(__file__).parent))
import common as C  # noqa: E402


def timed(fn, repeat: int) -> float:
    return C.time_calls(fn, C.mlx_sync, 1, repeat).median


def torch_timed(fn, repeat: int) -> float:
    import torch

    return C.time_calls(fn, lambda _: torch.cuda.synchronize(), 1, repeat).median


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--torch", action="store_true")
    args = p.parse_args()
    dt = mx.bfloat16
    s = args.size
    levels = [(s // 8, 512), (s // 4, 512), (s // 2, 512), (s // 1, 256), (s, 128)]
    rows = []
    for side, c in levels:
        x = mx.random.normal((1, side, side, c)).astype(dt)
        conv = nn.Conv2d(c, c, 3, padding=1)
        conv.set_dtype(dt)
        gn = GroupNorm(32, c, 1e-6)
        rows.append((f"conv3x3 {side}² c{c}", timed(lambda: conv(x), args.repeat)))
        rows.append((f"groupnorm {side}² c{c}", timed(lambda: gn(x), args.repeat)))
        rows.append((f"silu {side}² c{c}", timed(lambda: nn.silu(x), args.repeat)))
        if args.torch:
            import torch

            tx = torch.randn(1, c, side, side, device="cuda", dtype=torch.bfloat16)
            tconv = torch.nn.Conv2d(c, c, 3, padding=1).cuda().to(torch.bfloat16)
            tgn = torch.nn.GroupNorm(32, c, 1e-6).cuda().to(torch.bfloat16)
            with torch.no_grad():
                rows.append((f"  torch conv3x3 {side}² c{c}", torch_timed(lambda: tconv(tx), args.repeat)))
                rows.append((f"  torch groupnorm {side}² c{c}", torch_timed(lambda: tgn(tx), args.repeat)))
    z = mx.random.normal((1, s // 8, s // 8, 16)).astype(dt)
    vae = VAE(SD3_VAE, with_encoder=False)
    vae.set_dtype(dt)
    mx.eval(vae.parameters())
    mid = vae.decoder.mid if hasattr(vae.decoder, "mid") else None
    if mid is not None:
        h = mx.random.normal((1, s // 8, s // 8, 512)).astype(dt)
        rows.append((f"mid attention {s // 8}²", timed(lambda: mid.attention(h), args.repeat)))
    rows.append((f"whole decode {s}²", timed(lambda: vae.decode(z), 2)))
    print(f"{'op':40s} {'ms':>10s}")
    for name, sec in rows:
        print(f"{name:40s} {sec * 1e3:10.2f}")


if __name__ == "__main__":
    main()

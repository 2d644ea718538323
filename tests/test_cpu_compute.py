"""16-bit weights computed in float32 on the CPU (cpu_compute.py), and the OpenBLAS preload
(cpu_blas.py). The float32 path must equal a float32 computation on the same (16-bit) weights,
and leave the stored weights and the activations' dtype as they were."""

from __future__ import annotations

import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from sd35_mlx import cpu_blas
from sd35_mlx.backend import KERNELS, compute_in_float32
from sd35_mlx.cpu_compute import Float32Conv2d, Float32Linear, use_float32_compute, use_native_compute

on_cpu = pytest.mark.skipif(mx.default_device().type != mx.DeviceType.cpu, reason="the float32 path is the CPU's")


def _net(dtype):
    net = nn.Sequential(nn.Linear(32, 48), nn.Linear(48, 16, bias=False), nn.Conv2d(4, 8, 3, padding=1))
    net.set_dtype(dtype)
    mx.eval(net.parameters())
    return net


@on_cpu
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_float32_compute_equals_float32_math_on_the_same_weights(dtype):
    net = _net(dtype)
    x = mx.random.normal((3, 32), key=mx.random.key(0)).astype(dtype)
    z = mx.random.normal((1, 6, 6, 4), key=mx.random.key(1)).astype(dtype)
    stored = {k: v for k, v in tree_flatten(net.parameters())}
    assert use_float32_compute(net) == 3
    assert isinstance(net.layers[0], Float32Linear) and isinstance(net.layers[2], Float32Conv2d)
    # the parameters are the same arrays, still 16-bit
    assert all(v is stored[k] and v.dtype == dtype for k, v in tree_flatten(net.parameters()))
    y = net.layers[1](net.layers[0](x))
    c = net.layers[2](z)
    assert y.dtype == dtype and c.dtype == dtype
    w0, b0, w1 = (stored[k].astype(mx.float32) for k in ("layers.0.weight", "layers.0.bias", "layers.1.weight"))
    ref = ((x.astype(mx.float32) @ w0.T + b0).astype(dtype).astype(mx.float32) @ w1.T).astype(dtype)
    ref_c = (mx.conv2d(z.astype(mx.float32), stored["layers.2.weight"].astype(mx.float32), padding=1)
             + stored["layers.2.bias"].astype(mx.float32)).astype(dtype)  # fmt: skip
    assert mx.array_equal(y, ref) and mx.array_equal(c, ref_c)
    assert use_native_compute(net) == 3 and type(net.layers[0]) is nn.Linear


@on_cpu
def test_float32_compute_only_where_it_helps():
    assert use_float32_compute(_net(mx.float32)) == 0  # already float32
    with KERNELS.overridden(cpu_float32=False):
        assert not compute_in_float32(mx.bfloat16)
        assert use_float32_compute(_net(mx.bfloat16)) == 0
    assert compute_in_float32(mx.bfloat16) and not compute_in_float32(mx.float32)
    assert not compute_in_float32(mx.bfloat16, mx.Device(mx.gpu))


def _blas_child(env):
    code = ("import sd35_mlx, mlx.core; from sd35_mlx import cpu_blas; print('BLAS', cpu_blas.loaded())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    return out.split("BLAS ", 1)[1].strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the preload is for MLX's Linux CPU wheel")
def test_openblas_is_preloaded_when_present_and_can_be_turned_off(monkeypatch):
    import os

    env = {k: v for k, v in os.environ.items() if k != cpu_blas.ENV}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    present = cpu_blas.mlx_links_reference_blas() and any(os.path.exists(p) for p in cpu_blas.CANDIDATES)
    loaded = _blas_child(env)
    if present:
        assert loaded != "None" and "openblas" in loaded
    else:
        assert loaded == "None"
    assert _blas_child({**env, cpu_blas.ENV: "off"}) == "None"
    assert _blas_child({**env, cpu_blas.ENV: "/nonexistent/libopenblas.so"}) == "None"  # a bad path: MLX's own

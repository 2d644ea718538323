"""Compile every CUDA kernel of sd35_mlx with NVRTC, on any machine (no GPU needed).

    pip install nvidia-cuda-nvrtc-cu12 nvidia-cuda-runtime-cu12     # NVRTC and the CUDA headers
    python benchmarks/compile_kernels.py                            # exit status 1 on a compile error

Catches compile errors and register spills (`.local` memory in the PTX) before a device run.
Each kernel is wrapped the way `mx.fast.cuda_kernel` wraps it (template arguments as
constants, inputs `const T*`, outputs `T*`), with cuda_bf16.h / cuda_fp16.h standing in for
MLX's device header; it runs nothing: equality with the plain path is checked on the device
(`profile_kernels.py --check-only`) and by the CUDA-only tests.
"""

from __future__ import annotations

import argparse
import ctypes
import sys
from pathlib import Path
from typing import List, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402
from sd35_mlx import fast_quantized as fq  # noqa: E402
from sd35_mlx.models import block_kernels_cuda as bk  # noqa: E402
from sd35_mlx.models import joint_heads as jh  # noqa: E402

CTYPES = {"bfloat16": "__nv_bfloat16", "float16": "__half", "float32": "float"}


def wrap(name: str, header: str, inputs: Sequence[str], outputs: Sequence[str], template, body: str, ctype: str,
         input_types: Sequence[str] = ()) -> str:  # fmt: skip
    src = "#include <cuda_bf16.h>\n#include <cuda_fp16.h>\ntypedef unsigned int uint32_t;\n" + header + "\nnamespace mlx::core::cu {\n"
    types = list(input_types) + [ctype] * (len(inputs) - len(input_types))
    params = [f"    const {t}* {n}" for t, n in zip(types, inputs)] + [f"    {ctype}* {n}" for n in outputs]
    src += f"__global__ void {name}(\n" + ",\n".join(params) + ") {\n"
    for key, value in template:
        if key == "T":
            src += f"  using T = {ctype};\n"
        elif isinstance(value, bool):
            src += f"  constexpr bool {key} = {'true' if value else 'false'};\n"
        else:
            src += f"  constexpr int {key} = {value};\n"
    return src + body + "\n}\n}\n"


def kernels(ctype: str) -> List[Tuple[str, str]]:
    """(label, full source) of every kernel variant the package launches, at SD3.5 Large's shapes."""
    out = []
    for streams in (1, 2):
        for residual in (False, True):
            names_in, names_out, body = bk.norm_source(streams, residual)
            template = [("T", None), ("H", 2432), ("RES", residual), ("THREADS", bk.norm_threads(2432, mx.float32 if ctype == "float" else mx.float16))]
            template += [(k, v) for i in range(streams) for k, v in ((f"ROWS{i}", 8192), (f"N{i}", 4096))]
            out.append((f"norm_modulate streams={streams} residual={residual}",
                        wrap("sd35_norm", bk.HEADER, names_in, names_out, template, body, ctype)))  # fmt: skip
    for count in (1, 2):
        names_in, names_out, body = bk.gelu_source(count)
        template = [("T", None)] + [(k, v) for i in range(count) for k, v in ((f"SIZE{i}", 1000), (f"THREADS{i}", 125))]
        out.append((f"gelu_tanh arrays={count}", wrap("sd35_gelu", bk.HEADER, names_in, names_out, template, body, ctype)))
    for norm in (True, False):
        template = [("T", None), ("B", 2), ("NC", 333), ("NX", 4096), ("HEADS", 38), ("NORM", norm)]
        out.append((f"joint_heads norm={norm}", wrap("sd35_joint_heads", jh.HEADER, list(jh.INPUT_NAMES),
                                                     list(jh.OUTPUT_NAMES), template, jh.SOURCE, ctype)))  # fmt: skip
    for bits in (4, 8):
        template = [("T", None), ("BITS", bits), ("GROUP", 64), ("WORDS", 4096)]
        out.append((f"dequantize bits={bits}", wrap("sd35_dequantize", fq.DEQUANTIZE_HEADER, ["w", "scales", "biases"],
                                                    ["out"], template, fq.DEQUANTIZE_SOURCE, ctype,
                                                    input_types=["uint32_t"])))  # fmt: skip
        names_in, names_out, body = fq.dequantize_many_source(3)
        template = [("T", None), ("BITS", bits), ("GROUP", 64)] + [(f"WORDS{i}", 4096 * (i + 1)) for i in range(3)]
        out.append((f"dequantize 3 weights bits={bits}", wrap("sd35_dequantize_3", fq.DEQUANTIZE_HEADER, names_in, names_out,
                                                              template, body, ctype,
                                                              input_types=["uint32_t", ctype, ctype] * 3)))  # fmt: skip
    return out


def compile_ptx(lib, source: str, include: str, arch: str) -> Tuple[bool, str, str]:
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"kernel.cu", 0, None, None):
        return False, "nvrtcCreateProgram failed", ""
    options = [f"--gpu-architecture={arch}".encode(), b"-std=c++17", f"-I{include}".encode(), b"-default-device"]
    rc = lib.nvrtcCompileProgram(prog, len(options), (ctypes.c_char_p * len(options))(*options))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    ptx = ""
    if rc == 0:
        lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
        buf = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetPTX(prog, buf)
        ptx = buf.value.decode(errors="replace")
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return rc == 0, log.value.decode(errors="replace").strip(), ptx


def find_nvidia(sub: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
    for root in roots:
        path = Path(root) / sub
        if path.exists():
            return path
    raise SystemExit(f"nvidia/{sub} not found: pip install nvidia-cuda-nvrtc-cu12 nvidia-cuda-runtime-cu12")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="compute_90", help="NVRTC --gpu-architecture (default: Hopper)")
    args = p.parse_args(argv)
    lib = ctypes.CDLL(str(next(find_nvidia("cuda_nvrtc/lib").glob("libnvrtc.so*"))))
    include = str(find_nvidia("cuda_runtime/include"))
    failed = 0
    for dtype in ("bfloat16", "float16", "float32"):
        for label, source in kernels(CTYPES[dtype]):
            ok, log, ptx = compile_ptx(lib, source, include, args.arch)
            spills = ptx.count(".local")
            print(f"{'ok  ' if ok and not spills else 'FAIL'} {dtype:9s} {label}" + (f" ({spills} local-memory uses)" if spills else ""))
            if log and not ok:
                print(log[:4000])
            failed += (not ok) or bool(spills)
    print("all kernels compile" if not failed else f"{failed} kernel(s) failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

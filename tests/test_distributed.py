"""Distributed generation on the CPU: `mlx.launch --backend ring -n 2` on the loopback address.

The tests start the ranks themselves (each launch bounded in time) on a tiny random model:
data-parallel images byte-identical to a single process's, CFG-parallel latents within the
bound of docs/distributed.md, and a rank that dies or hangs makes the other one stop with a
clear message instead of waiting forever. mlx.launch itself exits 0 whatever its ranks do,
so the checks read the ranks' messages and files.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from tiny_model import TinySpec, make_tiny_model

from sd35_mlx import SD35Pipeline
from sd35_mlx.distributed import EXIT_PEER_LOST, Ranks, check_cfg_parallel, check_data_parallel, mlx_launch_command
from sd35_mlx.errors import InputError
from sd35_mlx.generate import main
from sd35_mlx.images import unique_paths

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("dist_worker.py")
FP32_BOUND = 1e-5  # max|Δ| / max|ref| of the final latents, CFG-parallel against one process
BF16_BOUND = 1e-2
CLI_ARGS = ["-W", "64", "-H", "48", "--steps", "3", "--cfg", "4", "--t5-length", "77", "--dtype", "float32", "-q"]


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_dist")
    make_tiny_model(root, TinySpec(seed=1))
    return root


def _free_port_pair() -> int:
    """A port p with p and p + 1 free on 127.0.0.1 (the ring listens on one per rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports")


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    return env


def launch(*command: str, cwd: Path = ROOT, timeout: float = 120) -> subprocess.CompletedProcess:
    """`mlx.launch --backend ring -n 2 python COMMAND…` with its output."""
    return subprocess.run(
        [*mlx_launch_command(), "--backend", "ring", "-n", "2", "--starting-port", str(_free_port_pair()), sys.executable, *command],
        cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


@pytest.fixture(scope="module")
def single_process(tiny_root, tmp_path_factory):
    """3 prompts × 1 seed by one process, into a folder that already holds the first name:
    (the CLI arguments, the folder)."""
    root = tmp_path_factory.mktemp("single")
    prompts = root / "prompts.txt"
    prompts.write_text("a red fox\n# skipped\na blue bird\n\na green frog\n")
    args = ["--model", str(tiny_root), "--prompt-file", str(prompts), "--seed", "11", *CLI_ARGS]
    out = _folder_with_a_taken_name(root / "out")
    assert main([*args, "-o", str(out / "img.png")]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["img-1.png", "img-2.png", "img-3.png", "img.png"]
    return args, out


def _folder_with_a_taken_name(folder: Path) -> Path:
    folder.mkdir()
    (folder / "img.png").write_bytes(b"already here")
    return folder


def _reported(stdout: str) -> list:
    return [Path(ln).name for ln in stdout.splitlines() if ln.endswith(".png")]


def test_data_parallel_writes_the_single_process_files(single_process, tmp_path):
    """Over 2 ranks (2 + 1 images): the same names and the same bytes as one process writes;
    rank 0 reports every image, its own and rank 1's, once."""
    args, single = single_process
    dist = _folder_with_a_taken_name(tmp_path / "dist")
    r = launch("-m", "sd35_mlx.generate", *args, "-o", str(dist / "img.png"))
    names = sorted(p.name for p in single.iterdir())
    assert sorted(p.name for p in dist.iterdir()) == names, r.stdout + r.stderr
    for name in names:
        assert (dist / name).read_bytes() == (single / name).read_bytes(), name
    assert sorted(_reported(r.stdout)) == names[:-1], r.stdout


def test_cfg_parallel_cli_writes_on_rank_0_only(single_process, tmp_path):
    args, single = single_process
    cfg = _folder_with_a_taken_name(tmp_path / "cfg")
    r = launch("-m", "sd35_mlx.generate", *args, "--cfg-parallel", "-o", str(cfg / "img.png"))
    names = ["img-1.png", "img-2.png", "img-3.png"]
    assert _reported(r.stdout) == names, r.stdout + r.stderr  # rank 0 only, once each
    for name in names:
        a, b = (np.asarray(Image.open(d / name), dtype=np.int16) for d in (single, cfg))
        assert np.abs(a - b).max() <= 1, name


def test_cfg_parallel_latents_equal_one_process(tiny_root, tmp_path):
    """Both ranks end with the same latents, within the bound of the single-process ones
    (fp32 with skip-layer guidance: its extra pass runs on rank 0; bf16 without)."""
    r = launch(str(WORKER), "--model", str(tiny_root), "--out", str(tmp_path), "--slg", "--bf16-too")
    assert r.returncode == 0 and (tmp_path / "rank1-bfloat16.npy").is_file(), r.stdout + r.stderr
    # what the group agreed on: 2 ranks on this host, the smallest budget split between them
    # (12 and 16 GB machine-wide -> 6 GB each), rank 0's random seeds on both
    agreed = [json.loads((tmp_path / f"rank{k}.json").read_text()) for k in (0, 1)]
    assert agreed[0] == agreed[1] and agreed[0]["on_this_host"] == 2 and agreed[0]["budget"] == 6.0, agreed
    assert len(set(agreed[0]["seeds"])) == 3, agreed
    for dtype, slg, bound in (("float32", True, FP32_BOUND), ("bfloat16", False, BF16_BOUND)):
        pipe = SD35Pipeline.from_pretrained(tiny_root, dtype=getattr(mx, dtype))
        ref = np.array(pipe.generate(
            "a red fox", negative_prompt="fog", width=64, height=48, steps=4, cfg=4.0, seed=7, t5_length=77,
            skip_layer_guidance=dict(layers=(1,), scale=2.0, start=0.0, end=0.6) if slg else None,
        ).latents)  # fmt: skip
        rank0, rank1 = (np.load(tmp_path / f"rank{k}-{dtype}.npy") for k in (0, 1))
        assert np.array_equal(rank0, rank1), dtype
        assert np.abs(rank0 - ref).max() / np.abs(ref).max() <= bound, dtype


def test_a_dying_rank_stops_the_other(tiny_root, tmp_path):
    """Rank 1 exits after step 2: rank 0 stops at once, saying why (the ring's lost
    connection, or mlx.launch's SIGTERM when it is faster), and writes nothing."""
    t0 = time.perf_counter()
    r = launch(str(WORKER), "--model", str(tiny_root), "--out", str(tmp_path), "--die-at-step", "2", timeout=60)
    assert time.perf_counter() - t0 < 50
    out = r.stdout + r.stderr
    assert "rank 1: exiting on purpose" in out
    assert "rank 0: lost the other ranks while exchanging the CFG velocities" in out or "rank 0: stopped by the launcher" in out, out
    assert not list(tmp_path.glob("*.npy"))


def test_a_dying_rank_without_the_launcher(tiny_root, tmp_path):
    """Ranks started by hand (MLX_RANK / MLX_HOSTFILE, as on two hosts): nobody sends SIGTERM,
    so rank 0 sees the ring's lost connection and exits with a DistributedError."""
    port = _free_port_pair()
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(f'[["127.0.0.1:{port}"], ["127.0.0.1:{port + 1}"]]')
    procs = [
        subprocess.Popen([sys.executable, str(WORKER), "--model", str(tiny_root), "--out", str(tmp_path), "--die-at-step", "2"],
                         cwd=ROOT, env={**_env(), "MLX_RANK": str(k), "MLX_HOSTFILE": str(hostfile)},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for k in (0, 1)
    ]  # fmt: skip
    try:
        outs = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert procs[1].returncode == 3
    assert procs[0].returncode not in (0, None)
    assert "DistributedError: rank 0: lost the other ranks while exchanging the CFG velocities" in outs[0][1], outs[0]


def test_a_hanging_rank_stops_the_other_after_the_timeout(tiny_root, tmp_path):
    """Rank 1 stops answering (sleeps) after step 2: rank 0's watchdog ends it after the
    peer timeout (2 s from step 1 on) with a message, and mlx.launch then stops rank 1."""
    t0 = time.perf_counter()
    r = launch(str(WORKER), "--model", str(tiny_root), "--out", str(tmp_path), "--stall-at-step", "2",
               "--timeout", "2", timeout=60)  # fmt: skip
    assert time.perf_counter() - t0 < 50
    out = r.stdout + r.stderr
    assert "rank 1: stalling on purpose" in out
    assert "rank 0: no answer from the other ranks for 2 s while exchanging the CFG velocities of step 3" in out, out
    assert f"Node with rank 0 exited with code {EXIT_PEER_LOST}" in out, out
    assert "rank 1: stopped by the launcher" in out, out


# ---- without launching ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--cfg-parallel"], "exactly 2 ranks; this group has 1"),
        (["--cfg-parallel", "--cfg", "1"], "exactly 2 ranks"),
        (["--peer-timeout", "0"], "peer timeout must be a positive number"),
        (["--peer-timeout", "nan"], "peer timeout must be a positive number"),
    ],
)
def test_cli_errors_before_loading(extra, message, capsys, monkeypatch):
    import sd35_mlx.pipeline as pipeline_module

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(pipeline_module.SD35Pipeline, "from_pretrained", no_loading)
    assert main(["--model", "/nonexistent-model", "--prompt", "x", *extra]) == 2
    assert message in capsys.readouterr().err


def test_the_rules_of_each_mode():
    check_cfg_parallel(2, 4.5)
    for size in (1, 3, 4):
        with pytest.raises(InputError, match=f"exactly 2 ranks; this group has {size}"):
            check_cfg_parallel(size)
    for cfg in (1.0, 0.0):
        with pytest.raises(InputError, match="needs classifier-free guidance"):
            check_cfg_parallel(2, cfg)
    assert Ranks.init(timeout_s=float("inf")).timeout_s is None  # no limit
    with pytest.raises(InputError, match="3 ranks for 2 image"):
        check_data_parallel(Ranks(rank=0, size=3), 2)
    # round-robin, every job exactly once
    jobs = list("abcdefg")
    shards = [Ranks(rank=r, size=3).shard(jobs) for r in range(3)]
    assert shards[1] == [(1, "b"), (4, "e")]
    assert sorted(i for s in shards for i, _ in s) == list(range(len(jobs)))


def test_output_names_are_planned_as_successive_saves_name_them(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "a-2.png").write_bytes(b"x")
    assert [p.name for p in unique_paths(tmp_path / "a", 3)] == ["a-1.png", "a-3.png", "a-4.png"]


def test_what_counts_as_launched(tmp_path, monkeypatch):
    from sd35_mlx.distributed import launched

    for v in ("MLX_HOSTFILE", "MLX_WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MLX_JACCL_COORDINATOR"):
        monkeypatch.delenv(v, raising=False)
    assert not launched()
    hosts = tmp_path / "hosts.json"
    hosts.write_text("\n")  # what `mlx.launch -n 1` writes: a group of one
    monkeypatch.setenv("MLX_HOSTFILE", str(hosts))
    assert not launched()
    hosts.write_text('[["127.0.0.1:5000"], ["127.0.0.1:5001"]]')
    assert launched()
    monkeypatch.delenv("MLX_HOSTFILE")
    monkeypatch.setenv("MLX_WORLD_SIZE", "1")
    assert not launched()
    monkeypatch.setenv("MLX_WORLD_SIZE", "2")  # NCCL
    assert launched()

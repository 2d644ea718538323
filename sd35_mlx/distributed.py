"""Generation spread over several processes with MLX's own engine (`mx.distributed`, started
by `mlx.launch`): no transport of our own.

Two ways to use the ranks (docs/distributed.md):
* **data-parallel** (any number of ranks): the jobs (prompts × seeds) are dealt round-robin,
  job i to rank i mod N; every rank writes its own images under the names and with the bits
  a single process would (the names are planned before anything is written, random seeds
  are drawn by rank 0 and shared); rank 0 reports.
* **CFG-parallel** (exactly 2 ranks, cfg > 1): rank 0 runs the conditional pass (and, on
  skip-layer-guidance steps, the skip pass), rank 1 the unconditional one, each with its half
  of the conditioning; one `all_gather` per step exchanges the velocities and both ranks then
  apply the same guidance and sampler update, so their latents stay equal to each other and
  to a single process's (`CFGExchange`, used by `denoise.Denoiser`).

Bounded waits. A peer that dies closes its sockets and the ring backend raises at once
(`DistributedError` here). A peer that hangs, or a host that drops off the network, makes
a collective (and `mx.distributed.init`) wait forever, and so would NCCL: every collective
here runs under a watchdog that, after `timeout_s` without an answer, logs which wait
timed out and ends the process (`EXIT_PEER_LOST`). Ending the process is the only way out
of a collective that never returns; `timeout_s=None` turns the watchdog off.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, TypeVar

import mlx.core as mx
import numpy as np

from .errors import DistributedError, InputError

logger = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_TIMEOUT_S = 300.0  # covers a rank loading its model more slowly than its peer
EXIT_PEER_LOST = 75  # the watchdog's exit status (EX_TEMPFAIL: running again may work)
EXIT_TERMINATED = 143  # 128 + SIGTERM, as a shell reports it


def mlx_launch_command() -> List[str]:
    """How to run this Python environment's `mlx.launch` (its console script, or the module
    behind it where the script is not on disk, e.g. wheels installed with --target)."""
    script = Path(sys.executable).with_name("mlx.launch")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from mlx._distributed_utils.launch import main; sys.exit(main())"]


def launched() -> bool:
    """Whether a launcher started this process as one rank of several: mlx.launch's ring /
    JACCL hosts file (empty for `-n 1`), its NCCL world size, or mpirun's."""
    hostfile = os.environ.get("MLX_HOSTFILE")
    if hostfile and Path(hostfile).is_file() and Path(hostfile).read_text().strip():
        return True
    sizes = (os.environ.get(v, "") for v in ("MLX_WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"))
    return any(v.isdigit() and int(v) > 1 for v in sizes) or bool(os.environ.get("MLX_JACCL_COORDINATOR"))


# ---- the watchdog -----------------------------------------------------------------------------
def _give_up(rank: int, what: str, seconds: float) -> None:
    logger.critical(
        "rank %d: no answer from the other ranks for %g s while %s: a rank has died or hangs "
        "(its own message, if any, is above). Stopping this rank (exit %d).",
        rank, seconds, what, EXIT_PEER_LOST,
    )  # fmt: skip
    logging.shutdown()
    os._exit(EXIT_PEER_LOST)


@contextmanager
def deadline(seconds: Optional[float], rank: int, what: str) -> Iterator[None]:
    """End the process if the block has not finished within `seconds` (None: no limit).

    A thread does it: `mx.eval` releases the GIL while a collective waits."""
    if seconds is None:
        yield
        return
    timer = threading.Timer(seconds, _give_up, args=(rank, what, seconds))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def exit_on_terminate(rank: int) -> None:
    """Say why and exit at once on SIGTERM, even while a collective blocks the main thread.

    mlx.launch ends the other ranks with SIGTERM when one fails; Python's own handler would
    only run once the blocked call returns, which may be never. The C-level handler writes
    the signal number to a pipe that a thread watches. Call from the main thread (CLIs)."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd)
    signal.signal(signal.SIGTERM, lambda *_: None)  # a Python handler, so the wakeup byte is written

    def watch() -> None:
        while True:
            if signal.SIGTERM in os.read(read_fd, 64):
                logger.critical("rank %d: stopped by the launcher (mlx.launch stops every rank when one "
                                "fails; that rank's message is above).", rank)  # fmt: skip
                logging.shutdown()
                os._exit(EXIT_TERMINATED)

    threading.Thread(target=watch, name="sd35-sigterm", daemon=True).start()


# ---- the group ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Ranks:
    """This process's place in the group: `rank` of `size`, with bounded collectives.

    `Ranks.init()` joins the group the launcher set up (a group of one when not launched)."""

    group: Optional[mx.distributed.Group] = None
    rank: int = 0
    size: int = 1
    timeout_s: Optional[float] = DEFAULT_TIMEOUT_S

    @classmethod
    def init(cls, backend: str = "any", timeout_s: Optional[float] = DEFAULT_TIMEOUT_S) -> "Ranks":
        """Join the group (waits at most `timeout_s` for the other ranks to connect)."""
        if timeout_s is not None and not timeout_s > 0:
            raise InputError(f"the peer timeout must be a positive number of seconds (got {timeout_s})")
        if timeout_s == math.inf:
            timeout_s = None  # no limit
        if not launched():
            return cls(timeout_s=timeout_s)
        rank = int(os.environ.get("MLX_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")) or 0)
        with deadline(timeout_s, rank, "waiting for the other ranks to connect (mx.distributed.init)"):
            try:
                group = mx.distributed.init(strict=True, backend=backend)
            except RuntimeError as e:
                raise DistributedError(f"rank {rank}: could not join the distributed group ({e})") from e
        return cls(group=group, rank=group.rank(), size=group.size(), timeout_s=timeout_s)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that reports."""
        return self.rank == 0

    def owner(self, index: int) -> int:
        """The rank that runs job `index` in data-parallel mode (round-robin)."""
        return index % self.size

    def shard(self, items: Sequence[T]) -> List[Tuple[int, T]]:
        """This rank's (index, item) pairs of `items`, dealt round-robin."""
        return [(i, item) for i, item in enumerate(items) if self.owner(i) == self.rank]

    # ---- collectives, evaluated here under the watchdog ----
    def _run(self, op, x: mx.array, what: str, extra_wait_s: float = 0.0) -> mx.array:
        if self.size == 1:
            return op(x, group=self.group) if self.group is not None else x
        limit = None if self.timeout_s is None else self.timeout_s + extra_wait_s
        with deadline(limit, self.rank, what):
            try:
                out = op(x, group=self.group)
                mx.eval(out)
            except RuntimeError as e:
                raise DistributedError(
                    f"rank {self.rank}: lost the other ranks while {what} ({e}); a rank died "
                    "(its own message, if any, is above)"
                ) from e
        return out

    def all_gather(self, x: mx.array, what: str) -> mx.array:
        """Every rank's `x` concatenated along axis 0, in rank order."""
        return self._run(mx.distributed.all_gather, x, what)

    def all_sum(self, x: mx.array, what: str, extra_wait_s: float = 0.0) -> mx.array:
        return self._run(mx.distributed.all_sum, x, what, extra_wait_s)

    def broadcast_ints(self, values: Sequence[int], what: str) -> List[int]:
        """Rank 0's `values` on every rank (int64; the others' values are ignored)."""
        mine = np.asarray(values, dtype=np.int64) if self.is_main else np.zeros(len(values), np.int64)
        return [int(v) for v in np.array(self.all_sum(mx.array(mine), what))]


    def on_this_host(self) -> int:
        """How many ranks of the group run on this host (this one included)."""
        if self.size == 1:
            return 1
        key = int.from_bytes(hashlib.sha1(socket.gethostname().encode()).digest()[:7], "little")
        keys = np.array(self.all_gather(mx.array([key], dtype=mx.int64), "counting the ranks on each host"))
        return int((keys == key).sum())


def agree_on_budget(ranks: Ranks, budget_gb: float, machine_wide: bool) -> float:
    """The memory budget every rank plans for: the smallest rank's, so all ranks choose the
    same quantization and T5 mode (the same bits). A machine-wide automatic budget is first
    split between the ranks on a host (unified memory: Metal, CPU; a CUDA rank owns its GPU,
    whose memory the budget already is)."""
    if ranks.size == 1:
        return budget_gb
    on_cuda = hasattr(mx, "cuda") and mx.cuda.is_available()
    if machine_wide and not on_cuda:
        budget_gb /= ranks.on_this_host()
    mb = np.array(ranks.all_gather(mx.array([int(budget_gb * 1000)], dtype=mx.int64), "agreeing on the memory budget"))
    return int(mb.min()) / 1000


# ---- data-parallel ---------------------------------------------------------------------------------
def agree_on_seeds(ranks: Ranks, jobs: Sequence) -> list:
    """`jobs` (GenerationSettings) with concrete seeds, the same on every rank: a job without
    one gets rank 0's random draw (as a single process would draw it). One collective, which
    also makes every rank wait until all have planned their output names."""
    drawn = [job.with_seed().seed for job in jobs]
    seeds = ranks.broadcast_ints(drawn, "agreeing on the seeds") if ranks.size > 1 else drawn
    return [replace(job, seed=s) for job, s in zip(jobs, seeds)]


def check_data_parallel(ranks: Ranks, n_jobs: int) -> None:
    if ranks.size > n_jobs:
        raise InputError(
            f"{ranks.size} ranks for {n_jobs} image(s): every rank needs at least one. Use fewer "
            "ranks, more prompts/seeds (--num-images), or --cfg-parallel to run one image's two "
            "CFG passes on 2 ranks"
        )


def gather_done(ranks: Ranks, done: Sequence[int], n_jobs: int, longest_job_s: float) -> np.ndarray:
    """Which jobs every rank finished (1) — rank 0's summary. A rank may still be on its last
    job, so the wait is the peer timeout plus twice this rank's longest job."""
    flags = np.zeros(n_jobs, dtype=np.int64)
    flags[list(done)] = 1
    return np.array(ranks.all_sum(mx.array(flags), "collecting which images were written", 2 * longest_job_s))


# ---- CFG-parallel --------------------------------------------------------------------------------
def check_cfg_parallel(size: int, cfg: Optional[float] = None) -> None:
    """CFG-parallel needs exactly 2 ranks and a CFG model (cfg > 1)."""
    if size != 2:
        raise InputError(
            f"CFG-parallel splits the two CFG passes over exactly 2 ranks; this group has {size}. "
            "Start 2 (mlx.launch -n 2 …, or a hosts file with 2 entries), or leave out "
            "--cfg-parallel for data-parallel generation"
        )
    if cfg is not None and not cfg > 1.0:
        raise InputError(
            f"CFG-parallel needs classifier-free guidance (cfg > 1); with cfg={cfg:g} there is only "
            "the conditional pass to run. Leave out --cfg-parallel (data-parallel) or raise --cfg"
        )


class CFGExchange:
    """The step's collective in CFG-parallel mode (2 ranks).

    Rank 0 runs the conditional pass (plus the skip pass on skip-layer-guidance steps), rank
    1 the unconditional one. `exchange` sends this rank's velocities and returns
    (v_cond, v_uncond, v_skip or None) on both ranks: one `all_gather` per step."""

    def __init__(self, ranks: Ranks):
        check_cfg_parallel(ranks.size)
        self.ranks = ranks
        self.seconds = 0.0  # time spent in the collective (waiting included), for benchmarks

    @property
    def runs_conditional(self) -> bool:
        return self.ranks.rank == 0

    def exchange(self, own: Sequence[mx.array], step: int, with_skip: bool):
        """own: [v_cond] or [v_cond, v_skip] on rank 0, [v_uncond] on rank 1 (float32)."""
        parts = list(own)
        slots = 2 if with_skip else 1  # same shapes on both ranks: rank 1 pads the skip slot
        parts += [mx.zeros_like(parts[0])] * (slots - len(parts))
        mx.eval(parts)  # this rank's passes run before the clock and the watchdog start
        t0 = time.perf_counter()
        both = self.ranks.all_gather(mx.stack(parts), f"exchanging the CFG velocities of step {step + 1}")
        self.seconds += time.perf_counter() - t0
        v_cond, v_uncond = both[0], both[slots]
        return v_cond, v_uncond, (both[1] if with_skip else None)

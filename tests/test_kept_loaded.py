"""Kept loaded (`low_memory=False`, what an app does): memory stays flat over repeated
generations, and every stage runs under the kept-loaded memory limit (resident + the
largest stage's own need + the throttle margin; docs/memory.md)."""

from __future__ import annotations

import mlx.core as mx
import pytest

from tiny_model import TinySpec, make_tiny_model

from sd35_mlx import memory
from sd35_mlx.pipeline import SD35Pipeline

H, W = 64, 96
PROMPT = "a lighthouse on a cliff"


@pytest.fixture(scope="module")
def kept(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_kept")
    make_tiny_model(root, TinySpec())
    return SD35Pipeline.from_pretrained(root, dtype=mx.float32, low_memory=False)


def test_memory_stays_flat_over_repeated_generations(kept):
    peaks, active, cache = [], [], []
    for seed in range(5):
        mx.reset_peak_memory()
        kept.generate(PROMPT, seed=seed, steps=2, width=W, height=H, cfg=4.0)
        peaks.append(mx.get_peak_memory())
        active.append(mx.get_active_memory())
        cache.append(mx.get_cache_memory())
    # nothing accumulates: what stays resident is the weights, the same after every image
    assert max(active) - min(active) <= 0.01 * max(active), active
    assert max(peaks[1:]) - min(peaks[1:]) <= 0.02 * max(peaks[1:]), peaks
    # the peak stays within what is resident + the largest stage's own need (+ the margin)
    assert kept._kept_need is not None and kept._kept_need > 0
    assert max(peaks) <= active[0] + kept._kept_need + memory.throttle_margin(), (peaks, active[0], kept._kept_need)


def test_every_stage_runs_under_the_kept_loaded_limit(kept, monkeypatch, memory_limit_log):
    from sd35_mlx.denoise import Denoiser
    from sd35_mlx.models import vae as vae_module

    current = memory_limit_log
    original = current["original"]
    seen = {}

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            seen.setdefault(name, []).append((current["limit"], mx.get_active_memory()))
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(vae_module.VAE, "decode", spy("decode", vae_module.VAE.decode))
    monkeypatch.setattr(Denoiser, "step", spy("step", Denoiser.step))
    kept.generate(PROMPT, seed=1, steps=3, width=W, height=H, cfg=4.0)
    room = kept._kept_need + memory.throttle_margin()
    assert len(seen["step"]) == 3 and len(seen["decode"]) == 1
    for limit, active in seen["step"] + seen["decode"]:
        # set at the stage's start from what was resident then (active may have grown since)
        assert limit < original and room <= limit <= active + room, (limit, active, room)
    assert current["limit"] == original


def test_the_denoise_steps_share_one_limit_taken_before_the_first(kept, monkeypatch, memory_limit_log):
    """While a step runs the next one is queued (Denoiser.run's queue_ahead), so active memory
    at a step's start includes queued work: a limit taken there would rise with it, step by step."""
    from sd35_mlx.denoise import Denoiser

    current = memory_limit_log
    real_active, calls = mx.get_active_memory, []

    def growing_active():  # as if each step found more queued work alive than the one before
        calls.append(1)
        return real_active() + len(calls) * 10**7

    monkeypatch.setattr(mx, "get_active_memory", growing_active)
    limits = []
    real_step = Denoiser.step
    monkeypatch.setattr(Denoiser, "step", lambda self, *a, **kw: limits.append(current["limit"]) or real_step(self, *a, **kw))
    kept.generate(PROMPT, seed=2, steps=4, width=W, height=H, cfg=4.0)
    assert len(limits) == 4 and len(set(limits)) == 1, limits
    assert limits[0] < current["original"] == current["limit"]


def test_own_need_is_the_largest_stage_above_its_weights():
    from sd35_mlx.config import SD35_MEDIUM_MMDIT

    est = memory.MemoryEstimator(SD35_MEDIUM_MMDIT)
    need = memory.own_need_bytes(est, 1024, 1024)
    decoder = est.decode(1024, 1024, tiled=False)
    assert 0 < need <= max(decoder, est.denoise(None, 1024, 1024, 256))
    with pytest.raises(memory.InputError):
        memory.own_need_bytes(memory.MemoryEstimator(SD35_MEDIUM_MMDIT, trimmed_transformer=True), 1024, 1024)


@pytest.mark.parametrize("factor", [1.3, 2.0, 4.0])
def test_measured_peak_stays_within_the_budget_on_the_cpu(kept, factor):
    """Budget invariant: under memory_budget=B the whole generation's measured peak is ≤ B
    (B a few multiples of the smallest plan's need plus the throttle's margin)."""
    from sd35_mlx.errors import InputError

    root = kept.path
    probe = SD35Pipeline.from_pretrained(root, dtype=mx.float32, memory_budget=100.0, plan_size=(H, W))
    smallest = probe.plan.peak + memory.throttle_margin() + probe.plan.headroom
    budget = int(smallest * factor)
    try:
        pipe = SD35Pipeline.from_pretrained(root, dtype=mx.float32, memory_budget=budget / 1e9, plan_size=(H, W))
    except InputError:  # a tighter plan than the probe's does not exist at this budget: nothing to measure
        pytest.skip("no plan fits")
    mx.clear_cache()
    mx.reset_peak_memory()
    pipe.generate(PROMPT, seed=0, steps=2, width=W, height=H, cfg=4.0)
    assert mx.get_peak_memory() <= budget, (mx.get_peak_memory(), budget, pipe.plan.describe())

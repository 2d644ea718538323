"""Building the next step's graph while the current step runs (Denoiser.run), and queueing it
before waiting for the current one, changes nothing but the timing: the same latents bit for bit,
the same StepInfo sequence; without queueing, step i+1 is never evaluated before step i is handed
over; a consumer that stops leaves nothing running; the pipeline queues ahead only without a
memory budget; and the steps that evaluate or exchange inside (split CFG, CFG-parallel) keep one
step after the other."""

from __future__ import annotations

from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from test_control_pipeline import DEPTH, _controlnet, _image, _mask
from test_denoise import SLG, STEPS, noise, prompts, tiny_model
from test_pipeline import H, NEGATIVE, PROMPT, W, noise_pair
from tiny_model import TinySpec, make_tiny_model

from sd35_mlx.control.settings import ControlNetSettings
from sd35_mlx.denoise import Denoiser
from sd35_mlx.pipeline import SD35Pipeline
from sd35_mlx.sampling import flow_sigmas, make_sampler
from sd35_mlx.settings import GenerationSettings, SkipLayerGuidance, SkipLayerSettings

CASES = {  # Denoiser keywords; SLG is active on steps 1 and 2 of 6
    "single": dict(cfg=1.0, neg=False),
    "cfg+slg": dict(cfg=4.5, neg=True, slg=True),
    "split cfg+slg": dict(cfg=4.5, neg=True, slg=True, split_cfg=True),
}


def make_denoiser(case: str, **kw) -> Denoiser:
    c = dict(CASES[case])
    pos, neg = prompts()
    sigmas = flow_sigmas(STEPS, 3.0)
    return Denoiser(tiny_model(), pos, neg if c.pop("neg") else None, cfg=c.pop("cfg"),
                    skip_layer_guidance=SkipLayerSettings(**SLG) if c.pop("slg", False) else None,
                    num_steps=STEPS, sigmas=sigmas, **c, **kw)  # fmt: skip


def half_blend(i: int, x: mx.array) -> mx.array:
    """A lazy after-step like inpainting's blend: the left half replaced by a step-dependent value."""
    left = mx.full((*x.shape[:2], x.shape[2] // 2, x.shape[3]), 0.1 * i, dtype=x.dtype)
    return mx.concatenate([left, x[:, :, x.shape[2] // 2 :]], axis=2)


def step_by_step(den: Denoiser, sampler_name: str, after_step=None) -> list:
    """Today's loop: build a step, evaluate it, then the next."""
    sampler, x, out = make_sampler(sampler_name, den.sigmas), noise(), []
    for i in range(STEPS):
        x = den.step(x, i, sampler)
        x = after_step(i, x) if after_step else x
        mx.eval(x)
        out.append(np.array(x))
    return out


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_run_gives_the_latents_of_the_step_by_step_loop(case, sampler):
    blend = half_blend if case == "cfg+slg" else None
    den = make_denoiser(case)
    assert den.builds_ahead == (case != "split cfg+slg")
    expected = step_by_step(den, sampler, blend)
    got = [(i, np.array(x)) for i, x in make_denoiser(case).run(noise(), make_sampler(sampler, den.sigmas), range(STEPS), blend)]
    assert [i for i, _ in got] == list(range(STEPS))
    for (i, x), ref in zip(got, expected):
        assert np.abs(x - ref).max() == 0, i


def traced_run(den: Denoiser, monkeypatch, stop_after=None, queue_ahead=True):
    """Events in order: ("build", i), ("async", i) / ("eval", i) of step i's result, ("yield", i),
    ("synchronize", None)."""
    events, built = [], {}
    real_step, real_eval, real_async, real_sync = den.step, mx.eval, mx.async_eval, mx.synchronize

    def step(x, i, sampler):
        events.append(("build", i))
        built[i] = real_step(x, i, sampler)
        return built[i]

    def spy(kind, real):
        def wrapped(*arrays):
            events.extend((kind, i) for i, a in built.items() for b in arrays if a is b)
            return real(*arrays)

        return wrapped

    monkeypatch.setattr(den, "step", step)
    monkeypatch.setattr(mx, "eval", spy("eval", real_eval))
    monkeypatch.setattr(mx, "async_eval", spy("async", real_async))
    monkeypatch.setattr(mx, "synchronize", lambda *a: events.append(("synchronize", None)) or real_sync(*a))
    run = den.run(noise(), make_sampler("euler", den.sigmas), range(STEPS), queue_ahead=queue_ahead)
    for i, _ in run:
        events.append(("yield", i))
        if i == stop_after:
            break
    run.close()  # what the pipeline's generator does when its consumer stops
    return events, built


@pytest.mark.parametrize("queue_ahead", [True, False])
def test_the_next_step_is_built_while_this_one_runs(monkeypatch, queue_ahead):
    """Queued ahead: step i+1 is queued before step i is waited for. Not queued: it is only
    evaluated after step i is yielded."""
    events, _ = traced_run(make_denoiser("cfg+slg"), monkeypatch, queue_ahead=queue_ahead)
    expected = [("build", 0)]
    for i in range(STEPS):
        nxt = [("build", i + 1)] + [("async", i + 1)] * queue_ahead if i + 1 < STEPS else []
        expected += [("async", i)] * bool(nxt) + nxt + [("eval", i), ("yield", i)]
    assert events == expected


def test_split_cfg_keeps_one_step_after_the_other(monkeypatch):
    """Its step evaluates inside (pass after pass): nothing of step i+1 is built before step i is yielded."""
    den = make_denoiser("split cfg+slg")
    assert not den.builds_ahead
    events, _ = traced_run(den, monkeypatch)
    assert events == [e for i in range(STEPS) for e in (("build", i), ("eval", i), ("yield", i))]


def test_cfg_parallel_keeps_one_step_after_the_other():
    den = make_denoiser("cfg+slg")
    den.exchange = SimpleNamespace()  # what Denoiser(cfg_exchange=...) sets: a collective inside each step
    assert not den.builds_ahead


def test_a_consumer_that_stops_leaves_the_built_step_unevaluated(monkeypatch):
    stop = 2
    events, built = traced_run(make_denoiser("single"), monkeypatch, stop_after=stop, queue_ahead=False)
    assert sorted(built) == list(range(stop + 2))  # step stop+1 was built ahead ...
    assert ("build", stop + 1) in events
    assert not [e for e in events if e[1] == stop + 1 and e[0] != "build"]  # ... and never evaluated
    assert events[-1] == ("yield", stop)


def test_a_consumer_that_stops_waits_for_the_queued_step(monkeypatch):
    """The step queued ahead finishes before the run returns: nothing is left running."""
    stop = 2
    events, built = traced_run(make_denoiser("single"), monkeypatch, stop_after=stop)
    assert ("async", stop + 1) in events and sorted(built) == list(range(stop + 2))
    assert events[-2:] == [("yield", stop), ("synchronize", None)]


def test_a_run_that_ends_leaves_nothing_to_wait_for(monkeypatch):
    events, _ = traced_run(make_denoiser("single"), monkeypatch)
    assert events[-1] == ("yield", STEPS - 1)


def test_an_error_building_the_next_step_comes_after_this_step_is_yielded(monkeypatch):
    den = make_denoiser("single")
    real_step = den.step

    def step(x, i, sampler):
        if i == 2:
            raise RuntimeError("step 2 cannot be built")
        return real_step(x, i, sampler)

    monkeypatch.setattr(den, "step", step)
    seen = []
    with pytest.raises(RuntimeError, match="step 2"):
        for i, _ in den.run(noise(), make_sampler("euler", den.sigmas), range(STEPS)):
            seen.append(i)
    assert seen == [0, 1]


# ---- the pipeline's loop ----
@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_ahead")
    make_tiny_model(root, TinySpec(num_layers=DEPTH, dual_attention_layers=()))
    return SD35Pipeline.from_pretrained(root, dtype=mx.float32)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("ahead_inputs")
    net = _controlnet(True, 11)
    net.save_pretrained(d / "controlnet")
    return dict(init=_image(d / "i.png", 6), mask=_mask(d / "m.png"), control=_image(d / "c.png", 8),
                controlnet=str(d / "controlnet"))  # fmt: skip


def settings(name: str, inputs) -> GenerationSettings:
    slg = SkipLayerGuidance(layers=(1,), scale=2.0, start=0.0, end=0.5)
    kw = {
        "euler cfg+slg": dict(skip_layer_guidance=slg),
        "dpmpp_2m": dict(sampler="dpmpp_2m"),
        "split cfg": dict(skip_layer_guidance=slg),
        "inpainting": dict(init_image=inputs["init"], mask=inputs["mask"], strength=0.8),
        "controlnet": dict(controlnets=(ControlNetSettings(inputs["controlnet"], image=inputs["control"], scale=0.8),)),
    }[name]
    return GenerationSettings(prompt=PROMPT, negative_prompt=NEGATIVE, height=H, width=W, steps=4, cfg=4.0,
                              t5_length=77, seed=5, **kw)  # fmt: skip


def step_infos(pipe, s) -> list:
    return [(i.step, i.total, i.sigma, i.seed, np.array(i.latents)) for i in pipe.generate_latents(s, noise=noise_pair(3)[0])]


@pytest.mark.parametrize("name", ["euler cfg+slg", "dpmpp_2m", "split cfg", "inpainting", "controlnet"])
def test_the_pipeline_gives_the_same_steps_with_and_without_building_ahead(pipe, inputs, name, monkeypatch):
    s = settings(name, inputs)
    if name == "split cfg":
        monkeypatch.setattr(pipe, "plan", SimpleNamespace(split_cfg=True, encode_tile=None))
    ahead = step_infos(pipe, s)
    with monkeypatch.context() as m:
        m.setattr(Denoiser, "builds_ahead", property(lambda self: False))
        in_order = step_infos(pipe, s)
    assert len(ahead) == len(in_order) == ahead[0][1] > 1
    for a, b in zip(ahead, in_order):
        assert a[:4] == b[:4]
        assert np.abs(a[4] - b[4]).max() == 0, (name, a[0])


@pytest.mark.parametrize("budget", [None, 50.0])
def test_the_pipeline_queues_ahead_and_shares_dequantization_with_room_for_it(tmp_path, monkeypatch, budget):
    """The next step is queued ahead with or without a budget (MLX's memory limit holds queued
    work); a block's quantized layers de-quantize together without a budget, and under one only
    while their 16-bit weights fit between the stage's limit and the budget's throttle."""
    make_tiny_model(tmp_path, TinySpec(num_layers=2, dual_attention_layers=()))
    pipe = SD35Pipeline.from_pretrained(tmp_path, dtype=mx.float32, memory_budget=budget, plan_size=(H, W),
                                        quantize="transformer=4")  # fmt: skip
    seen = []
    real_init, real_run = Denoiser.__init__, Denoiser.run

    def init(self, *a, **kw):
        seen.append(("dequantize_per_block", kw.get("dequantize_per_block")))
        real_init(self, *a, **kw)

    def run(self, *a, **kw):
        seen.append(("queue_ahead", kw.get("queue_ahead", True)))
        return real_run(self, *a, **kw)

    monkeypatch.setattr(Denoiser, "__init__", init)
    monkeypatch.setattr(Denoiser, "run", run)
    s = GenerationSettings(prompt=PROMPT, height=H, width=W, steps=2, cfg=4.0, t5_length=77, seed=1)
    assert len(list(pipe.generate_latents(s, noise=noise_pair(3)[0]))) == 2
    assert seen == [("dequantize_per_block", True), ("queue_ahead", True)]
    assert pipe._load_transformer().block_dense_bytes() > 0
    # a block whose 16-bit weights would not fit beside the stage's limit: one layer at a time
    monkeypatch.setattr(type(pipe._load_transformer()), "block_dense_bytes", lambda self: 10**13)
    seen.clear()
    assert len(list(pipe.generate_latents(s, noise=noise_pair(3)[0]))) == 2
    assert seen == [("dequantize_per_block", budget is None), ("queue_ahead", True)]

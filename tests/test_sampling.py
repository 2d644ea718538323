"""Sampling parity against diffusers' schedulers (implementations we did not write)."""

from __future__ import annotations

from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3_img2img import (
    StableDiffusion3Img2ImgPipeline,
)
from reference import rel_err

from sd35_mlx.errors import InputError
from sd35_mlx.sampling import (
    DPMPP2MSampler,
    EulerSampler,
    SkipLayerGuidance,
    cfg_combine,
    euler_step,
    flow_sigmas,
    flow_timesteps,
    img2img_sigmas,
    img2img_start_index,
    make_sampler,
    scale_noise,
    uses_cfg,
)

# ---------------------------------------------------------------- fake velocity model

_rng = np.random.default_rng(1234)
_MIX = (_rng.standard_normal((4, 4)) * 0.6).astype(np.float32)  # channel mixing
_BIAS = (_rng.standard_normal(4) * 0.2).astype(np.float32)


def fake_velocity(x: np.ndarray, sigma: float) -> np.ndarray:
    """A smooth, nonlinear, sigma-dependent stand-in for the transformer (NHWC, C=4)."""
    x = np.asarray(x, dtype=np.float64)
    v = np.tanh(x @ _MIX) * (1.0 + sigma) + _BIAS * sigma - 0.3 * x
    return v.astype(np.float32)


def fake_velocity_mx(x: mx.array, sigma: float) -> mx.array:
    """The same function in MLX, so a sampler loop can run without leaving the device."""
    return mx.tanh(x @ mx.array(_MIX)) * (1.0 + sigma) + mx.array(_BIAS) * sigma - 0.3 * x


def start_latent(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, 6, 6, 4)).astype(np.float32)


def run_ours(name: str, sigmas, x_init: np.ndarray, velocity=fake_velocity) -> list:
    """Our sampler; velocities computed on the host from the current state. Returns the trajectory."""
    sampler = make_sampler(name, sigmas)
    x = mx.array(x_init)
    traj = [np.array(x)]
    for i in range(sampler.num_steps):
        v = mx.array(velocity(np.array(x), sampler.sigmas[i]))
        x = sampler.step(i, x, v)
        traj.append(np.array(x))
    return traj


def flow_scheduler(shift: float = 3.0) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


# ---------------------------------------------------------------- schedule


@pytest.mark.parametrize("steps", [1, 2, 4, 28, 40, 50, 100])
@pytest.mark.parametrize("shift", [1.0, 3.0, 3.3, 6.0])
def test_sigmas_equal_diffusers(steps, shift):
    ref = flow_scheduler(shift)
    ref.set_timesteps(steps)
    sigmas = flow_sigmas(steps, shift)
    assert sigmas.dtype == np.float32 and sigmas.shape == (steps + 1,)
    np.testing.assert_array_equal(sigmas, ref.sigmas.numpy())
    np.testing.assert_array_equal(flow_timesteps(sigmas), ref.timesteps.numpy())
    assert make_sampler("euler", sigmas).timesteps == ref.timesteps.numpy().astype(np.float64).tolist()


@pytest.mark.parametrize(
    "steps, head, tail",
    [
        (4, [1.0, 0.857692, 0.602151], [0.008929, 0.0]),
        (28, [1.0, 0.987381, 0.974108, 0.960129, 0.945387], [0.199827, 0.110906, 0.008929, 0.0]),
        (40, [1.0, 0.991331, 0.982356], [0.146509, 0.081046, 0.008929, 0.0]),
        (50, [1.0, 0.993124, 0.986057], [0.120533, 0.0669, 0.008929, 0.0]),
    ],
)
def test_sigmas_match_spec_values(steps, head, tail):
    sigmas = flow_sigmas(steps)
    np.testing.assert_allclose(sigmas[: len(head)], head, atol=1e-6)
    np.testing.assert_allclose(sigmas[-len(tail) :], tail, atol=1e-6)


def test_turbo_timesteps_match_spec():
    np.testing.assert_allclose(flow_timesteps(flow_sigmas(4)), [1000, 857.692, 602.151, 8.929], atol=1e-3)


@pytest.mark.parametrize("bad", [0, -3, 2.5, "28", True, None])
def test_bad_steps_rejected(bad):
    with pytest.raises(InputError, match="steps"):
        flow_sigmas(bad)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_shift_rejected(bad):
    with pytest.raises(InputError, match="shift"):
        flow_sigmas(28, bad)


def test_scale_noise_equals_diffusers():
    sched = flow_scheduler()
    sched.set_timesteps(28)
    t_start = img2img_start_index(28, 0.6)
    sched.set_begin_index(t_start)
    z = start_latent(1)
    noise = start_latent(2)
    ref = sched.scale_noise(torch.from_numpy(z), sched.timesteps[t_start : t_start + 1], torch.from_numpy(noise))
    sigma = float(img2img_sigmas(28, 0.6)[0])
    ours = scale_noise(mx.array(z), mx.array(noise), sigma)
    assert rel_err(np.array(ours), ref.numpy()) <= 1e-6


# ---------------------------------------------------------------- img2img truncation


@pytest.mark.parametrize(
    "steps, strength",
    [(40, 0.8), (50, 0.8), (40, 0.9), (28, 0.6), (28, 1.0), (4, 0.5), (30, 0.3), (50, 0.95), (28, 0.01), (7, 0.33)],
)
def test_img2img_truncation_equals_diffusers(steps, strength):
    sched = flow_scheduler()
    sched.set_timesteps(steps)
    # get_timesteps only touches self.scheduler, so call it on a stand-in pipeline.
    timesteps, n = StableDiffusion3Img2ImgPipeline.get_timesteps(
        SimpleNamespace(scheduler=sched), steps, strength, "cpu"
    )
    sigmas = img2img_sigmas(steps, strength)
    assert len(sigmas) - 1 == n
    np.testing.assert_array_equal(flow_timesteps(sigmas), timesteps.numpy())
    np.testing.assert_array_equal(sigmas, sched.sigmas[sched.begin_index :].numpy())


def test_img2img_differs_from_sai_where_the_spec_says():
    # diffusers drops 8 of 40 at strength 0.8; SAI's int(steps·(1−denoise)) drops 7.
    assert img2img_start_index(40, 0.8) == 8 and int(40 * (1 - 0.8)) == 7
    assert img2img_start_index(50, 0.8) == 10 and int(50 * (1 - 0.8)) == 9
    assert img2img_start_index(40, 0.9) == 4 and int(40 * (1 - 0.9)) == 3


def test_img2img_euler_loop_equals_diffusers():
    steps, strength = 40, 0.8
    sched = flow_scheduler()
    sched.set_timesteps(steps)
    timesteps, _ = StableDiffusion3Img2ImgPipeline.get_timesteps(SimpleNamespace(scheduler=sched), steps, strength, "cpu")
    x_init = start_latent(3)
    x = torch.from_numpy(x_init)
    for j, t in enumerate(timesteps):
        sigma = float(sched.sigmas[sched.begin_index + j])
        x = sched.step(torch.from_numpy(fake_velocity(x.numpy(), sigma)), t, x).prev_sample
    ours = run_ours("euler", img2img_sigmas(steps, strength), x_init)[-1]
    assert rel_err(ours, x.numpy()) <= 1e-6


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.01, float("nan"), "0.5", None])
def test_bad_strength_rejected(bad):
    with pytest.raises(InputError, match="strength"):
        img2img_sigmas(28, bad)


def test_strength_leaving_no_step_names_the_minimum():
    with pytest.raises(InputError, match=r"strength ≥ 1/steps = 0\.0357143"):
        img2img_sigmas(28, 1e-300)
    assert len(img2img_sigmas(28, 1 / 28)) == 2  # the stated minimum gives one step


# ---------------------------------------------------------------- Euler


@pytest.mark.parametrize("steps", [4, 28])
def test_euler_loop_equals_diffusers(steps):
    sched = flow_scheduler()
    sched.set_timesteps(steps)
    x_init = start_latent(4)
    x = torch.from_numpy(x_init)
    ref = [x.numpy()]
    for i, t in enumerate(sched.timesteps):
        v = torch.from_numpy(fake_velocity(x.numpy(), float(sched.sigmas[i])))
        x = sched.step(v, t, x).prev_sample
        ref.append(x.numpy())
    ours = run_ours("euler", flow_sigmas(steps), x_init)
    for a, b in zip(ours, ref):
        assert rel_err(a, b) <= 1e-6


def test_euler_step_function_and_dtypes():
    sigmas = flow_sigmas(28)
    x = mx.array(start_latent(5))
    v16 = mx.array(fake_velocity(start_latent(5), 1.0)).astype(mx.bfloat16)
    out = euler_step(x, v16, float(sigmas[3]), float(sigmas[4]))
    assert out.dtype == mx.float32  # latents stay fp32 even with a bf16 model
    sampler = EulerSampler(sigmas)
    assert np.array_equal(np.array(sampler.step(3, x, v16)), np.array(out))
    ref = np.array(x) + (np.float32(sigmas[4]) - np.float32(sigmas[3])) * np.array(v16.astype(mx.float32))
    assert rel_err(np.array(out), ref) <= 1e-6


def test_sampler_loop_stays_on_device():
    # Velocity computed in MLX from MLX state, no conversion to host until the end:
    # the result must equal the host-driven loop.
    sigmas = flow_sigmas(6)
    x_init = start_latent(6)
    for name in ("euler", "dpmpp_2m"):
        sampler = make_sampler(name, sigmas)
        x = mx.array(x_init)
        for i in range(sampler.num_steps):
            x = sampler.step(i, x, fake_velocity_mx(x, sampler.sigmas[i]))
        mx.eval(x)
        assert rel_err(np.array(x), run_ours(name, sigmas, x_init)[-1]) <= 1e-5


# ---------------------------------------------------------------- DPM-Solver++(2M)


def _dpm_scheduler(**kw) -> DPMSolverMultistepScheduler:
    return DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        algorithm_type="dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        final_sigmas_type="zero",
        lower_order_final=True,
        **kw,
    )


def diffusers_dpmpp_2m_kdiffusion(sigmas: np.ndarray, x_init: np.ndarray) -> list:
    """diffusers' DPM-Solver++(2M) run as SAI/k-diffusion's method (λ = −log σ).

    With `use_flow_sigmas=False` diffusers uses α = 1/√(σ²+1), σ_vp = σ·α, so its λ is
    log α − log σ_vp = −log σ, exactly SAI's. It works on α-scaled samples, so we hand it
    α(σ)·x and divide by α(σ') afterwards; `prediction_type="sample"` takes x0 = x − σ·v.
    Its own sigma grid is not the flow one, so we give it ours.
    """
    sched = _dpm_scheduler(prediction_type="sample", use_flow_sigmas=False)
    n = len(sigmas) - 1
    sched.set_timesteps(n)
    assert len(sched.timesteps) == n
    sched.sigmas = torch.from_numpy(np.asarray(sigmas, np.float32).copy())
    sched.set_begin_index(0)
    alpha = lambda s: 1.0 / np.sqrt(float(s) ** 2 + 1.0)
    x = torch.from_numpy(x_init)
    traj = [x.numpy()]
    for i in range(n):
        s = float(sigmas[i])
        x0 = x - s * torch.from_numpy(fake_velocity(x.numpy(), s))
        x = sched.step(x0, sched.timesteps[i], x * alpha(s)).prev_sample / alpha(sigmas[i + 1])
        traj.append(x.numpy())
    return traj


def diffusers_dpmpp_2m_flow(sigmas: np.ndarray, x_init: np.ndarray, velocity=fake_velocity) -> list:
    """diffusers' flow-matching configuration, fed our sigmas (λ = log((1−σ)/σ))."""
    sched = _dpm_scheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    n = len(sigmas) - 1
    sched.set_timesteps(n)
    # By design its grid starts at shift(0.999), not 1.0: replace it with ours.
    assert float(sched.sigmas[0]) < 1.0
    sched.sigmas = torch.from_numpy(np.asarray(sigmas, np.float32).copy())
    sched.set_begin_index(0)
    x = torch.from_numpy(x_init)
    traj = [x.numpy()]
    for i in range(n):
        v = torch.from_numpy(velocity(x.numpy(), float(sigmas[i])))
        x = sched.step(v, sched.timesteps[i], x).prev_sample
        traj.append(x.numpy())
    return traj


@pytest.mark.parametrize("steps", [4, 28, 40])
def test_dpmpp_2m_equals_diffusers_kdiffusion_form(steps):
    sigmas = flow_sigmas(steps)
    x_init = start_latent(7)
    ours = run_ours("dpmpp_2m", sigmas, x_init)
    ref = diffusers_dpmpp_2m_kdiffusion(sigmas, x_init)
    for a, b in zip(ours, ref):
        assert np.isfinite(a).all()
        assert rel_err(a, b) <= 1e-5


def test_dpmpp_2m_img2img_tail_equals_diffusers():
    sigmas = img2img_sigmas(40, 0.8)  # starts below 1, so λ_0 is not 0
    x_init = start_latent(8)
    assert rel_err(run_ours("dpmpp_2m", sigmas, x_init)[-1], diffusers_dpmpp_2m_kdiffusion(sigmas, x_init)[-1]) <= 1e-5


_MU = np.array([0.5, -1.0, 0.2, 1.5], np.float32)  # per-channel mean of a Gaussian "data set"
_STD = np.array([0.3, 0.8, 1.2, 0.4], np.float32)


def gaussian_data_velocity(x: np.ndarray, sigma: float) -> np.ndarray:
    """The exact flow-matching velocity for Gaussian data N(_MU, _STD²) (x_σ = σ·ε + (1−σ)·x0)."""
    x = np.asarray(x, dtype=np.float64)
    a = 1.0 - sigma
    x0 = _MU + a * _STD**2 / (a * a * _STD**2 + sigma * sigma) * (x - a * _MU)
    return ((x - x0) / sigma).astype(np.float32)


def test_dpmpp_2m_vs_diffusers_flow_form():
    """diffusers' flow configuration is the same solver with another λ; bound the difference.

    First-order steps agree exactly (both reduce to Euler for flow matching); the second-order
    correction uses a different step ratio r (λ = log((1−σ)/σ) instead of −log σ), so the
    trajectories differ. On a model whose exact ODE solution is known in closed form
    (Gaussian data: x_σ = (1−σ)μ + √(σ² + (1−σ)²s²)·x_1), both must be far more accurate
    than Euler halfway down the schedule, and closer to each other than to Euler.
    """
    steps = 28
    sigmas = flow_sigmas(steps)
    x_init = start_latent(9)
    ours = run_ours("dpmpp_2m", sigmas, x_init, gaussian_data_velocity)
    flow = diffusers_dpmpp_2m_flow(sigmas, x_init, gaussian_data_velocity)
    euler = run_ours("euler", sigmas, x_init, gaussian_data_velocity)
    assert rel_err(ours[1], flow[1]) <= 1e-6 and rel_err(ours[1], euler[1]) <= 1e-6

    k = steps // 2
    s = float(sigmas[k])
    exact = (1 - s) * _MU + np.sqrt(s * s + (1 - s) ** 2 * _STD**2) * x_init
    err = {name: rel_err(t[k], exact) for name, t in (("ours", ours), ("flow", flow), ("euler", euler))}
    assert err["ours"] < err["euler"] / 10 and err["flow"] < err["euler"] / 3, err
    assert 0 < rel_err(ours[k], flow[k]) < rel_err(euler[k], flow[k])


def test_dpmpp_2m_final_step_is_denoised_and_finite():
    sigmas = flow_sigmas(4)
    sampler = DPMPP2MSampler(sigmas)
    x = mx.array(start_latent(10))
    v = mx.array(fake_velocity(start_latent(10), float(sigmas[3])))
    for i in range(3):
        sampler.step(i, x, v)
    out = sampler.step(3, x, v)
    assert np.isfinite(np.array(out)).all()
    assert np.array_equal(np.array(out), np.array(x - float(sigmas[3]) * v))


def test_dpmpp_2m_restarts_at_step_zero():
    sigmas = flow_sigmas(5)
    x_init = start_latent(11)
    first = run_ours("dpmpp_2m", sigmas, x_init)[-1]
    sampler = make_sampler("dpmpp_2m", sigmas)
    for _ in range(2):  # a reused sampler gives the same trajectory
        x = mx.array(x_init)
        for i in range(sampler.num_steps):
            x = sampler.step(i, x, mx.array(fake_velocity(np.array(x), sampler.sigmas[i])))
        assert np.array_equal(np.array(x), first)


def test_make_sampler_errors():
    with pytest.raises(InputError, match=r"euler, dpmpp_2m"):
        make_sampler("heun", flow_sigmas(4))
    with pytest.raises(InputError, match="decreasing"):
        make_sampler("euler", [0.5, 0.8, 0.0])
    with pytest.raises(InputError, match="> 0"):
        make_sampler("dpmpp_2m", [1.0, 0.0, 0.0])
    with pytest.raises(InputError, match="at least 2"):
        make_sampler("euler", [1.0])
    with pytest.raises(InputError, match="out of range"):
        make_sampler("euler", flow_sigmas(4)).step(4, mx.zeros((1,)), mx.zeros((1,)))


# ---------------------------------------------------------------- guidance


def test_uses_cfg_threshold():
    assert not uses_cfg(0.0) and not uses_cfg(1.0)
    assert uses_cfg(1.0001) and uses_cfg(4.5)


def test_cfg_combine_matches_diffusers_formula_and_upcasts():
    u = start_latent(12)
    c = start_latent(13)
    ours = cfg_combine(mx.array(u), mx.array(c), 4.5)
    tu, tc = torch.from_numpy(u), torch.from_numpy(c)
    ref = tu.chunk(1)[0] + 4.5 * (tc - tu)  # the pipeline's expression
    assert rel_err(np.array(ours), ref.numpy()) <= 1e-6
    assert cfg_combine(mx.array(u).astype(mx.bfloat16), mx.array(c).astype(mx.bfloat16), 4.5).dtype == mx.float32


@pytest.mark.parametrize("steps, expected", [(28, range(1, 6)), (40, range(1, 8)), (50, range(1, 10)), (4, [])])
def test_slg_active_steps(steps, expected):
    slg = SkipLayerGuidance()
    assert slg.layers == (7, 8, 9) and slg.scale == 2.8 and (slg.start, slg.end) == (0.01, 0.2)
    assert slg.active_steps(steps) == tuple(expected)
    # diffusers' own test, evaluated literally:
    assert [i for i in range(steps) if i > steps * 0.01 and i < steps * 0.2] == list(expected)


def test_slg_apply_and_validation():
    v, vc, vs = start_latent(14), start_latent(15), start_latent(16)
    out = SkipLayerGuidance(scale=2.5).apply(mx.array(v), mx.array(vc), mx.array(vs))
    ref = torch.from_numpy(v) + (torch.from_numpy(vc) - torch.from_numpy(vs)) * 2.5
    assert rel_err(np.array(out), ref.numpy()) <= 1e-6
    assert SkipLayerGuidance(scale=0.0).active_steps(28) == ()
    with pytest.raises(InputError, match="start < end"):
        SkipLayerGuidance(start=0.3, end=0.2)
    with pytest.raises(InputError, match="layers"):
        SkipLayerGuidance(layers=())
    with pytest.raises(InputError, match="scale"):
        SkipLayerGuidance(scale=-1.0)
    with pytest.raises(InputError, match=r"\[24\]"):
        SkipLayerGuidance(layers=(7, 24)).check_depth(24)
    SkipLayerGuidance(layers=(7, 8, 9)).check_depth(24)


def test_img2img_rules_against_both_references():
    """'diffusers' equals diffusers' own get_timesteps on every (steps, strength) of a grid;
    'stability' equals SAI sd3_infer.py's `sigmas[int(steps * (1 - denoise)):]`."""
    differ = []
    for steps in (1, 2, 4, 10, 28, 40, 50):
        for strength in (0.05, 0.1, 0.25, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0):
            scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
            scheduler.set_timesteps(steps)
            fake = SimpleNamespace(scheduler=scheduler)
            try:
                _, n_run = StableDiffusion3Img2ImgPipeline.get_timesteps(fake, steps, strength, "cpu")
            except Exception:
                n_run = 0
            sai_start = int(steps * (1 - strength))
            for rule, start in (("diffusers", steps - n_run), ("stability", sai_start)):
                if start >= steps:  # no step left: refused, with the smallest strength that works
                    with pytest.raises(InputError, match="leaves no denoising step"):
                        img2img_start_index(steps, strength, rule)
                    continue
                assert img2img_start_index(steps, strength, rule) == start, (rule, steps, strength)
                assert len(img2img_sigmas(steps, strength, 3.0, rule)) == steps - start + 1
            differ += [(steps, strength)] if steps - n_run != sai_start else []
    assert (40, 0.8) in differ and (50, 0.8) in differ  # the rules really differ there
    with pytest.raises(InputError, match="unknown img2img rule"):
        img2img_start_index(28, 0.6, "sai")

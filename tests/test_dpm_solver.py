"""DPM-Solver++(2M) (`cq.sampling.dpm_solver`): parity with diffusers' DPMSolverMultistepScheduler (dpmsolver++,
order 2, midpoint, final sigma 0) for its three timestep spacings, second-order convergence on an analytic model,
one model call per step with ``step=i``, and the sampler settings a fitted model records and checks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_plms import MU, SIGMA, GaussianEps

import cq
from cq.errors import ConfigError, SamplerMismatchError
from cq.models import build
from cq.sampling import (
    SAMPLERS,
    FullPrecision,
    NoiseSchedule,
    ddim,
    dpm_solver,
    dpm_solver_timesteps,
    sampler_of,
    seeded_noise,
)


PARITY_ATOL = 1e-5  # fp32; diffusers computes its betas and sigmas in float32, cq in float64 (measured <= 4e-6)
SPACINGS = ("linspace", "leading", "trailing")


def _diffusers_run(model, x: torch.Tensor, steps: int, spacing: str, schedule: NoiseSchedule, cond=None):
    """The loop diffusers' pipelines run: set_timesteps, then model output -> scheduler.step per timestep."""
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=schedule.num_timesteps,
        beta_start=schedule.beta_start,
        beta_end=schedule.beta_end,
        beta_schedule="linear" if schedule.kind == "linear" else "scaled_linear",
        algorithm_type="dpmsolver++",
        solver_order=2,
        timestep_spacing=spacing,
    )
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps.tolist()
    x = x * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        eps = model(x, t.expand(x.shape[0]), cond, step=i)
        x = scheduler.step(eps, t, x).prev_sample
    return x, timesteps


@settings(max_examples=40, deadline=None)
@given(
    steps=st.integers(2, 60),
    spacing=st.sampled_from(SPACINGS),
    kind=st.sampled_from(["linear", "scaled_linear"]),
    seed=st.integers(0, 2**16),
)
def test_parity_with_diffusers_on_an_analytic_model(steps, spacing, kind, seed):
    """(One step is a single x0 = (x - sigma eps) / alpha from t = 999, where alpha = 0.006 for the linear
    schedule turns float32 rounding into 4e-5 in both; one step is checked against DDIM in the settings test.)"""
    schedule = NoiseSchedule(kind=kind, beta_start=1e-4 if kind == "linear" else 0.00085, beta_end=0.02)
    if kind == "scaled_linear":
        schedule = NoiseSchedule(kind=kind, beta_start=0.00085, beta_end=0.012)
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(seed))
    model = GaussianEps(schedule)
    expected, timesteps = _diffusers_run(model, x, steps, spacing, schedule)
    assert timesteps == dpm_solver_timesteps(schedule.num_timesteps, steps, spacing)[::-1]
    ours = dpm_solver(model, x, steps=steps, spacing=spacing)
    assert (ours - expected).abs().max() <= PARITY_ATOL


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", [2, 10])
def test_parity_with_diffusers_on_a_tiny_unet(spacing, steps):
    unet = build("tiny-ldm-church", seed=0)
    x = seeded_noise(unet.sample_shape, range(2))
    model = FullPrecision(unet)
    expected, _ = _diffusers_run(model, x, steps, spacing, unet.noise_schedule)
    ours = dpm_solver(model, x, steps=steps, spacing=spacing)
    # a random-weight UNet is no denoiser: its x0 reach |x| ~ 130, so the float32 bound is relative to the scale
    # (measured: <= 1.1e-6 of max |x| over these cases, e.g. 1.3e-4 at 131)
    scale = expected.abs().max()
    assert scale > 0.1
    assert (ours - expected).abs().max() <= PARITY_ATOL * max(1.0, scale)


def test_second_order_convergence():
    """Away from the final first-order jump to sigma = 0, the error at a fixed timestep (t = 500, on every
    'linspace' grid below) falls ~4x per halving of the step (2M); DDIM on the same grid (first order) ~2x."""
    schedule = GaussianEps().noise_schedule
    abar = schedule.alphas_cumprod()
    x = torch.randn(512, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    start = dpm_solver_timesteps(1000, 20)[-1]  # 999 for every step count

    def marginal(t):  # x_t of the probability-flow ODE from x at `start`, for x0 ~ N(MU, SIGMA^2)
        a = abar[t]
        return a.sqrt() * MU, (a * SIGMA**2 + 1 - a).sqrt()

    m0, s0 = marginal(start)
    m5, s5 = marginal(500)
    exact = m5 + s5 * (x - m0) / s0

    def error_at_500(steps):
        seen = {}
        dpm_solver(GaussianEps(), x, steps=steps, callback=lambda info: seen.setdefault(info.t, info.x))
        return (seen[500] - exact).abs().max().item()

    errors = [error_at_500(n) for n in (20, 40, 80)]
    assert 3.5 < errors[0] / errors[1] < 4.5 and 3.5 < errors[1] / errors[2] < 4.5, errors


def test_one_call_per_step_with_explicit_step():
    model = GaussianEps()
    steps = 7
    infos = []
    dpm_solver(model, torch.randn(2, 1, 2, 2), steps=steps, spacing="trailing", callback=infos.append)
    planned = dpm_solver_timesteps(1000, steps, "trailing")[::-1]
    assert [(s, t) for s, t, _ in model.calls] == list(enumerate(planned))
    assert [i.step for i in infos] == list(range(steps)) and [i.t for i in infos] == planned
    assert torch.equal(infos[-1].x_next, infos[-1].x0_pred)  # the last step lands on sigma = 0


def test_errors():
    model = GaussianEps()
    x = torch.randn(1, 1, 2, 2)
    with pytest.raises(ConfigError, match="eta must be 0"):
        dpm_solver(model, x, steps=4, eta=0.5)
    with pytest.raises(ConfigError, match="'linspace', 'leading' or 'trailing'"):
        dpm_solver(model, x, steps=4, spacing="ldm")
    with pytest.raises(ConfigError, match="steps must be"):
        dpm_solver(model, x, steps=0)
    with pytest.raises(ConfigError, match="distinct timesteps"):
        dpm_solver_timesteps(10, 10, "linspace")


def test_a_fitted_model_records_and_checks_dpm_solver_settings(tmp_path):
    """The recorded sampler settings for DPM-Solver: the trace records them, the model refuses DDIM with the same
    call count, the artifact stores them, `sampler_of` and `cq.evaluate` pick dpm_solver."""
    assert SAMPLERS["dpm_solver"] is dpm_solver
    unet = build("tiny-ldm-church", seed=0)
    recipe = cq.deepcache(interval=2)
    steps = 4
    trace = cq.trace(
        unet, dpm_solver, steps=steps, num_samples=2, points=recipe.points(unet), spacing="leading", progress=False
    )
    assert trace.settings.sampler == "dpm_solver" and trace.settings.spacing == "leading"
    assert list(trace.settings.timesteps) == dpm_solver_timesteps(1000, steps, "leading")[::-1]
    model = recipe.fit(unet, trace, progress=False)
    noise = seeded_noise(unet.sample_shape, range(100, 102))
    with pytest.raises(SamplerMismatchError, match="sampler: fitted 'dpm_solver'"):
        ddim(model, noise, steps=steps)
    with pytest.raises(SamplerMismatchError, match="spacing"):
        dpm_solver(model, noise, steps=steps)  # linspace, not the fitted leading
    loaded = cq.load(cq.save(model, tmp_path / "dpm.cq"))
    assert loaded.sampler_settings == model.sampler_settings and sampler_of(loaded.sampler_settings) is dpm_solver
    out = dpm_solver(loaded, noise, steps=steps, spacing="leading")
    assert torch.equal(out, dpm_solver(model, noise, steps=steps, spacing="leading"))
    quality = cq.evaluate(loaded, unet, seeds=range(100, 102), progress=False)
    reference = dpm_solver(FullPrecision(unet), noise, steps=steps, spacing="leading")
    assert torch.equal(quality.reference_samples, reference) and torch.equal(quality.samples, out)


class GaussianV(GaussianEps):
    """The same exact model, answering in v = sqrt(abar) eps - sqrt(1 - abar) x0 (a v-prediction schedule)."""

    def __init__(self, schedule: NoiseSchedule):
        super().__init__(schedule)

    def forward(self, x, t, cond=None, *, step: int):
        eps = super().forward(x, t, cond, step=step)
        a = self.abar[t].to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        return a.sqrt() * eps - (1 - a).sqrt() * x0


@pytest.mark.parametrize("steps", [5, 20])
def test_v_prediction_parity_with_diffusers(steps):
    """A v-model under dpm_solver equals diffusers' scheduler with prediction_type='v_prediction', and equals the
    same model answering in eps (the one conversion, `eps_from_output`)."""
    from diffusers import DPMSolverMultistepScheduler

    schedule = NoiseSchedule(kind="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction="v")
    x = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(5))
    model = GaussianV(schedule)
    scheduler = DPMSolverMultistepScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="v_prediction"
    )
    scheduler.set_timesteps(steps)
    expected = x.clone()
    for i, t in enumerate(scheduler.timesteps):
        expected = scheduler.step(model(expected, t.expand(2), step=i), t, expected).prev_sample
    ours = dpm_solver(model, x, steps=steps)
    assert (ours - expected).abs().max() <= PARITY_ATOL
    eps_schedule = NoiseSchedule(kind="scaled_linear", beta_start=0.00085, beta_end=0.012)
    assert (ours - dpm_solver(GaussianEps(eps_schedule), x, steps=steps)).abs().max() <= 1e-5

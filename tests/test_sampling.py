"""Noise schedules, DDIM timestep conventions and the DDIM update (cq.sampling)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from cq.errors import ConfigError, InputShapeError
from cq.models.ddpm import DDPMConfig, DDPMUNet
from cq.sampling import FullPrecision, NoiseSchedule, StepInfo, ddim, ddim_timesteps


T = 1000
DIVISORS = [d for d in range(1, T + 1) if T % d == 0]


# ----------------------------------------------------------------------------------------------------------------
# Betas


def test_linear_betas_are_numpy_linspace_float64():
    b = NoiseSchedule(kind="linear").betas()
    assert b.dtype == torch.float64
    np.testing.assert_array_equal(b.numpy(), np.linspace(1e-4, 0.02, 1000))


@pytest.mark.parametrize("kind", ["quad", "scaled_linear"])
def test_quad_and_scaled_linear_betas_are_squared_linspace_of_roots(kind):
    ns = NoiseSchedule(kind=kind, beta_start=0.00085, beta_end=0.012, num_timesteps=1000)
    b = ns.betas()
    assert b.dtype == torch.float64
    np.testing.assert_allclose(b.numpy(), np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2, rtol=1e-15, atol=0)


@given(
    kind=st.sampled_from(["linear", "quad", "scaled_linear"]),
    b0=st.floats(1e-5, 0.05),
    ratio=st.floats(1.0, 10.0),
    n=st.integers(1, 2000),
)
def test_alphas_cumprod_is_cumulative_product(kind, b0, ratio, n):
    ns = NoiseSchedule(kind=kind, beta_start=b0, beta_end=b0 * ratio, num_timesteps=n)
    b = ns.betas().numpy()
    assert b.shape == (n,)
    assert np.all(np.diff(b) >= -1e-18)  # non-decreasing
    np.testing.assert_allclose(b[0], b0, rtol=1e-12)
    np.testing.assert_allclose(ns.alphas_cumprod().numpy(), np.cumprod(1.0 - b), rtol=1e-12)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kind="cosine"),
        dict(kind="sigmoid"),
        dict(num_timesteps=0),
        dict(beta_start=0.0),
        dict(beta_start=-1e-4),
        dict(beta_start=0.03, beta_end=0.02),
        dict(beta_end=1.0),
    ],
)
def test_invalid_noise_schedule_raises_config_error(kwargs):
    with pytest.raises(ConfigError):
        NoiseSchedule(**kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Timesteps


@given(steps=st.sampled_from(DIVISORS))
def test_uniform_timesteps_are_the_ddim_range(steps):
    assert ddim_timesteps(T, steps, "uniform") == list(range(0, T, T // steps))


@given(steps=st.sampled_from(DIVISORS[:-1]))  # steps == T would reach t = T: see the next test
def test_ldm_timesteps_are_uniform_plus_one(steps):
    uniform = ddim_timesteps(T, steps, "uniform")
    assert ddim_timesteps(T, steps, "ldm") == [s + 1 for s in uniform]


def test_ldm_timesteps_refuse_to_leave_the_schedule():
    with pytest.raises(ConfigError, match="ldm"):
        ddim_timesteps(T, T, "ldm")  # range(0, T, 1) + 1 would reach t = T


@given(steps=st.integers(1, T))
def test_quad_timesteps_follow_the_ddim_formula(steps):
    expected = (np.linspace(0, np.sqrt(0.8 * T), steps) ** 2).astype(int).tolist()
    seq = ddim_timesteps(T, steps, "quad")
    assert seq == expected
    assert all(isinstance(s, int) for s in seq)
    assert len(seq) == steps
    assert seq[0] == 0 and seq[-1] <= int(0.8 * T)
    assert all(a <= b for a, b in zip(seq, seq[1:], strict=False))  # non-decreasing (duplicates at large S)


@given(num_timesteps=st.integers(1, 2000), data=st.data())
def test_linspace_timesteps_are_exactly_steps_distinct_values(num_timesteps, data):
    steps = data.draw(st.integers(1, num_timesteps))
    seq = ddim_timesteps(num_timesteps, steps, "linspace")
    assert len(seq) == steps
    assert seq[0] == 0
    assert all(0 <= s <= num_timesteps - 1 for s in seq)
    assert all(a < b for a, b in zip(seq, seq[1:], strict=False))
    if steps > 1:
        assert seq[-1] == num_timesteps - 1


@given(steps=st.integers(1, T).filter(lambda s: T % s != 0), spacing=st.sampled_from(["uniform", "ldm"]))
def test_uniform_with_non_divisor_raises(steps, spacing):
    with pytest.raises(ConfigError, match="linspace"):
        ddim_timesteps(T, steps, spacing)


@pytest.mark.parametrize("spacing", ["uniform", "quad", "ldm", "linspace"])
@pytest.mark.parametrize("steps", [0, -1, T + 1])
def test_steps_out_of_range_raises(spacing, steps):
    with pytest.raises(ConfigError):
        ddim_timesteps(T, steps, spacing)


def test_unknown_spacing_raises():
    with pytest.raises(ConfigError):
        ddim_timesteps(T, 10, "karras")


# ----------------------------------------------------------------------------------------------------------------
# DDIM on Gaussian data, where the exact eps-prediction is known in closed form


class GaussianEps(nn.Module):
    """Exact eps-prediction E[eps | x_t] for data x0 ~ N(mu, s^2) i.i.d. per element.

    x_t = sqrt(ab) x0 + sqrt(1-ab) eps, so Cov(eps, x_t) = sqrt(1-ab), Var(x_t) = ab s^2 + 1 - ab and
    E[eps | x_t] = sqrt(1-ab) (x_t - sqrt(ab) mu) / (ab s^2 + 1 - ab).
    """

    def __init__(self, mu: float, s: float, noise: NoiseSchedule):
        super().__init__()
        self.mu, self.s, self.noise_schedule = mu, s, noise
        self.abar = noise.alphas_cumprod()

    def forward(self, x, t, cond=None, *, step):
        # float64 inside: 1 - ab is ~1e-4 at t=0, where float32 would lose 3 digits of it
        ab = self.abar[t].view(-1, *([1] * (x.ndim - 1)))
        x64 = x.double()
        return ((1 - ab).sqrt() * (x64 - ab.sqrt() * self.mu) / (ab * self.s**2 + 1 - ab)).to(x.dtype)


def _sigma(ab: float) -> float:
    return math.sqrt((1 - ab) / ab)


def _euler_in_sigma(x_t: torch.Tensor, seq: list[int], mu: float, s: float, abar: torch.Tensor) -> torch.Tensor:
    """DDIM eta=0 written as Euler steps of the probability-flow ODE in (xbar = x / sqrt(ab), sigma) coordinates.

    Song et al. 2021, Eq. 14: d xbar = eps(x) d sigma, sigma = sqrt((1-ab)/ab). For Gaussian data the exact eps is
    sigma (xbar - mu) / (s^2 + sigma^2), so each step multiplies (xbar - mu) by 1 + (sigma_next - sigma) sigma /
    (s^2 + sigma^2). The last step lands on sigma = 0 (alpha = 1), where x = xbar.
    """
    sig = [0.0] + [_sigma(float(abar[t])) for t in seq]
    factor = 1.0
    for k in range(len(seq), 0, -1):
        factor *= 1 + (sig[k - 1] - sig[k]) * sig[k] / (s**2 + sig[k] ** 2)
    return mu + factor * (x_t / math.sqrt(float(abar[seq[-1]])) - mu)


@pytest.mark.parametrize("spacing", ["linspace", "uniform"])
@pytest.mark.parametrize("s", [0.5, 1.0, 2.0])
def test_ddim_1000_steps_solves_the_probability_flow_ode(spacing, s):
    # The ODE keeps z = (x_t - sqrt(ab) mu) / sqrt(ab s^2 + 1 - ab) constant, so its exact solution from x_T is
    # mu + s z_T. DDIM (eta=0) is Euler in sigma (see _euler_in_sigma); per step, log of the Euler factor minus log
    # of the exact factor sqrt((s^2 + sigma_next^2) / (s^2 + sigma^2)) is -dsigma^2 s^2 / (2 (s^2 + sigma^2)^2)
    # + O(dsigma^3). So x_0 = mu + s z_T (1 - E) with E ~= sum_k dsigma_k^2 s^2 / (2 (s^2 + sigma_k^2)^2), about
    # 3e-3 (s=0.5) to 1.5e-3 (s=2) for the linear schedule at 1000 steps -- first order, well inside 1e-2.
    noise = NoiseSchedule()
    abar = noise.alphas_cumprod()
    mu = 0.3
    g = torch.Generator().manual_seed(1)
    x_T = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    ab_T = abar[T - 1]
    z_T = (x_T - ab_T.sqrt() * mu) / (ab_T * s**2 + 1 - ab_T).sqrt()

    out = ddim(GaussianEps(mu, s, noise), x_T, steps=T, spacing=spacing, noise=noise)

    ratio = (out - mu) / (s * z_T)  # 1 for the exact ODE solution
    err = (1 - ratio).abs()
    assert err.max() < 1e-2
    seq = ddim_timesteps(T, T, spacing)
    sig = [0.0] + [_sigma(float(abar[t])) for t in seq]
    predicted = sum((sig[k - 1] - sig[k]) ** 2 * s**2 / (2 * (s**2 + sig[k] ** 2) ** 2) for k in range(1, len(sig)))
    assert 0.0 < predicted < 1e-2
    torch.testing.assert_close(1 - ratio, torch.full_like(ratio, predicted), rtol=0.1, atol=0)


@settings(max_examples=20)
@given(
    steps_spacing=st.one_of(
        st.tuples(st.sampled_from([d for d in DIVISORS if d <= 200]), st.just("uniform")),
        st.tuples(st.integers(1, 200), st.sampled_from(["quad", "linspace"])),
    ),
    mu=st.floats(-2, 2),
    s=st.floats(0.05, 3),
)
def test_ddim_equals_euler_in_sigma_at_any_step_count(steps_spacing, mu, s):
    steps, spacing = steps_spacing
    noise = NoiseSchedule()
    abar = noise.alphas_cumprod()
    x_t = torch.randn(16, generator=torch.Generator().manual_seed(steps), dtype=torch.float64)
    out = ddim(GaussianEps(mu, s, noise), x_t, steps=steps, spacing=spacing, noise=noise)
    expected = _euler_in_sigma(x_t, ddim_timesteps(T, steps, spacing), mu, s, abar)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)


@settings(max_examples=20)
@given(
    steps_spacing=st.one_of(
        st.tuples(st.sampled_from([d for d in DIVISORS if d <= 100]), st.just("uniform")),
        st.tuples(st.integers(1, 100), st.sampled_from(["quad", "linspace"])),
    ),
    mu=st.floats(-3, 3),
    eta=st.floats(0.0, 1.5),
)
def test_ddim_reproduces_a_point_mass_exactly(steps_spacing, mu, eta):
    # s = 0: the exact x0-prediction is mu at every step, whatever x_t, and the last step lands on alpha = 1
    # (c1 = c2 = 0 there), so any step count and any eta must return mu up to float32 rounding.
    steps, spacing = steps_spacing
    noise = NoiseSchedule()
    x_T = torch.randn(3, 2, 5, 5, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    out = ddim(GaussianEps(mu, 0.0, noise), x_T, steps=steps, spacing=spacing, eta=eta, noise=noise, generator=g)
    assert out.dtype == torch.float32 and out.shape == x_T.shape
    torch.testing.assert_close(out, torch.full_like(x_T, mu), rtol=0, atol=1e-5)


def test_ddim_point_mass_10_steps():
    noise = NoiseSchedule()
    x_T = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    out = ddim(GaussianEps(0.7, 0.0, noise), x_T, steps=10, noise=noise)
    torch.testing.assert_close(out, torch.full_like(x_T, 0.7), rtol=0, atol=1e-5)


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ancestral_steps_keep_the_point_mass_marginal(eta):
    # Data = mu: x_t = sqrt(ab) mu + sqrt(1-ab) n with n ~ N(0, 1). Each DDIM step lands on
    # sqrt(ab_next) mu + c2 eps + c1 noise, which has the marginal of t_next iff c2^2 + c1^2 = 1 - ab_next
    # (Song et al. Eq. 12). So the standardised residual (x - sqrt(ab) mu) / sqrt(1 - ab) stays N(0, 1) at every step.
    noise = NoiseSchedule()
    abar = noise.alphas_cumprod()
    mu, steps = 0.4, 10
    seq = ddim_timesteps(T, steps, "uniform")
    ab_T = abar[seq[-1]].item()
    n = torch.randn(40_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x_T = ab_T**0.5 * mu + (1 - ab_T) ** 0.5 * n
    infos = []
    ddim(
        GaussianEps(mu, 0.0, noise),
        x_T,
        steps=steps,
        eta=eta,
        noise=noise,
        callback=infos.append,
        generator=torch.Generator().manual_seed(1),
    )
    for info in infos[1:]:
        ab = abar[info.t].item()
        r = (info.x - ab**0.5 * mu) / (1 - ab) ** 0.5
        assert abs(r.mean().item()) < 0.03
        assert abs(r.std().item() - 1) < 0.03
        assert abs(torch.corrcoef(torch.stack([r, n]))[0, 1].item()) < 0.99  # fresh noise was mixed in


@pytest.mark.parametrize("steps", [1, 10, 50])
def test_ldm_spacing_lands_on_alphas_cumprod_0(steps):
    # For a point mass eps(x_t) = (x_t - sqrt(ab) mu) / sqrt(1-ab) is the same at every step, so DDIM ending on
    # alphas_cumprod[0] (not 1) returns sqrt(ab_0) mu + sqrt(1 - ab_0) eps_T.
    noise = NoiseSchedule()
    abar = noise.alphas_cumprod()
    mu = 0.5
    x_T = torch.randn(32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ab_T = abar[ddim_timesteps(T, steps, "ldm")[-1]]
    eps_T = (x_T - ab_T.sqrt() * mu) / (1 - ab_T).sqrt()
    out = ddim(GaussianEps(mu, 0.0, noise), x_T, steps=steps, spacing="ldm", noise=noise)
    torch.testing.assert_close(out, abar[0].sqrt() * mu + (1 - abar[0]).sqrt() * eps_T, rtol=0, atol=1e-10)
    assert (out - mu).abs().max() > 1e-4  # not alpha = 1


# ----------------------------------------------------------------------------------------------------------------
# Determinism


def _toy():
    return GaussianEps(0.2, 0.8, NoiseSchedule())


def test_eta_positive_is_deterministic_given_the_generator():
    model, x_T = _toy(), torch.randn(4, 1, 6, 6, generator=torch.Generator().manual_seed(0))

    def run(seed):
        return ddim(model, x_T, steps=20, eta=1.0, generator=torch.Generator().manual_seed(seed))

    a, b, c = run(5), run(5), run(6)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-2
    eta0 = ddim(model, x_T, steps=20, eta=0.0)
    assert (a - eta0).abs().max() > 1e-2  # the noise is really injected


def test_eta_zero_ignores_the_generator_and_the_global_rng():
    model, x_T = _toy(), torch.randn(4, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    ref = ddim(model, x_T, steps=20, spacing="quad")
    for gen in (torch.Generator().manual_seed(1), torch.Generator().manual_seed(2), None):
        torch.manual_seed(123)
        assert torch.equal(ddim(model, x_T, steps=20, spacing="quad", generator=gen), ref)


def test_ddim_does_not_modify_its_input():
    x_T = torch.randn(2, 8, generator=torch.Generator().manual_seed(0))
    before = x_T.clone()
    ddim(_toy(), x_T, steps=5, eta=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x_T, before)


# ----------------------------------------------------------------------------------------------------------------
# Model protocol: step argument, t, cond, callback


class Recording(nn.Module):
    def __init__(self):
        super().__init__()
        self.noise_schedule = NoiseSchedule()
        self.calls = []

    def forward(self, x, t, cond=None, *, step):
        eps = 0.1 * x + 0.01 * t.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        self.calls.append(dict(step=step, t=t.clone(), x=x, cond=cond, eps=eps))
        return eps


@given(
    steps_spacing=st.one_of(
        st.tuples(st.sampled_from([d for d in DIVISORS if d <= 50]), st.sampled_from(["uniform", "ldm"])),
        st.tuples(st.integers(1, 50), st.sampled_from(["quad", "linspace"])),
    ),
    batch=st.integers(1, 4),
)
def test_model_is_called_with_step_index_and_decreasing_t(steps_spacing, batch):
    steps, spacing = steps_spacing
    model, cond = Recording(), object()
    ddim(model, torch.randn(batch, 3), steps=steps, spacing=spacing, cond=cond)
    seq = ddim_timesteps(T, steps, spacing)
    assert [c["step"] for c in model.calls] == list(range(steps))
    for i, call in enumerate(model.calls):
        t = call["t"]
        assert t.dtype == torch.long and t.shape == (batch,)
        assert torch.all(t == seq[steps - 1 - i])
        assert call["cond"] is cond
    ts = [int(c["t"][0]) for c in model.calls]
    assert all(a >= b for a, b in zip(ts, ts[1:], strict=False))


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_callback_step_info_is_consistent(eta):
    model, infos = Recording(), []
    x_T = torch.randn(3, 2, 4)
    steps = 8
    out = ddim(
        model,
        x_T,
        steps=steps,
        eta=eta,
        spacing="linspace",
        callback=infos.append,
        generator=torch.Generator().manual_seed(0),
    )
    abar = model.noise_schedule.alphas_cumprod()
    seq = ddim_timesteps(T, steps, "linspace")
    assert len(infos) == steps and all(isinstance(i, StepInfo) for i in infos)
    assert torch.equal(infos[0].x, x_T)
    for i, (info, call) in enumerate(zip(infos, model.calls, strict=True)):
        assert info.step == i
        assert isinstance(info.t, int) and info.t == seq[steps - 1 - i]
        assert torch.equal(info.x, call["x"])
        assert torch.equal(info.eps, call["eps"])
        ab = abar[info.t].item()
        torch.testing.assert_close(info.x0_pred, (info.x - (1 - ab) ** 0.5 * info.eps) / ab**0.5)
        assert info.x_next.shape == x_T.shape
        if i + 1 < steps:
            assert torch.equal(info.x_next, infos[i + 1].x)
    assert torch.equal(infos[-1].x_next, out)
    # eta = 0: the last step lands on alpha = 1, so the output is the last x0-prediction
    if eta == 0:
        torch.testing.assert_close(out, infos[-1].x0_pred)


# ----------------------------------------------------------------------------------------------------------------
# Adapter and argument checks


@pytest.fixture(scope="module")
def tiny_unet():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = DDPMUNet(
            DDPMConfig(
                resolution=8, in_channels=1, out_ch=1, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=()
            ),
            noise_schedule=NoiseSchedule(),
        )
    return unet.eval()


def test_bare_unet_is_refused_with_a_pointer_to_full_precision(tiny_unet):
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(ConfigError, match="FullPrecision"):
        ddim(tiny_unet, x, steps=2)


def test_full_precision_adapter_runs_the_unet(tiny_unet):
    x = torch.randn(2, 1, 8, 8)
    wrapped = FullPrecision(tiny_unet)
    assert wrapped.noise_schedule is tiny_unet.noise_schedule
    infos = []
    out = ddim(wrapped, x, steps=2, spacing="linspace", callback=infos.append)
    assert out.shape == x.shape and torch.isfinite(out).all()
    with torch.no_grad():
        direct = tiny_unet(x, torch.full((2,), T - 1))
    torch.testing.assert_close(infos[0].eps, direct)


def test_missing_noise_schedule_raises():
    def model(x, t, cond=None, *, step):
        return torch.zeros_like(x)

    with pytest.raises(ConfigError, match="noise"):
        ddim(model, torch.randn(2, 3), steps=2)
    out = ddim(model, torch.randn(2, 3), steps=2, noise=NoiseSchedule())  # explicit schedule is enough
    assert out.shape == (2, 3)


def test_plain_function_with_var_kwargs_is_accepted():
    def model(x, t, cond=None, **kwargs):
        assert "step" in kwargs
        return torch.zeros_like(x)

    ddim(model, torch.randn(2, 3), steps=4, noise=NoiseSchedule())


def test_negative_eta_raises():
    with pytest.raises(ConfigError):
        ddim(_toy(), torch.randn(2, 3), steps=2, eta=-0.1)


@pytest.mark.parametrize("dtype", [torch.long, torch.int32, torch.bool])
def test_non_float_x_raises(dtype):
    with pytest.raises(InputShapeError):
        ddim(_toy(), torch.zeros(2, 3, dtype=dtype), steps=2)

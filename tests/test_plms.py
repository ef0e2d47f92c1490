"""PLMS: model-call indexing (two calls at step 0), agreement with an independent transcription of LDM's
PLMSSampler on an analytic model, determinism, order of accuracy, and use with a cached CompressedUNet."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from cq.cache.deepcache import DeepCache
from cq.cache.uniform import UniformSchedule
from cq.compressed import CompressedUNet
from cq.errors import ConfigError, StepCountMismatchError
from cq.models import build
from cq.sampling import NoiseSchedule, ddim, ddim_timesteps, plms
from cq.sampling.plms import num_calls


SCHEDULE = NoiseSchedule(kind="scaled_linear", beta_start=0.00085, beta_end=0.012)  # SD's
MU, SIGMA = 0.7, 0.4  # the data distribution of the analytic model: x0 ~ N(MU, SIGMA^2) per element


class GaussianEps(nn.Module):
    """The exact noise prediction E[eps | x_t] for x0 ~ N(MU, SIGMA^2); records every call."""

    def __init__(self, schedule: NoiseSchedule = SCHEDULE):
        super().__init__()
        self.noise_schedule = schedule
        self.abar = schedule.alphas_cumprod()
        self.calls: list[tuple[int, int, torch.Tensor]] = []

    def forward(self, x, t, cond=None, *, step: int):
        self.calls.append((step, int(t[0]), x.clone()))
        a = self.abar[t].to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return (1 - a).sqrt() * (x - a.sqrt() * MU) / (a * SIGMA**2 + 1 - a)


def reference_plms(x_T: np.ndarray, steps: int, abar: np.ndarray) -> np.ndarray:
    """LDM ``PLMSSampler.plms_sampling`` / ``p_sample_plms`` transcribed in float64 numpy (eta = 0, no guidance)."""

    def eps_model(x, t):
        a = abar[t]
        return np.sqrt(1 - a) * (x - np.sqrt(a) * MU) / (a * SIGMA**2 + 1 - a)

    c = 1000 // steps
    ddim_timesteps_ = np.asarray(list(range(0, 1000, c))) + 1  # make_ddim_timesteps(uniform) + steps offset
    alphas = abar[ddim_timesteps_]
    alphas_prev = np.asarray([abar[0]] + abar[ddim_timesteps_[:-1]].tolist())
    time_range = np.flip(ddim_timesteps_)
    total = ddim_timesteps_.shape[0]
    img, old_eps = x_T.copy(), []
    for i, step in enumerate(time_range):
        index = total - i - 1
        t_next = time_range[min(i + 1, len(time_range) - 1)]

        def x_prev_and_x0(e_t, index=index, img=img):
            a_t, a_prev = alphas[index], alphas_prev[index]
            pred_x0 = (img - np.sqrt(1 - a_t) * e_t) / np.sqrt(a_t)
            return np.sqrt(a_prev) * pred_x0 + np.sqrt(1.0 - a_prev) * e_t, pred_x0

        e_t = eps_model(img, step)
        if len(old_eps) == 0:
            x_prev, _ = x_prev_and_x0(e_t)
            e_t_prime = (e_t + eps_model(x_prev, t_next)) / 2
        elif len(old_eps) == 1:
            e_t_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_t_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_t_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        img, _ = x_prev_and_x0(e_t_prime)
        old_eps.append(e_t)
        if len(old_eps) >= 4:
            old_eps.pop(0)
    return img


def _noise(n: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("steps", [1, 2, 4, 5, 8, 10, 50])
def test_matches_ldm_plms_transcription(steps):
    x = _noise()
    out = plms(GaussianEps(), x, steps=steps)
    expected = reference_plms(x.numpy(), steps, SCHEDULE.alphas_cumprod().numpy())
    assert np.abs(out.numpy() - expected).max() < 1e-10  # float64 on both sides


def test_float32_close_to_float64():
    x = _noise()
    out32 = plms(GaussianEps(), x.float(), steps=20)
    out64 = plms(GaussianEps(), x, steps=20)
    assert out32.dtype == torch.float32
    assert (out32.double() - out64).abs().max() < 1e-4


def test_call_indices_and_timesteps():
    """S sampler steps make S+1 calls, indexed 0..S in call order; calls 1 and 2 share a timestep."""
    steps = 5
    model = GaussianEps()
    plms(model, _noise(2), steps=steps)
    seq = ddim_timesteps(1000, steps, "ldm")[::-1]  # noisiest first: 801, 601, 401, 201, 1
    assert num_calls(steps) == plms.num_calls(steps) == 6
    assert [c[0] for c in model.calls] == list(range(6))
    assert [c[1] for c in model.calls] == [seq[0], seq[1], seq[1], seq[2], seq[3], seq[4]]
    assert not torch.equal(model.calls[1][2], model.calls[2][2])  # the predictor's input vs the real x_1


def test_one_step_makes_two_calls_at_the_same_timestep():
    model = GaussianEps()
    plms(model, _noise(2), steps=1)
    assert [(c[0], c[1]) for c in model.calls] == [(0, 1), (1, 1)]


@given(steps=st.sampled_from([2, 4, 5, 8, 10, 20, 25]), seed=st.integers(0, 2**31 - 1))
def test_deterministic(steps, seed):
    x = _noise(4, seed).float()
    a = plms(GaussianEps(), x, steps=steps)
    b = plms(GaussianEps(), x.clone(), steps=steps)
    assert torch.equal(a, b)


def test_higher_order_than_ddim():
    """Against a 500-step DDIM solution of the same ODE, 20-step PLMS is far closer than 20-step DDIM."""
    x = _noise(256)
    fine = ddim(GaussianEps(), x, steps=500, spacing="ldm")
    err_plms = (plms(GaussianEps(), x, steps=20) - fine).abs().max()
    err_ddim = (ddim(GaussianEps(), x, steps=20, spacing="ldm") - fine).abs().max()
    assert err_plms < err_ddim / 5
    # and it samples the data distribution
    out = plms(GaussianEps(), _noise(4096), steps=50)
    assert abs(out.mean().item() - MU) < 0.03 and abs(out.std().item() - SIGMA) < 0.03


def test_callback_reports_sampler_steps():
    seen = []
    x = _noise(2)
    out = plms(GaussianEps(), x, steps=4, callback=seen.append)
    assert [s.step for s in seen] == [0, 1, 2, 3]
    assert [s.t for s in seen] == ddim_timesteps(1000, 4, "ldm")[::-1]
    assert torch.equal(seen[0].x, x) and torch.equal(seen[-1].x_next, out)
    for info in seen:
        assert torch.equal(info.x_next, seen[info.step + 1].x) if info.step < 3 else True


def test_refusals():
    with pytest.raises(ConfigError, match="eta"):
        plms(GaussianEps(), _noise(1), steps=5, eta=1.0)
    with pytest.raises(ConfigError, match="step="):
        plms(lambda x, t, cond: x, _noise(1), steps=5, noise=SCHEDULE)
    with pytest.raises(ConfigError, match="steps"):
        num_calls(0)

    class Fitted(GaussianEps):
        num_steps = 5

    with pytest.raises(StepCountMismatchError, match="num_calls"):
        plms(Fitted(), _noise(1), steps=5)
    plms(Fitted(), _noise(1), steps=4)  # 4 steps = 5 calls


def test_compressed_unet_fitted_for_plms_calls():
    """A CompressedUNet for PLMS has num_steps = plms.num_calls(steps); its cache sees calls in order. Interval 1
    is the uncached model."""
    unet = build("tiny-ldm-church", seed=0)
    steps = 5
    x = torch.randn(2, *unet.sample_shape, generator=torch.Generator().manual_seed(0))
    from cq.sampling import FullPrecision

    plain = plms(FullPrecision(unet), x, steps=steps)
    every = CompressedUNet(unet, num_steps=num_calls(steps), cacher=DeepCache(schedule=UniformSchedule(interval=1)))
    assert torch.equal(plms(every, x, steps=steps), plain)
    cached = CompressedUNet(unet, num_steps=num_calls(steps), cacher=DeepCache(schedule=UniformSchedule(interval=3)))
    assert cached.refresh_mask() == (True, False, False, True, False, False)
    out = plms(cached, x, steps=steps)
    assert out.shape == x.shape and torch.isfinite(out).all() and not torch.equal(out, plain)
    with pytest.raises(StepCountMismatchError, match="num_calls"):
        plms(cached, x, steps=steps * 2)

"""A fitted `CompressedUNet` called without ``step=`` maps its timestep to the model-call index through its recorded
sampler settings (a pure lookup, no counter): the same outputs as the explicit step for every sampler, unknown
timesteps refused naming the fitted ones, PLMS's shared timestep refused as ambiguous."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cq
from cq.compressed import CompressedUNet
from cq.errors import AmbiguousTimestepError, InputValueError, TimestepNotFittedError
from cq.sampling import SamplerSettings, ddim, dpm_solver, plms, seeded_noise
from cq.sampling.settings import planned_settings


STEPS = 6
CASES = [(ddim, "linspace"), (plms, "ldm"), (dpm_solver, "trailing")]


@pytest.fixture(scope="module")
def fitted(unet):
    out = {}
    recipe = cq.deepcache(interval=2)
    for sampler, spacing in CASES:
        steps = 5 if sampler is plms else STEPS  # 1000 / 5 divides for ldm spacing
        trace = cq.trace(
            unet, sampler, steps=steps, num_samples=2, points=recipe.points(unet), spacing=spacing, progress=False
        )
        out[sampler.__name__] = (recipe.fit(unet, trace, progress=False), steps, spacing)
    return out


class _Without(torch.nn.Module):
    """Drives a model the way a diffusers loop does: ``t`` only, plus the step for PLMS's shared timestep."""

    def __init__(self, model: CompressedUNet):
        super().__init__()
        self.model = model
        self.noise_schedule, self.num_steps = model.noise_schedule, model.num_steps
        self.sampler_settings = model.sampler_settings

    def forward(self, x, t, cond=None, *, step):
        if len(self.model.steps_of(t)) > 1:
            return self.model(x, t, cond, step=step)
        assert self.model.step_of(t) == step
        return self.model(x, t, cond)


@pytest.mark.parametrize("name", [c[0].__name__ for c in CASES])
def test_lookup_gives_the_explicit_steps_outputs(fitted, name):
    model, steps, spacing = fitted[name]
    sampler = {"ddim": ddim, "plms": plms, "dpm_solver": dpm_solver}[name]
    noise = seeded_noise(model.sample_shape, range(50, 52))
    explicit = sampler(model, noise, steps=steps, spacing=spacing)
    assert torch.equal(sampler(_Without(model), noise, steps=steps, spacing=spacing), explicit)


def test_unknown_timesteps_are_refused_naming_the_fitted_ones(fitted):
    model, steps, _ = fitted["ddim"]
    x = seeded_noise(model.sample_shape, [0])
    fitted_t = list(model.sampler_settings.timesteps)
    for t in (fitted_t[0] - 1, fitted_t[1] + 0.5):
        with pytest.raises(TimestepNotFittedError, match=r"is not one this model was fitted for.*refit") as e:
            model(x, torch.tensor([t]))
        assert str(fitted_t) in str(e.value)
    with pytest.raises(InputValueError, match="one timestep for the whole batch"):
        model(torch.cat([x, x]), torch.tensor(fitted_t[:2]))
    model(x, torch.tensor(float(fitted_t[2])))  # an integral float (Euler's timesteps) and a 0-d tensor are fine


def test_plms_shared_timestep_is_ambiguous(fitted):
    model, _, _ = fitted["plms"]
    t1 = model.sampler_settings.timesteps[1]
    assert model.steps_of(t1) == (1, 2)
    with pytest.raises(AmbiguousTimestepError, match=r"calls \[1, 2\].*pass step="):
        model(seeded_noise(model.sample_shape, [0]), torch.tensor([t1]))


def test_a_model_without_settings_asks_for_step(unet):
    model = CompressedUNet(unet, num_steps=3)
    with pytest.raises(TimestepNotFittedError, match=r"records no fitted timesteps .*: pass step="):
        model(seeded_noise(model.sample_shape, [0]), torch.tensor([10]))


@settings(max_examples=50, deadline=None)
@given(
    sampler=st.sampled_from(["ddim", "plms", "dpm_solver"]),
    steps=st.integers(1, 60),
    spacing_index=st.integers(0, 2),
    probe=st.integers(0, 999),
)
def test_calls_at_inverts_the_timesteps(sampler, steps, spacing_index, probe):
    spacing = {"dpm_solver": ("linspace", "leading", "trailing")}.get(sampler, ("linspace", "quad", "linspace"))
    s = planned_settings(sampler, steps, 1000, spacing=spacing[spacing_index])
    for i, t in enumerate(s.timesteps):
        assert i in s.calls_at(t)
    assert sum(len(s.calls_at(t)) for t in set(s.timesteps)) == s.calls
    assert (probe in s.timesteps) == bool(s.calls_at(probe))
    assert isinstance(s, SamplerSettings)

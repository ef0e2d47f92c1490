"""A fitted model records how it must be sampled; every sampler and the CLI refuse other settings."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import cq
from cq.calib.trace import seeded_noise
from cq.cli import main
from cq.errors import CheckpointFormatError, ConfigError, SamplerMismatchError
from cq.models.presets import sampling_defaults
from cq.sampling import NoiseSchedule, SamplerSettings, ddim, plms, sampler_of
from cq.sampling.settings import planned_settings


STEPS = 10


@pytest.fixture(scope="module")
def fitted(unet):
    trace = cq.trace(unet, steps=STEPS, num_samples=2, points=[unet.default_cache_point()], progress=False)
    return cq.deepcache(interval=2).fit(unet, trace, progress=False)


def _noise(unet, n=1):
    return seeded_noise(unet.sample_shape, range(n))


def test_the_fitted_settings_are_recorded(fitted):
    s = fitted.sampler_settings
    assert (s.sampler, s.steps, s.spacing, s.eta, s.clip_x0) == ("ddim", STEPS, "uniform", 0.0, False)
    assert s.timesteps == tuple(range(900, -1, -100)) and s.calls == fitted.num_steps


@pytest.mark.parametrize(
    ("sampler", "kwargs", "field"),
    [
        (plms, {"steps": STEPS - 1, "spacing": "linspace"}, "sampler"),  # same call count (10), other sampler
        (ddim, {"steps": STEPS, "spacing": "quad"}, "spacing"),
        (ddim, {"steps": STEPS, "spacing": "linspace"}, "timesteps"),
        (ddim, {"steps": STEPS, "eta": 0.5}, "eta"),
        (ddim, {"steps": STEPS, "clip_x0": True}, "clip_x0"),
        (ddim, {"steps": 5}, "steps"),
    ],
)
def test_samplers_refuse_other_settings(unet, fitted, sampler, kwargs, field):
    with pytest.raises(SamplerMismatchError, match=field) as err:
        sampler(fitted, _noise(unet), **kwargs)
    assert "call_kwargs" in str(err.value)  # names the fix


def test_the_recorded_settings_reproduce_the_fitted_run(unet, fitted):
    kwargs = fitted.sampler_settings.call_kwargs()
    out = ddim(fitted, _noise(unet, 2), **kwargs)
    assert out.shape == (2, *unet.sample_shape) and torch.isfinite(out).all()


def test_settings_survive_save_and_load(fitted, tmp_path):
    loaded = cq.load(cq.save(fitted, tmp_path / "m.cq"))
    assert loaded.sampler_settings == fitted.sampler_settings
    with pytest.raises(SamplerMismatchError, match="spacing"):
        ddim(loaded, _noise(loaded), steps=STEPS, spacing="quad")


def test_a_file_without_settings_loads_and_checks_the_call_count(fitted, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from cq.artifact import _checksum

    path = cq.save(fitted, tmp_path / "m.cq")
    with safe_open(str(path), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())  # noqa: SIM118
    del meta["sampler"]
    meta["checksum"] = _checksum(tensors, meta)
    save_file(tensors, str(tmp_path / "old.cq"), metadata=meta)
    old = cq.load(tmp_path / "old.cq")
    assert old.sampler_settings is None
    ddim(old, _noise(old), steps=STEPS, spacing="linspace")  # not recorded: not refused
    with pytest.raises(SamplerMismatchError, match="10 model calls"):
        ddim(old, _noise(old), steps=5)


@pytest.mark.parametrize(
    "value",
    [
        "[]",
        "{}",
        '{"sampler": "ddim"}',
        json.dumps(
            {"sampler": "ddim", "steps": "10", "spacing": "uniform", "eta": 0, "clip_x0": False, "timesteps": []}
        ),
        json.dumps(
            {"sampler": "ddim", "steps": 2, "spacing": "uniform", "eta": 0, "clip_x0": False, "timesteps": [1]}
        ),
        "not json",
    ],
)
def test_malformed_settings_are_a_format_error(fitted, tmp_path, value):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from cq.artifact import _checksum

    path = cq.save(fitted, tmp_path / "m.cq")
    with safe_open(str(path), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())  # noqa: SIM118
    meta["sampler"] = value
    meta["checksum"] = _checksum(tensors, meta)
    save_file(tensors, str(tmp_path / "bad.cq"), metadata=meta)
    with pytest.raises(CheckpointFormatError):
        cq.load(tmp_path / "bad.cq")


def test_evaluate_defaults_to_the_fitted_settings_and_refuses_others_before_sampling(unet, fitted):
    result = cq.evaluate(fitted, unet, seeds=[5, 6], progress=False)
    assert len(result.psnr_db) == 2
    calls = []  # the callback sees every sampler step: nothing may be sampled before the refusal
    with pytest.raises(SamplerMismatchError, match="spacing"):
        cq.evaluate(fitted, unet, seeds=[5], steps=STEPS, spacing="quad", progress=False, callback=calls.append)
    assert calls == []


@given(
    sampler=st.sampled_from(["ddim", "plms"]),
    steps=st.integers(1, 40),
    spacing=st.sampled_from(["quad", "linspace", "uniform", "ldm"]),
)
def test_planned_timesteps_are_the_ones_the_sampler_calls(sampler, steps, spacing):
    schedule = NoiseSchedule()
    try:
        planned = planned_settings(sampler, steps, schedule.num_timesteps, spacing=spacing)
    except ConfigError:  # uniform / ldm need steps dividing T: the sampler refuses the same way
        with pytest.raises(ConfigError):
            (ddim if sampler == "ddim" else plms)(
                lambda x, t, c, *, step: x, torch.zeros(1, 1), steps=steps, spacing=spacing, noise=schedule
            )
        return
    seen: list[int] = []

    def spy(x, t, cond=None, *, step):
        assert step == len(seen)  # call indices run 0, 1, 2, ...
        seen.append(int(t[0]))
        return torch.zeros_like(x)

    fn = ddim if sampler == "ddim" else plms
    fn(spy, torch.zeros(1, 1), steps=steps, spacing=spacing, noise=schedule)
    assert tuple(seen) == planned.timesteps


def test_settings_round_trip_through_a_dict():
    s = SamplerSettings("plms", 3, "ldm", 0.0, False, timesteps=(667, 334, 334, 1))
    assert SamplerSettings.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    assert sampler_of(s) is plms and "clip_x0" not in s.call_kwargs()


def test_cli_and_python_share_the_spacing_default(unet):
    with pytest.raises(ConfigError, match="linspace"):  # the sampler would raise too: no silent switch
        sampling_defaults(cq.models.load("demo"), 3)
    with pytest.raises(ConfigError, match="linspace"):
        ddim(cq.sampling.FullPrecision(unet), _noise(unet), steps=3)
    assert sampling_defaults(cq.models.load("demo"), 3, "linspace")[1]["spacing"] == "linspace"


def test_cli_sample_uses_the_fitted_settings(tmp_path, capsys):
    demo = cq.models.load("demo")
    trace = cq.trace(
        demo, steps=4, num_samples=2, spacing="linspace", points=[demo.default_cache_point()], progress=False
    )
    path = cq.save(cq.deepcache(interval=2).fit(demo, trace, progress=False), tmp_path / "lin.cq")
    assert main(["sample", str(path), "--num", "1", "-o", str(tmp_path / "g.png")]) == 0  # not the preset's
    assert main(["sample", str(path), "--num", "1", "--spacing", "uniform", "-o", str(tmp_path / "g.png")]) == 2
    assert "spacing" in capsys.readouterr().err
    assert main(["fit", "--model", "demo", "--steps", "3", "--samples", "2", "-o", str(tmp_path / "x.cq")]) == 2
    assert "linspace" in capsys.readouterr().err and not (tmp_path / "x.cq").exists()

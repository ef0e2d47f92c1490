"""Model families: a user's own `CacheableUNet` registered with `cq.models.register_family` is fitted, saved and
reloaded bit-exactly; an unregistered family is refused naming the fix; names, classes and configs are unique."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import cq
from cq.errors import CheckpointFormatError, ConfigError, ModelFamilyNotRegisteredError
from cq.models import (
    MODEL_FAMILIES,
    CacheableUNet,
    DDPMConfig,
    DDPMUNet,
    LDMUNet,
    LDMUNetConfig,
    Preset,
    load_weights,
    register_family,
)
from cq.models.loading import build_from_description, describe_model
from cq.sampling import FullPrecision, NoiseSchedule, ddim


NAME = "test-tiny"


@dataclass(frozen=True, kw_only=True)
class TinyConfig:
    in_channels: int = 1
    size: int = 8
    channels: int = 8
    mult: tuple[int, ...] = (1, 2)  # a tuple field: saved as a list, rebuilt as a tuple


class TinyUNet(CacheableUNet):
    """conv_in (+ time) -> down -> [cache point "up"] -> up(cat(h, skip)) -> conv_out: one skip, one cut."""

    def __init__(self, config: TinyConfig, *, noise_schedule=None, preset=None):
        super().__init__(noise_schedule=noise_schedule, preset=preset)
        self.config = c = config
        wide = c.channels * c.mult[-1]
        self.temb = nn.Linear(1, c.channels)
        self.conv_in = nn.Conv2d(c.in_channels, c.channels, 3, padding=1)
        self.down = nn.Conv2d(c.channels, wide, 3, padding=1)
        self.up = nn.Conv2d(wide + c.channels, c.channels, 3, padding=1)
        self.conv_out = nn.Conv2d(c.channels, c.in_channels, 3, padding=1)

    @property
    def sample_shape(self):
        return (self.config.in_channels, self.config.size, self.config.size)

    def cache_points(self):
        return ("up",)

    def default_cache_point(self):
        return "up"

    def cache_consumer(self, point):
        self._check_point(point)
        return "up"

    def cache_channels(self, point):
        self._check_point(point)
        return self.config.channels * self.config.mult[-1]

    def concat_splits(self):
        return {"up": self.cache_channels("up")}

    def io_layers(self):
        return ("conv_in", "conv_out")

    def forward(self, x, t, cond=None, *, cache=None):
        t = self._check_timesteps(t, x.shape[0], x)
        self._check_cache(cache)
        skip = self.conv_in(x) + self.temb(t.float()[:, None] / 1000)[:, :, None, None]
        if cache is not None and cache.is_shallow:
            h = self._cached(cache, x.shape[0])
        else:
            h = F.silu(self.down(F.silu(skip)))
        if cache is not None:
            cache.store("up", h)
        return self.conv_out(F.silu(self.up(torch.cat([h, skip], dim=1))))


@pytest.fixture
def family():
    """The tiny family registered for one test; afterwards the registry holds exactly what it held before."""
    before = MODEL_FAMILIES.names()
    register_family(NAME, config=TinyConfig)(TinyUNet)
    yield MODEL_FAMILIES.get(NAME)
    for name in set(MODEL_FAMILIES.names()) - set(before):
        MODEL_FAMILIES.unregister(name)
    assert MODEL_FAMILIES.names() == before


def _tiny(config: TinyConfig = TinyConfig(), seed: int = 0) -> TinyUNet:
    torch.manual_seed(seed)
    return TinyUNet(config, noise_schedule=NoiseSchedule()).eval()


def _fitted(unet: CacheableUNet):
    trace = cq.trace(unet, steps=4, num_samples=2, points=[unet.default_cache_point()], progress=False)
    return cq.naive(interval=2).fit(unet, trace, progress=False)  # DeepCache + W8A8 (split concat, per step)


def _noise(unet: CacheableUNet) -> torch.Tensor:
    return torch.randn(2, *unet.sample_shape, generator=torch.Generator().manual_seed(7))


def test_a_registered_user_unet_is_fitted_saved_and_reloaded_bit_exactly(family, tmp_path):
    unet = _tiny()
    model = _fitted(unet)
    path = cq.save(model, tmp_path / "tiny.cq")
    loaded = cq.load(path)
    assert type(loaded.unet) is TinyUNet and loaded.unet.config == unet.config
    assert loaded.unet.noise_schedule == unet.noise_schedule
    assert loaded.refresh_mask() == model.refresh_mask() == (True, False, True, False)
    assert loaded.recipe == model.recipe
    noise = _noise(unet)
    out = ddim(model, noise, steps=4)
    assert torch.equal(ddim(loaded, noise, steps=4), out)
    assert not torch.equal(
        out, ddim(FullPrecision(unet), noise, steps=4)
    )  # compression changed the output: the test sees it


def test_loading_with_the_family_unregistered_names_the_fix(family, tmp_path):
    path = cq.save(_fitted(_tiny()), tmp_path / "tiny.cq")
    MODEL_FAMILIES.unregister(NAME)
    with pytest.raises(ModelFamilyNotRegisteredError) as e:
        cq.load(path)
    message = str(e.value)
    assert isinstance(e.value, CheckpointFormatError) and str(path) in message  # an error of the file, too
    assert f"unknown model family {NAME!r}" in message
    assert f"import the module that registers {NAME!r} first, or pass --plugin MODULE" in message
    register_family(NAME, config=TinyConfig)(TinyUNet)  # registering it again is all it takes
    assert type(cq.load(path).unet) is TinyUNet


def test_a_family_name_unet_class_and_config_class_belong_to_one_family(family):
    class Other(TinyUNet):
        pass

    @dataclass(frozen=True)
    class OtherConfig:
        channels: int = 4

    register_family(NAME, config=TinyConfig)(TinyUNet)  # the same registration again: a no-op
    refusals = {
        "name": lambda: register_family(NAME, config=OtherConfig)(Other),
        "UNet class": lambda: register_family("test-other", config=OtherConfig)(TinyUNet),
        "config class": lambda: register_family("test-other", config=TinyConfig)(Other),
    }
    for clash, register in refusals.items():
        with pytest.raises(ConfigError, match=f"its {clash} is already registered by family '{NAME}'"):
            register()
    with pytest.raises(ConfigError, match="concrete cq.models.CacheableUNet subclass"):
        register_family("test-other", config=OtherConfig)(nn.Conv2d)
    with pytest.raises(ConfigError, match="config must be a dataclass"):
        register_family("test-other", config=dict)(Other)
    assert MODEL_FAMILIES.get(NAME) == family and "test-other" not in MODEL_FAMILIES


def test_an_unregistered_subclass_is_fitted_but_refused_at_save_naming_the_fix(family, tmp_path):
    class Subclass(TinyUNet):
        pass

    torch.manual_seed(0)
    model = _fitted(Subclass(TinyConfig(), noise_schedule=NoiseSchedule()).eval())
    with pytest.raises(
        ModelFamilyNotRegisteredError,
        match=r"a subclass of TinyUNet is not registered itself.*"
        r"register it: @cq.models.register_family\('<name>', config=",
    ):
        cq.save(model, tmp_path / "sub.cq")
    assert not (tmp_path / "sub.cq").exists()


@settings(max_examples=15, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    in_channels=st.integers(1, 3),
    size=st.sampled_from([4, 8]),
    channels=st.integers(1, 6),
    mult=st.lists(st.integers(1, 3), min_size=1, max_size=3).map(tuple),
    saved_noise=st.booleans(),
)
def test_description_round_trips_through_json_to_the_same_architecture(
    family, in_channels, size, channels, mult, saved_noise
):
    config = TinyConfig(in_channels=in_channels, size=size, channels=channels, mult=mult)
    noise = NoiseSchedule(num_timesteps=500) if saved_noise else None
    unet = TinyUNet(config, noise_schedule=noise)
    desc = json.loads(json.dumps(describe_model(unet)))
    saved = {"config": dataclasses.asdict(config), "noise": dataclasses.asdict(noise) if noise else None}
    assert desc == {"family": NAME, **json.loads(json.dumps(saved)), "preset": None}
    rebuilt = build_from_description(desc, device="meta")
    assert type(rebuilt) is TinyUNet and rebuilt.config == config and isinstance(rebuilt.config.mult, tuple)
    assert rebuilt.noise_schedule == (noise or NoiseSchedule())
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in unet.state_dict().items()}
    assert Preset(name="mine", config=config, noise=NoiseSchedule()).family == NAME


@dataclass(frozen=True, kw_only=True)
class PrefixedConfig(TinyConfig):
    pass


class PrefixedUNet(TinyUNet):
    """A TinyUNet whose checkpoints store every key under ``net.`` (its family's key hook strips it)."""


def _strip_net(state, config, *, format, ema):
    assert isinstance(config, PrefixedConfig) and format == "auto" and ema is False
    return {k.removeprefix("net."): v for k, v in state.items()}


def test_load_weights_runs_the_family_key_hook_and_refuses_diffusers_keys_without_one(family):
    register_family("test-prefixed", config=PrefixedConfig, convert_keys=_strip_net)(PrefixedUNet)
    source = _tiny(seed=1)
    target = PrefixedUNet(PrefixedConfig(), noise_schedule=NoiseSchedule())
    load_weights(target, {f"net.{k}": v for k, v in source.state_dict().items()})
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in source.state_dict().items())
    load_weights(_tiny(seed=2), source.state_dict(), format="original")  # no hook: the UNet's own keys
    with pytest.raises(ConfigError, match=f"model family '{NAME}' .* converts no checkpoint keys.*convert_keys="):
        load_weights(_tiny(), source.state_dict(), format="diffusers")


def test_ddpm_and_ldm_are_families_registered_where_their_classes_are_defined():
    assert (MODEL_FAMILIES.get("ddpm").unet, MODEL_FAMILIES.get("ddpm").config) == (DDPMUNet, DDPMConfig)
    assert (MODEL_FAMILIES.get("ldm").unet, MODEL_FAMILIES.get("ldm").config) == (LDMUNet, LDMUNetConfig)
    assert all(MODEL_FAMILIES.get(name).convert_keys is not None for name in ("ddpm", "ldm"))

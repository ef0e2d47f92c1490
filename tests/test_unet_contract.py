"""The UNet contract: `CacheableUNet` declares what consumers read, constructors set it, consumers refuse
anything else with one message, presets split into the UNet part and the latent-pipeline part."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import cq
from cq.cache import DeepCache, UniformSchedule
from cq.errors import ConfigError
from cq.models import (
    PRESETS,
    CacheableUNet,
    DDPMConfig,
    DDPMUNet,
    LatentPipelineSpec,
    LDMUNet,
    LDMUNetConfig,
    Preset,
    build,
    check_cacheable,
)
from cq.models.loading import build_from_description, describe_model
from cq.sampling import FullPrecision, NoiseSchedule, ddim


LDM_PRESETS = [name for name, p in PRESETS.items() if isinstance(p.config, LDMUNetConfig)]


def _meta_build(name: str) -> CacheableUNet:
    with torch.device("meta"):
        return build(name)


@pytest.mark.parametrize("obj", [nn.Conv2d(3, 3, 1), lambda x, t: x], ids=["conv", "lambda"])
def test_check_cacheable_refuses_anything_but_a_cq_unet(obj):
    with pytest.raises(ConfigError, match=r"thing needs a cq UNet \(a cq.models.CacheableUNet subclass") as e:
        check_cacheable(obj, "thing")
    assert type(obj).__qualname__ in str(e.value) and "subclass CacheableUNet" in str(e.value)


def test_check_cacheable_returns_a_cq_unet(unet):
    assert check_cacheable(unet, "thing") is unet


def test_consumers_refuse_a_plain_module_naming_the_contract():
    conv = nn.Conv2d(3, 3, 1)
    calls = {
        "cq.trace": lambda: cq.trace(conv, steps=2, num_samples=1, noise=NoiseSchedule(), progress=False),
        "UniformQuantizer.prepare": lambda: cq.quant.UniformQuantizer().prepare(conv, 2),
        "DeepCache": lambda: DeepCache(schedule=UniformSchedule(interval=2)).resolve_point(conv),
        "CompressedUNet": lambda: cq.CompressedUNet(conv, num_steps=2),
    }
    for who, call in calls.items():
        with pytest.raises(ConfigError, match=rf"{who} needs a cq UNet \(a cq.models.CacheableUNet subclass"):
            call()


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_a_cacheable_unet_with_fields_set_by_its_constructor(name):
    p = PRESETS[name]
    unet = _meta_build(name)
    with torch.device("meta"):
        bare = type(unet)(p.config)
    assert isinstance(unet, CacheableUNet) and unet.noise_schedule is p.noise and unet.preset is p
    assert bare.noise_schedule is None and bare.preset is None
    assert vars(unet).keys() == vars(bare).keys()  # build attached nothing after __init__


def test_constructor_refuses_fields_of_the_wrong_type():
    config = DDPMConfig(resolution=8, ch=32, ch_mult=(1, 2), attn_resolutions=())
    with pytest.raises(ConfigError, match="noise_schedule must be a NoiseSchedule"):
        DDPMUNet(config, noise_schedule="linear")
    with pytest.raises(ConfigError, match="preset must be a cq.models.Preset"):
        DDPMUNet(config, preset="demo")


@pytest.mark.parametrize("name", LDM_PRESETS)
def test_ldm_default_cache_point_is_its_shallowest_and_what_deepcache_picked_before(name):
    unet = _meta_build(name)
    points = unet.cache_points()
    shallowest = f"output_blocks.{len(unet.output_blocks) - 1}"
    assert unet.default_cache_point() in points and unet.default_cache_point() == points[-1] == shallowest
    assert (
        DeepCache(schedule=UniformSchedule(interval=2)).resolve_point(unet) == shallowest
    )  # the old points[-1] fallback


def test_an_incomplete_subclass_cannot_be_built():
    class OnlyForward(CacheableUNet):
        def forward(self, x, t, cond=None, *, cache=None):
            return x

    with pytest.raises(TypeError, match="abstract"):
        OnlyForward()


class _Toy(CacheableUNet):
    """A two-conv UNet with one cache point between the convs: the smallest complete subclass."""

    def __init__(self):
        super().__init__(noise_schedule=NoiseSchedule())
        self.conv_in = nn.Conv2d(1, 4, 3, padding=1)
        self.conv_out = nn.Conv2d(4, 1, 3, padding=1)
        self.deep_calls = 0

    @property
    def sample_shape(self):
        return (1, 8, 8)

    def cache_points(self):
        return ("mid",)

    def default_cache_point(self):
        return "mid"

    def cache_consumer(self, point):
        self._check_point(point)
        return "conv_out"

    def cache_channels(self, point):
        self._check_point(point)
        return 4

    def concat_splits(self):
        return {}

    def io_layers(self):
        return ("conv_in", "conv_out")

    def forward(self, x, t, cond=None, *, cache=None):
        t = self._check_timesteps(t, x.shape[0])
        self._check_cache(cache)
        if cache is not None and cache.is_shallow:
            h = self._cached(cache, x.shape[0])
        else:
            self.deep_calls += 1
            h = self.conv_in(x)
        if cache is not None:
            cache.store("mid", h)
        return self.conv_out(h)


def test_a_user_subclass_is_traced_cached_and_sampled():
    toy = _Toy().eval()
    recorded = cq.trace(toy, steps=4, num_samples=2, points=["mid"], spacing="linspace", progress=False)
    assert recorded.features["mid"].shape == (4, 2, 4, 8, 8)
    cacher = DeepCache(schedule=UniformSchedule(interval=2)).fit(toy, recorded)
    model = cq.CompressedUNet(toy, num_steps=4, cacher=cacher)
    assert cacher.point == "mid" and model.noise_schedule is toy.noise_schedule
    toy.deep_calls = 0
    x0 = ddim(model, torch.randn(2, 1, 8, 8), steps=4, spacing="linspace")
    assert toy.deep_calls == 2 and bool(torch.isfinite(x0).all())  # refresh steps 0 and 2 only


def test_full_precision_carries_the_declared_noise_schedule_only(unet):
    assert FullPrecision(unet).noise_schedule is unet.noise_schedule
    assert FullPrecision(nn.Conv2d(1, 1, 1)).noise_schedule is None


# ----------------------------------------------------------------------------------------------------------------
# Presets


def test_preset_family_follows_the_config_type_and_only_ldm_presets_have_a_pipeline():
    assert "family" not in {f.name for f in dataclasses.fields(Preset)}
    for p in PRESETS.values():
        assert p.family == ("ldm" if isinstance(p.config, LDMUNetConfig) else "ddpm")
        assert p.pipeline is None or (p.family == "ldm" and isinstance(p.pipeline, LatentPipelineSpec))
    # the one LDM-family UNet-only preset: diffusers' SDXL test UNet (its pipelines load from folders' configs)
    unet_only = {name for name, p in PRESETS.items() if p.family == "ldm" and p.pipeline is None}
    assert unet_only == {"tiny-sdxl"}
    assert PRESETS["sd-v1"].pipeline.sampler == "plms" and PRESETS["sd-v1"].pipeline.guidance_scale == 7.5


def test_preset_refuses_a_pipeline_on_a_ddpm_unet_and_unknown_configs():
    demo = PRESETS["demo"]
    spec = PRESETS["tiny-sd"].pipeline
    with pytest.raises(ConfigError, match="latent pipeline needs an LDMUNetConfig"):
        dataclasses.replace(demo, pipeline=spec)
    with pytest.raises(ConfigError, match="no model family"):
        Preset(name="x", config=object(), noise=NoiseSchedule())
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.guidance_scale = 2.0


def test_saved_description_keeps_its_format_and_rebuilds_with_the_saved_noise():
    unet = build("demo", seed=0)
    desc = describe_model(unet)
    assert set(desc) == {"family", "config", "noise", "preset"} and desc["family"] == "ddpm"
    assert desc["preset"] == "demo"
    other = NoiseSchedule(kind="linear", beta_start=2e-4, beta_end=0.03, num_timesteps=500)
    rebuilt = build_from_description({**desc, "noise": dataclasses.asdict(other)}, device="meta")
    assert isinstance(rebuilt, DDPMUNet) and rebuilt.preset is PRESETS["demo"] and rebuilt.noise_schedule == other
    custom = build_from_description({**desc, "preset": None, "noise": None}, device="meta")
    assert custom.preset.name == "custom" and custom.noise_schedule == NoiseSchedule()
    lat = describe_model(_meta_build("tiny-sd"))
    assert lat["family"] == "ldm" and isinstance(build_from_description(lat, device="meta"), LDMUNet)

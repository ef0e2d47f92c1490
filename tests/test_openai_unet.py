"""LDMUNet (openaimodel.UNetModel): parity with diffusers' UNet2DConditionModel / UNet2DModel, key maps (against
diffusers' own LDM converter), config conversion and validation, cache points, quantization hooks, recipes."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import cq
from cq.core.view import CacheView
from cq.errors import CacheEmptyError, CachePointError, ConfigError, InputShapeError
from cq.models import LDMUNet, LDMUNetConfig, build, get_preset, load_weights
from cq.models.convert_ldm import (
    ldm_unet_config_from_diffusers,
    ldm_unet_from_diffusers,
    ldm_unet_to_diffusers,
)
from cq.models.openai_unet import ldm_timestep_embedding


# fp32 parity tolerance. The LDM timestep embedding and diffusers' get_timestep_embedding(flip_sin_to_cos=True,
# downscale_freq_shift=0) use the same op order (bit-equal), but diffusers runs attention through SDPA and its
# legacy-attention path scales q.k once by dh**-0.5 where LDM scales q and k by dh**-0.25 each: reductions and
# roundings are reordered. Measured max |diff| ~3e-6 on outputs of magnitude ~1.5; 5e-5 leaves a 10x margin.
PARITY_ATOL = 5e-5

# ecosystem.md §B: SD-like (cross-attention at the first level, 4 heads) and cin256-like (1 head, context length 1)
COND_CONFIGS = {
    "sd": dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=32,
    ),
    "cin": dict(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=2,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=48,
        attention_head_dim=1,
        norm_num_groups=32,
    ),
    # three levels, one res block per level, two transformer layers per attention
    "deep": dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=2,
        transformer_layers_per_block=2,
        norm_num_groups=32,
    ),
    # diffusers' SD 2 pipeline-test UNet (per-block heads, linear projections) with fp32 attention
    "sd2": dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        upcast_attention=True,
    ),
    # heads of one width (16 channels) over both levels: CompVis' num_head_channels
    "head-width": dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
    ),
    # heads of different widths and transformer depth per level
    "per-level": dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 8),
        transformer_layers_per_block=(1, 2),
    ),
}
CONTEXT_LENGTH = {"sd": 77, "cin": 1, "deep": 5, "sd2": 7, "head-width": 3, "per-level": 4}
# how each config's heads and depths arrive in LDMUNetConfig
EXPECTED_HEADS = {
    "sd2": dict(num_heads=4, use_linear_in_transformer=True, upcast_attention=True),
    "head-width": dict(num_heads=-1, num_head_channels=16, use_linear_in_transformer=True),
    "per-level": dict(num_heads=(2, 8), transformer_depth=(1, 2), use_linear_in_transformer=False),
}

# ecosystem.md §B: LDM-LSUN-like UNet2DModel (legacy attention). UNet2DModel's attention_head_dim is channels per head.
LSUN_COMMON = dict(flip_sin_to_cos=True, freq_shift=0, norm_eps=1e-5, downsample_padding=1, norm_num_groups=32)
UNCOND_CONFIGS = {
    # churches: scale-shift norm, ResBlock up/down sampling, fixed heads (equal channels at the attention levels)
    "church": dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(32, 32),
        down_block_types=("AttnDownBlock2D",) * 2,
        up_block_types=("AttnUpBlock2D",) * 2,
        resnet_time_scale_shift="scale_shift",
        downsample_type="resnet",
        upsample_type="resnet",
        attention_head_dim=16,
        attn_norm_num_groups=32,
    ),
    # churches' other half: no attention on the lowest level, whose upsampler is a ResBlock too
    "church-bottom": dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(32, 64),
        down_block_types=("AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("ResnetUpsampleBlock2D", "AttnUpBlock2D"),
        resnet_time_scale_shift="scale_shift",
        downsample_type="resnet",
        upsample_type="resnet",
        attention_head_dim=16,
        attn_norm_num_groups=32,
    ),
    # the ecosystem.md §B config (8 channels per head at 32 and 64 channels)
    "lsun": dict(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        layers_per_block=2,
        block_out_channels=(32, 64),
        down_block_types=("AttnDownBlock2D",) * 2,
        up_block_types=("AttnUpBlock2D",) * 2,
        resnet_time_scale_shift="scale_shift",
        downsample_type="resnet",
        upsample_type="resnet",
        attention_head_dim=8,
        attn_norm_num_groups=32,
    ),
    # bedrooms: plain time embedding, conv resampling, num_head_channels, attention on the lower level only
    "bedroom": dict(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        layers_per_block=2,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=32,
    ),
}


def _seeded(make, seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make().eval()


def _randomize(module: nn.Module, seed: int) -> nn.Module:
    """Every parameter random (norm gains and biases included), with values unlike any other seed's."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim >= 2:  # fan-in scaled, so activations stay O(1) through the network
                p.copy_(noise / p[0].numel() ** 0.5)
            else:  # norm gains around 1, biases around 0
                p.copy_(0.1 * noise + (1.0 if name.endswith("weight") else 0.0))
    return module


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _inputs(batch: int, channels: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=g)
    t = torch.tensor([0, 1, 500, 999, 250, 37][:batch])
    return x, t


# ----------------------------------------------------------------------------------------------------------------
# Parity with diffusers


@pytest.fixture(scope="module", params=sorted(COND_CONFIGS))
def cond_pair(request):
    from diffusers import UNet2DConditionModel

    kwargs = COND_CONFIGS[request.param]
    ref = _seeded(lambda: UNet2DConditionModel(**kwargs), 1)
    unet = LDMUNet(ldm_unet_config_from_diffusers(dict(ref.config))).eval()
    load_weights(unet, ref.state_dict())  # diffusers keys, detected
    return request.param, unet, ref


@pytest.fixture(scope="module", params=sorted(UNCOND_CONFIGS))
def uncond_pair(request):
    from diffusers import UNet2DModel

    kwargs = {**LSUN_COMMON, **UNCOND_CONFIGS[request.param]}
    ref = _seeded(lambda: UNet2DModel(**kwargs), 2)
    unet = LDMUNet(ldm_unet_config_from_diffusers(dict(ref.config))).eval()
    load_weights(unet, ref.state_dict())
    return request.param, unet, ref


def test_cross_attention_parity_with_diffusers(cond_pair):
    name, unet, ref = cond_pair
    c = unet.config
    assert c.use_spatial_transformer and c.context_dim == COND_CONFIGS[name]["cross_attention_dim"]
    for field, value in EXPECTED_HEADS.get(name, {}).items():
        assert getattr(c, field) == value, field
    assert sum(p.numel() for p in unet.parameters()) == sum(p.numel() for p in ref.parameters())
    x, t = _inputs(4, c.in_channels, c.image_size)
    ctx = torch.randn(4, CONTEXT_LENGTH[name], c.context_dim, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = unet(x, t, ctx)
        expected = ref(x, t, encoder_hidden_states=ctx).sample
    assert out.shape == expected.shape == x.shape[:1] + (c.out_channels,) + x.shape[2:]
    assert expected.abs().max() > 0.1
    assert _max_diff(out, expected) <= PARITY_ATOL
    with torch.no_grad():  # the context matters
        assert _max_diff(unet(x, t, ctx.flip(0)), expected) > 100 * PARITY_ATOL


def test_legacy_attention_parity_with_diffusers(uncond_pair):
    name, unet, ref = uncond_pair
    c = unet.config
    assert not c.use_spatial_transformer
    assert c.use_scale_shift_norm == c.resblock_updown == name.startswith(("church", "lsun"))
    assert sum(p.numel() for p in unet.parameters()) == sum(p.numel() for p in ref.parameters())
    x, t = _inputs(4, c.in_channels, c.image_size)
    with torch.no_grad():
        out = unet(x, t)
        expected = ref(x, t).sample
    assert expected.abs().max() > 0.1
    assert _max_diff(out, expected) <= PARITY_ATOL


def test_fixed_heads_equal_head_channels_when_channels_agree():
    """Churches set num_heads (8), not channels per head: with equal channels both give the same split."""
    from diffusers import UNet2DModel

    kwargs = {**LSUN_COMMON, **UNCOND_CONFIGS["church"]}
    ref = _seeded(lambda: UNet2DModel(**kwargs), 4)
    config = ldm_unet_config_from_diffusers(dict(ref.config))
    assert config.num_head_channels == 16
    fixed = LDMUNet(dataclasses.replace(config, num_heads=2, num_head_channels=-1)).eval()
    load_weights(fixed, ref.state_dict())
    x, t = _inputs(2, 4, 16)
    with torch.no_grad():
        assert _max_diff(fixed(x, t), ref(x, t).sample) <= PARITY_ATOL


@given(batch=st.integers(1, 3), data=st.data())
def test_parity_over_timesteps(cond_pair, batch, data):
    name, unet, ref = cond_pair
    c = unet.config
    t = torch.tensor(data.draw(st.lists(st.integers(0, 999), min_size=batch, max_size=batch)))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(batch, c.in_channels, c.image_size, c.image_size, generator=g)
    ctx = torch.randn(batch, CONTEXT_LENGTH[name], c.context_dim, generator=g)
    with torch.no_grad():
        assert _max_diff(unet(x, t, ctx), ref(x, t, encoder_hidden_states=ctx).sample) <= PARITY_ATOL


def test_timestep_embedding_matches_diffusers_bit_for_bit():
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.arange(0, 1000, 7)
    for dim in (32, 320, 33):
        expected = get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        assert torch.equal(ldm_timestep_embedding(t, dim), expected)


def test_other_resolutions_run(cond_pair):
    """LDM UNets run at any multiple of 2**(levels-1) (SD at 256 px uses 32x32 latents)."""
    name, unet, ref = cond_pair
    c = unet.config
    x = torch.randn(1, c.in_channels, 2 * c.image_size, c.image_size)
    ctx = torch.randn(1, 3, c.context_dim)
    with torch.no_grad():
        assert _max_diff(unet(x, torch.tensor([5]), ctx), ref(x, 5, encoder_hidden_states=ctx).sample) < PARITY_ATOL


# ----------------------------------------------------------------------------------------------------------------
# Key maps


def _diffusers_config_for_oracle(ref: nn.Module) -> dict:
    return dict(ref.config)


def test_map_agrees_with_diffusers_converter(cond_pair):
    """diffusers' single-file converter (original LDM checkpoint -> diffusers) is an independent oracle."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    name, unet, ref = cond_pair
    fresh = _randomize(LDMUNet(unet.config), seed=5).state_dict()  # values unlike ref's
    ckpt = {f"model.diffusion_model.{k}": v for k, v in fresh.items()}
    ckpt["first_stage_model.decoder.conv_in.weight"] = torch.zeros(1)  # other parts of an LDM file are ignored
    oracle = convert_ldm_unet_checkpoint(ckpt, _diffusers_config_for_oracle(ref))
    ours = ldm_unet_to_diffusers(fresh, unet.config)
    assert ours.keys() == oracle.keys() == ref.state_dict().keys()
    for key in ours:
        assert torch.equal(ours[key], oracle[key]), key
    # and the oracle's output loads strictly into the diffusers model, giving the cq model's outputs
    other = type(ref).from_config(ref.config).eval()
    other.load_state_dict(oracle, strict=True)
    mine = LDMUNet(unet.config).eval()
    mine.load_state_dict(fresh)
    c = unet.config
    x, t = _inputs(2, c.in_channels, c.image_size)
    ctx = torch.randn(2, CONTEXT_LENGTH[name], c.context_dim)
    with torch.no_grad():
        expected = other(x, t, encoder_hidden_states=ctx).sample
        assert expected.abs().max() > 0.1
        assert _max_diff(mine(x, t, ctx), expected) <= PARITY_ATOL * expected.abs().max().clamp(min=1)


def _check_round_trip(unet: LDMUNet, ref: nn.Module) -> None:
    fresh = _randomize(LDMUNet(unet.config), seed=6).state_dict()
    there = ldm_unet_to_diffusers(fresh, unet.config)
    assert there.keys() == ref.state_dict().keys()
    for key, value in there.items():
        assert value.shape == ref.state_dict()[key].shape, key
    back = ldm_unet_from_diffusers(there, unet.config)
    assert back.keys() == fresh.keys()
    for key in back:
        assert torch.equal(back[key], fresh[key]), key


def test_cross_attention_map_round_trips(cond_pair):
    _check_round_trip(cond_pair[1], cond_pair[2])


def test_legacy_attention_map_round_trips(uncond_pair):
    """The legacy qkv [3C, C, 1] is laid out [head][q|k|v][dh]; the split per head must invert exactly."""
    _check_round_trip(uncond_pair[1], uncond_pair[2])


def test_legacy_qkv_split_is_per_head():
    config = LDMUNetConfig(
        image_size=8,
        in_channels=3,
        out_channels=3,
        model_channels=32,
        channel_mult=(1,),
        attention_resolutions=(1,),
        num_head_channels=8,
    )
    unet = LDMUNet(config)
    state = {k: torch.zeros_like(v) for k, v in unet.state_dict().items()}
    qkv = torch.arange(96.0)  # bias of the middle attention: 4 heads x (q, k, v) x 8 channels
    state["middle_block.1.qkv.bias"] = qkv
    converted = ldm_unet_to_diffusers(state, config)
    q = converted["mid_block.attentions.0.to_q.bias"]
    k = converted["mid_block.attentions.0.to_k.bias"]
    assert q[:8].tolist() == list(range(0, 8)) and q[8:16].tolist() == list(range(24, 32))
    assert k[:8].tolist() == list(range(8, 16))


def test_from_diffusers_reports_unknown_keys(cond_pair):
    from cq.errors import CheckpointKeyMismatchError

    _, unet, ref = cond_pair
    state = dict(ref.state_dict())
    state["down_blocks.0.resnets.9.conv1.weight"] = torch.zeros(1)
    state["add_embedding.linear_1.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointKeyMismatchError) as info:
        ldm_unet_from_diffusers(state, unet.config)
    assert set(info.value.unexpected) == {"down_blocks.0.resnets.9.conv1.weight", "add_embedding.linear_1.weight"}


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("flip_sin_to_cos", False),
        ("freq_shift", 1),
        ("downsample_padding", 0),
        ("resnet_time_scale_shift", "scale_shift"),
        ("only_cross_attention", True),
        ("class_embed_type", "timestep"),
        ("addition_embed_type", "image"),
        ("norm_eps", 1e-6),
    ],
)
def test_config_from_diffusers_rejects_other_options(option, value):
    base = {"_class_name": "UNet2DConditionModel", **COND_CONFIGS["sd"]}
    ldm_unet_config_from_diffusers(base)  # control
    with pytest.raises(ConfigError, match=option):
        ldm_unet_config_from_diffusers({**base, option: value})


def test_config_from_diffusers_rejects_nested_depths_and_mismatched_levels():
    base = {"_class_name": "UNet2DConditionModel", **COND_CONFIGS["sd"]}
    with pytest.raises(ConfigError, match="attention_head_dim"):
        ldm_unet_config_from_diffusers({**base, "attention_head_dim": [4, 8, 8]})  # not one per block
    with pytest.raises(ConfigError, match="nested lists"):
        ldm_unet_config_from_diffusers({**base, "transformer_layers_per_block": [[1, 2], [1, 2]]})
    with pytest.raises(ConfigError, match="attention levels"):
        ldm_unet_config_from_diffusers({**base, "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D")})
    lsun = {"_class_name": "UNet2DModel", **LSUN_COMMON, **UNCOND_CONFIGS["lsun"]}
    with pytest.raises(ConfigError, match="attn_norm_num_groups"):
        ldm_unet_config_from_diffusers({**lsun, "attn_norm_num_groups": None})
    with pytest.raises(ConfigError, match="upsample_type"):
        ldm_unet_config_from_diffusers({**lsun, "upsample_type": "conv"})
    # diffusers' UpBlock2D upsamples with a conv whatever upsample_type says
    bottom = {"_class_name": "UNet2DModel", **LSUN_COMMON, **UNCOND_CONFIGS["church-bottom"]}
    with pytest.raises(ConfigError, match="ResnetUpsampleBlock2D"):
        ldm_unet_config_from_diffusers({**bottom, "up_block_types": ("UpBlock2D", "AttnUpBlock2D")})
    with pytest.raises(ConfigError, match="no LDM UNet counterpart"):
        ldm_unet_config_from_diffusers({**lsun, "down_block_types": ("SkipDownBlock2D", "AttnDownBlock2D")})


# ----------------------------------------------------------------------------------------------------------------
# Config validation and presets


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(channel_mult=()), "channel_mult"),
        (dict(image_size=12, channel_mult=(1, 2, 2, 2)), "divisible"),
        (dict(model_channels=48), "norm_groups"),
        (dict(use_spatial_transformer=True), "context_dim"),
        (dict(context_dim=32), "use_spatial_transformer"),
        (dict(num_classes=10, use_spatial_transformer=True, context_dim=32), "labels and a context"),
        (dict(num_heads=-1), "num_heads"),
        (dict(num_heads=3), "heads"),
        (dict(num_heads=-1, num_head_channels=24), "num_head_channels"),
        (dict(dropout=1.0), "dropout"),
        (dict(num_res_blocks=0), "num_res_blocks"),
    ],
)
def test_config_validation(kwargs, match):
    base = dict(
        image_size=8,
        in_channels=4,
        out_channels=4,
        model_channels=32,
        channel_mult=(1, 2),
        attention_resolutions=(1,),
        num_heads=4,
    )
    LDMUNetConfig(**base)  # control
    with pytest.raises(ConfigError, match=match):
        LDMUNetConfig(**{**base, **kwargs})


# Parameters in millions. SD v1 859.5M, cin256-v2 400.9M and bedrooms 274.1M are ecosystem.md §B's counts of the
# equivalent diffusers models. Churches: 294.97M (the LDM paper's 294M); §B's 288.5M comes from a diffusers
# UNet2DModel whose first up block (UpBlock2D) upsamples with a conv where LDM's resblock_updown uses a ResBlock.
FULL_PARAMS = {"sd-v1": 859.521, "ldm-cin256-v2": 400.921, "ldm-bedroom": 274.056, "ldm-church": 294.967}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FULL_PARAMS))
def test_full_presets_build_on_meta(name):
    with torch.device("meta"):
        unet = build(name)
    params = sum(p.numel() for p in unet.parameters()) / 1e6
    assert params == pytest.approx(FULL_PARAMS[name], abs=0.01)
    assert unet.cache_points()[-1] == f"output_blocks.{len(unet.output_blocks) - 1}"


def test_sd_preset_matches_diffusers_sd_config():
    """The sd-v1 preset is the architecture of diffusers' SD v1 UNet config (ecosystem.md §A4)."""
    sd = {
        "_class_name": "UNet2DConditionModel",
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": [320, 640, 1280, 1280],
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        "layers_per_block": 2,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "norm_eps": 1e-5,
        "norm_num_groups": 32,
        "use_linear_projection": False,
    }
    preset = get_preset("sd-v1").config  # attention_resolutions in the yaml's order (4, 2, 1)
    converted = ldm_unet_config_from_diffusers(sd)
    assert dataclasses.replace(converted, attention_resolutions=preset.attention_resolutions) == preset
    assert sorted(converted.attention_resolutions) == sorted(preset.attention_resolutions)


# ----------------------------------------------------------------------------------------------------------------
# Cache points


@pytest.fixture(scope="module", params=["tiny-sd", "tiny-ldm-church", "tiny-ldm-cin"])
def tiny(request):
    unet = build(request.param, seed=11)
    _randomize(unet, seed=12)  # out.2 and proj_out are not zero here, but make sure no layer is inert
    c = unet.config
    if c.context_dim is not None:
        cond_len = 1 if request.param == "tiny-ldm-cin" else 7
        make_cond = lambda b, g: torch.randn(b, cond_len, c.context_dim, generator=g)  # noqa: E731
    else:
        make_cond = lambda b, g: None  # noqa: E731
    return unet, make_cond


@given(data=st.data())
def test_cache_points_are_exact(tiny, data):
    unet, make_cond = tiny
    point = data.draw(st.sampled_from(unet.cache_points()), label="point")
    batch = data.draw(st.integers(1, 3), label="batch")
    t = torch.tensor(data.draw(st.lists(st.integers(0, 999), min_size=batch, max_size=batch), label="t"))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    x = torch.randn(batch, *unet.sample_shape, generator=g)
    cond = make_cond(batch, g)
    view = CacheView.full(record=[point])
    with torch.no_grad():
        plain = unet(x, t, cond)
        full = unet(x, t, cond, cache=view)
        assert set(view.features) == {point}
        feature = view.features[point]
        shallow = unet(x, t, cond, cache=CacheView.shallow(point, feature))
    assert torch.equal(plain, full)
    assert feature.shape[:2] == (batch, unet.cache_channels(point))
    assert torch.equal(shallow, full)


def test_shallow_call_reads_the_feature(tiny):
    unet, make_cond = tiny
    x, t = torch.randn(2, *unet.sample_shape), torch.tensor([3, 700])
    cond = make_cond(2, torch.Generator().manual_seed(0))
    for point in (unet.cache_points()[0], unet.cache_points()[-1]):
        view = CacheView.full(record=[point])
        with torch.no_grad():
            full = unet(x, t, cond, cache=view)
            feature = view.features[point]
            stale = unet(x, t, cond, cache=CacheView.shallow(point, feature + torch.randn_like(feature)))
        assert not torch.allclose(stale, full, atol=1e-3)


def test_cache_points_channels_and_consumers():
    unet = build("tiny-sd")  # model_channels 32, channel_mult (1, 2), 2 res blocks: 6 input and 6 output blocks
    assert len(unet.input_blocks) == len(unet.output_blocks) == 6
    assert unet.cache_points() == tuple(f"output_blocks.{j}" for j in range(6))
    assert [unet.cache_channels(p) for p in unet.cache_points()] == [64, 64, 64, 64, 32, 32]
    modules = dict(unet.named_modules())
    splits = unet.concat_splits()
    assert len(splits) == 12
    for point in unet.cache_points():
        consumer = unet.cache_consumer(point)
        assert consumer == f"{point}.0"
        block = modules[consumer]
        c = unet.cache_channels(point)
        assert splits[f"{consumer}.in_layers.2"] == splits[f"{consumer}.skip_connection"] == c
        # the consumer's input is cat(h, skip): more channels than h
        assert block.in_layers[2].in_channels > c and block.skip_connection.in_channels > c
        assert f"{consumer}.in_layers.2" in modules and f"{consumer}.skip_connection" in modules


_BLOCK = re.compile(r"time_embed\.\d|label_emb|input_blocks\.\d+|middle_block|output_blocks\.\d+|out\.\d")


def _called_blocks(unet: nn.Module, x, t, cond, cache) -> list[str]:
    called: list[str] = []
    handles = [
        m.register_forward_hook(lambda *_, n=n: called.append(n))
        for n, m in unet.named_modules()
        if _BLOCK.fullmatch(n)
    ]
    try:
        with torch.no_grad():
            unet(x, t, cond, cache=cache)
    finally:
        for h in handles:
            h.remove()
    return called


@pytest.mark.parametrize("preset", ["tiny-sd", "tiny-ldm-church"])
def test_shallowest_point_is_cachequants_cut(preset):
    """A shallow call at the last point runs time_embed, input_blocks[0], output_blocks[-1] and out only."""
    unet = build(preset, seed=0)
    c = unet.config
    cond = torch.randn(2, 4, c.context_dim) if c.context_dim else None
    x, t = torch.randn(2, *unet.sample_shape), torch.tensor([10, 900])
    point = unet.cache_points()[-1]
    view = CacheView.full(record=[point])
    full = _called_blocks(unet, x, t, cond, view)
    assert "middle_block" in full and f"input_blocks.{len(unet.input_blocks) - 1}" in full
    shallow = _called_blocks(unet, x, t, cond, CacheView.shallow(point, view.features[point]))
    last = len(unet.output_blocks) - 1
    head = ["time_embed.0", "time_embed.1", "time_embed.2", "input_blocks.0"]
    assert shallow == [*head, f"output_blocks.{last}", "out.0", "out.1", "out.2"]


def test_shallow_call_at_each_point_runs_the_matching_head(tiny):
    unet, make_cond = tiny
    x, t = torch.randn(1, *unet.sample_shape), torch.tensor([42])
    cond = make_cond(1, torch.Generator().manual_seed(1))
    n = len(unet.input_blocks)
    for j, point in enumerate(unet.cache_points()):
        view = CacheView.full(record=[point])
        with torch.no_grad():
            unet(x, t, cond, cache=view)
        called = _called_blocks(unet, x, t, cond, CacheView.shallow(point, view.features[point]))
        heads = [b for b in called if b.startswith("input_blocks.")]
        tails = [b for b in called if b.startswith("output_blocks.")]
        assert heads == [f"input_blocks.{i}" for i in range(n - j)]
        assert tails == [f"output_blocks.{i}" for i in range(j, n)]
        assert "middle_block" not in called


def test_cache_errors():
    unet = build("tiny-ldm-church")
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([1])
    with pytest.raises(CachePointError, match="output_blocks.5"):  # the message lists the real points
        unet.cache_channels("output_blocks.6")
    with pytest.raises(CachePointError):
        unet(x, t, cache=CacheView.full(record=["middle_block"]))
    with pytest.raises(CacheEmptyError, match="output_blocks.5"):
        unet(x, t, cache=CacheView(read="output_blocks.5"))
    with pytest.raises(InputShapeError, match="cached feature"):
        unet(x, t, cache=CacheView.shallow("output_blocks.5", torch.zeros(2, 32, 8, 8)))


# ----------------------------------------------------------------------------------------------------------------
# Inputs


def test_input_checks():
    sd, church = build("tiny-sd"), build("tiny-ldm-church")
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    with pytest.raises(InputShapeError, match="context"):
        sd(x, t)
    with pytest.raises(InputShapeError, match="context"):
        sd(x, t, torch.randn(2, 5, 16))
    with pytest.raises(InputShapeError, match="unconditional"):
        church(x, t, torch.randn(2, 5, 32))
    with pytest.raises(InputShapeError, match="multiples of 2"):
        church(torch.randn(2, 4, 7, 8), t)
    with pytest.raises(InputShapeError, match="4, H, W"):
        church(torch.randn(2, 3, 8, 8), t)
    with pytest.raises(InputShapeError, match="one per sample"):
        church(x, torch.tensor([1, 2, 3]))
    with torch.no_grad():
        assert torch.equal(church(x, torch.tensor(7)), church(x, torch.tensor([7, 7])))


def test_class_label_unet_parity_with_diffusers():
    """num_classes models add label_emb(y) to the time embedding (diffusers: class_embedding); cond is the labels."""
    from diffusers import UNet2DModel

    kwargs = {**LSUN_COMMON, **UNCOND_CONFIGS["bedroom"], "num_class_embeds": 10}
    ref = _seeded(lambda: UNet2DModel(**kwargs), 5)
    config = ldm_unet_config_from_diffusers(dict(ref.config))
    assert config.num_classes == 10
    unet = LDMUNet(config).eval()
    load_weights(unet, ref.state_dict())
    assert torch.equal(unet.label_emb.weight, ref.class_embedding.weight)
    x, t = _inputs(3, 3, 16)
    y = torch.tensor([1, 2, 9])
    with torch.no_grad():
        out, expected = unet(x, t, y), ref(x, t, class_labels=y).sample
        assert _max_diff(out, expected) <= PARITY_ATOL
        assert _max_diff(unet(x, t, y.flip(0)), expected) > 100 * PARITY_ATOL
    with pytest.raises(InputShapeError, match="labels"):
        unet(x, t)
    with pytest.raises(InputShapeError, match="labels"):
        unet(x, t, torch.tensor([0.5, 1.0, 2.0]))


# ----------------------------------------------------------------------------------------------------------------
# Quantization and recipes on LDM UNets


def test_attention_matmuls_are_named_modules():
    from cq.models.layers import MatMul

    for preset in ("tiny-sd", "tiny-ldm-church"):
        unet = build(preset)
        names = [n for n, m in unet.named_modules() if isinstance(m, MatMul)]
        assert names and all(n.endswith((".qk", ".av")) for n in names)
    assert "middle_block.1.transformer_blocks.0.attn2.qk" in dict(build("tiny-sd").named_modules())


@pytest.mark.slow
def test_cachequant_recipe_fits_a_tiny_ldm():
    """The CacheQuant recipe (DPS, per-step quantization, both DEC corrections) runs on an LDM UNet with context."""
    from cq.fit.recipe import Recipe, cachequant
    from cq.quant import UniformQuantizer
    from cq.quant.modules import QConv2d

    unet = build("tiny-sd", seed=0)
    g = torch.Generator().manual_seed(0)
    context = torch.randn(4, 7, 32, generator=g)
    steps = 6
    base = cachequant(interval=2)
    recipe = Recipe(
        cacher=base.cacher,
        quantizer=UniformQuantizer(refresh_samples=4, cached_samples=2),
        correctors=base.correctors,
    )
    trace = cq.trace(
        unet, steps=steps, num_samples=4, points=recipe.points(unet), cond=context, spacing="linspace", progress=False
    )
    model = recipe.fit(unet, trace, progress=False)
    assert model.cache.point == "output_blocks.5"
    consumer = dict(model.unet.named_modules())
    assert isinstance(consumer["output_blocks.5.0.in_layers.2"], QConv2d)
    assert consumer["output_blocks.5.0.in_layers.2"].split == 32
    x0 = cq.sampling.ddim(model, torch.randn(4, 4, 8, 8, generator=g), steps=steps, cond=context, spacing="linspace")
    assert x0.shape == (4, 4, 8, 8) and torch.isfinite(x0).all()


def test_legacy_attention_conv1d_is_quantized_and_counted():
    """LSUN LDMs project attention with Conv1d: quantized (QConv1d) and counted in MACs like FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    import cq
    from cq.metrics import count_macs
    from cq.quant import quantized_modules

    unet = cq.models.build("tiny-ldm-bedroom", seed=0)
    x, t = torch.randn(1, *unet.sample_shape), torch.tensor([10])
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(x, t)
    assert count_macs(unet, x, t).total == counter.get_total_flops() // 2
    trace = cq.trace(unet, steps=2, num_samples=2, spacing="linspace", progress=False)
    model = cq.Recipe(quantizer=cq.quant.UniformQuantizer(refresh_samples=2)).fit(unet, trace, progress=False)
    kinds = quantized_modules(model.unet)
    conv1d = [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Conv1d)]
    assert conv1d and all(kinds[n] == "QConv1d" for n in conv1d)

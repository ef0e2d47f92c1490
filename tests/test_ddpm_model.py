"""DDPMUNet: parity with diffusers' UNet2DModel, key conversion, config validation and cache points."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from cq.core.view import CacheView
from cq.errors import CacheEmptyError, CachePointError, ConfigError, InputShapeError
from cq.models import DDPMConfig, DDPMUNet, build, get_preset, load_weights
from cq.models.convert import ddpm_config_from_diffusers, ddpm_from_diffusers, ddpm_to_diffusers


# Options every google/ddpm-* UNet2DModel config sets. attention_head_dim=None gives diffusers' single-head attention
# (head dim = channels), as in the hub's config.json ("attention_head_dim": null); the DDPM UNet has one head.
DDPM_DIFFUSERS_COMMON = dict(
    norm_eps=1e-6,
    norm_num_groups=32,
    flip_sin_to_cos=False,
    freq_shift=1,
    downsample_padding=0,
    attention_head_dim=None,
    mid_block_scale_factor=1,
)

TINY_DIFFUSERS = {
    "lpb2": dict(
        sample_size=16,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=2,
    ),
    "lpb1": dict(
        sample_size=16,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
    ),
    # three levels, attention at two of them (16 px and 4 px), other in/out channel counts
    "3lvl": dict(
        sample_size=16,
        in_channels=1,
        out_channels=2,
        block_out_channels=(32, 32, 64),
        down_block_types=("AttnDownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "AttnUpBlock2D"),
        layers_per_block=1,
    ),
}

# google/ddpm-cifar10-32 (plus DDPM_DIFFUSERS_COMMON: with diffusers' default attention_head_dim=8 the 256-channel
# attention would have 32 heads, and the outputs would differ by ~4e-2)
CIFAR10_DIFFUSERS = dict(
    sample_size=32,
    block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2,
)

# fp32 parity tolerance. The DDPM sinusoidal embedding (exp(arange * -log(1e4)/(half-1)), then t * freq) and diffusers'
# get_timestep_embedding compute the same numbers in a different op order, so the embedding differs by up to ~3e-5 at
# t=999; diffusers also runs attention through SDPA, which reorders the softmax/matmul reductions. Outputs are O(1).
PARITY_ATOL = 1e-4

TINY_CQ = DDPMConfig(resolution=16, ch=32, ch_mult=(1, 2), attn_resolutions=(8,))


def _diffusers_unet(kwargs: dict, seed: int) -> nn.Module:
    from diffusers import UNet2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DModel(**DDPM_DIFFUSERS_COMMON, **kwargs).eval()


def _cq_unet(config: DDPMConfig, seed: int) -> DDPMUNet:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DDPMUNet(config).eval()


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ----------------------------------------------------------------------------------------------------------------
# Parity with diffusers


def _make_pair(name: str) -> tuple[DDPMUNet, nn.Module, dict]:
    """A random tiny diffusers UNet2DModel and the cq DDPMUNet built from its config, holding its weights."""
    kwargs = TINY_DIFFUSERS[name]
    ref = _diffusers_unet(kwargs, seed=1)
    unet = DDPMUNet(ddpm_config_from_diffusers(dict(ref.config))).eval()
    load_weights(unet, ref.state_dict())  # diffusers keys, detected
    return unet, ref, kwargs


@pytest.fixture(scope="module", params=sorted(TINY_DIFFUSERS))
def tiny_pair(request) -> tuple[DDPMUNet, nn.Module, dict]:
    return _make_pair(request.param)


@pytest.fixture(scope="module")
def lpb2_pair() -> tuple[DDPMUNet, nn.Module, dict]:
    return _make_pair("lpb2")


def test_tiny_config_from_diffusers(tiny_pair):
    unet, ref, kwargs = tiny_pair
    c = unet.config
    channels = kwargs["block_out_channels"]
    assert c.ch == channels[0]
    assert tuple(c.ch * m for m in c.ch_mult) == tuple(channels)
    assert c.num_res_blocks == kwargs["layers_per_block"]
    assert c.in_channels == ref.config.in_channels and c.out_ch == ref.config.out_channels
    assert c.norm_eps == 1e-6 and c.resolution == 16
    assert sum(p.numel() for p in unet.parameters()) == sum(p.numel() for p in ref.parameters())


def test_layer_hyperparameters_match_diffusers(tiny_pair):
    """What the output tolerance cannot see: GroupNorm eps/groups and conv geometry, layer by layer."""
    unet, ref, _ = tiny_pair
    ref_modules = dict(ref.named_modules())
    num_levels = len(unet.config.ch_mult)
    checked = 0
    for name, module in unet.named_modules():
        if not isinstance(module, nn.GroupNorm | nn.Conv2d):
            continue
        ref_name = next(iter(ddpm_to_diffusers({f"{name}.weight": module.weight}, num_levels))).rpartition(".")[0]
        other = ref_modules[ref_name]
        if isinstance(module, nn.GroupNorm):
            assert (module.num_groups, module.eps) == (other.num_groups, other.eps), name
        elif isinstance(other, nn.Conv2d):  # diffusers' attention projections are Linear
            assert (module.kernel_size, module.stride, module.padding) == (
                other.kernel_size,
                other.stride,
                other.padding,
            ), name
        checked += 1
    assert checked > 20


def test_tiny_parity_with_diffusers(tiny_pair):
    unet, ref, _ = tiny_pair
    assert not unet.training and not ref.training
    x = torch.randn(4, unet.config.in_channels, 16, 16)
    t = torch.tensor([0, 1, 500, 999])
    with torch.no_grad():
        out = unet(x, t)
        expected = ref(x, t).sample
    assert out.shape == expected.shape == (4, unet.config.out_ch, 16, 16)
    assert expected.abs().max() > 0.1  # a real signal, so the tolerance below is meaningful
    assert _max_diff(out, expected) <= PARITY_ATOL
    # and the weights matter: another random cq model is far from the reference
    with torch.no_grad():
        other = _cq_unet(unet.config, seed=7)(x, t)
    assert _max_diff(other, expected) > 100 * PARITY_ATOL


@given(batch=st.integers(1, 3), data=st.data())
def test_tiny_parity_over_timesteps(lpb2_pair, batch, data):
    unet, ref, _ = lpb2_pair
    t = torch.tensor(data.draw(st.lists(st.integers(0, 999), min_size=batch, max_size=batch)))
    seed = data.draw(st.integers(0, 2**31 - 1))
    x = torch.randn(batch, unet.config.in_channels, 16, 16, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        assert _max_diff(unet(x, t), ref(x, t).sample) <= PARITY_ATOL


def test_scalar_timestep_broadcasts(tiny_pair):
    unet = tiny_pair[0]
    x = torch.randn(3, unet.config.in_channels, 16, 16)
    with torch.no_grad():
        assert torch.equal(unet(x, torch.tensor(321)), unet(x, torch.full((3,), 321)))


@pytest.fixture(scope="module")
def cifar10_pair() -> tuple[DDPMUNet, nn.Module]:
    ref = _diffusers_unet(CIFAR10_DIFFUSERS, seed=2)
    unet = build("cifar10", seed=3)
    load_weights(unet, ref.state_dict())
    return unet, ref


@pytest.mark.slow
def test_cifar10_preset_matches_diffusers_config(cifar10_pair):
    unet, ref = cifar10_pair
    assert sum(p.numel() for p in unet.parameters()) == sum(p.numel() for p in ref.parameters())
    # the diffusers config describes the preset's architecture (the preset keeps the training dropout of 0.1)
    preset_config = get_preset("cifar10").config
    assert ddpm_config_from_diffusers(dict(ref.config)) == dataclasses.replace(preset_config, dropout=0.0)


@pytest.mark.slow
def test_cifar10_parity_with_diffusers(cifar10_pair):
    unet, ref = cifar10_pair
    assert not unet.training and not ref.training  # the preset has dropout 0.1
    x = torch.randn(2, 3, 32, 32)
    t = torch.tensor([0, 999])
    with torch.no_grad():
        out = unet(x, t)
        expected = ref(x, t).sample
    assert out.shape == expected.shape
    assert expected.abs().max() > 0.1
    assert _max_diff(out, expected) <= PARITY_ATOL


@pytest.mark.slow
def test_cifar10_deepcache_point(cifar10_pair):
    unet = cifar10_pair[0]
    point = DDPMUNet.deepcache_branch_point(2)
    assert point == "up.1.block.2"
    assert unet.cache_channels(point) == 256
    view = CacheView.full(record=[point])
    with torch.no_grad():
        unet(torch.randn(1, 3, 32, 32), torch.tensor([500]), cache=view)
    assert view.features[point].shape == (1, 256, 16, 16)


def test_deepcache_branch_point_needs_two_res_blocks():
    with pytest.raises(ConfigError, match="num_res_blocks"):
        DDPMUNet.deepcache_branch_point(2, num_res_blocks=3)


# ----------------------------------------------------------------------------------------------------------------
# Key conversion


def _check_round_trips(cq_state: dict, diffusers_state: dict, num_levels: int, num_res_blocks: int) -> None:
    converted = ddpm_to_diffusers(cq_state, num_levels)
    assert converted.keys() == diffusers_state.keys()
    for key, value in converted.items():
        assert value.shape == diffusers_state[key].shape, key
    _assert_same_state(ddpm_from_diffusers(converted, num_levels, num_res_blocks), cq_state)

    back = ddpm_from_diffusers(diffusers_state, num_levels, num_res_blocks)
    assert back.keys() == cq_state.keys()
    for key, value in back.items():
        assert value.shape == cq_state[key].shape, key
    _assert_same_state(ddpm_to_diffusers(back, num_levels), diffusers_state)


def test_tiny_conversion_round_trips(tiny_pair):
    unet, ref, _ = tiny_pair
    c = unet.config
    fresh = _cq_unet(c, seed=5).state_dict()  # other values than ref's, so nothing matches by accident
    _check_round_trips(fresh, ref.state_dict(), len(c.ch_mult), c.num_res_blocks)


@pytest.mark.slow
def test_cifar10_conversion_round_trips(cifar10_pair):
    unet, ref = cifar10_pair
    _check_round_trips(build("cifar10", seed=4).state_dict(), ref.state_dict(), 4, 2)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("flip_sin_to_cos", True),
        ("freq_shift", 0),
        ("downsample_padding", 1),
        ("resnet_time_scale_shift", "scale_shift"),
        ("act_fn", "gelu"),
        ("time_embedding_type", "fourier"),
        ("mid_block_scale_factor", 2),
    ],
)
def test_config_from_diffusers_rejects_other_options(option, value):
    base = {**DDPM_DIFFUSERS_COMMON, **TINY_DIFFUSERS["lpb2"]}
    ddpm_config_from_diffusers(base)  # control: the same config without the option converts
    with pytest.raises(ConfigError, match=option):
        ddpm_config_from_diffusers({**base, option: value})


def test_config_from_diffusers_rejects_mismatched_attention_levels():
    config = {**DDPM_DIFFUSERS_COMMON, **TINY_DIFFUSERS["lpb2"], "up_block_types": ("UpBlock2D", "AttnUpBlock2D")}
    with pytest.raises(ConfigError, match="attention"):
        ddpm_config_from_diffusers(config)


def test_config_from_diffusers_rejects_multi_head_attention():
    # UNet2DModel's default attention_head_dim=8 splits a 64-channel attention into 8 heads; the DDPM UNet has one.
    config = {**DDPM_DIFFUSERS_COMMON, **TINY_DIFFUSERS["lpb2"], "attention_head_dim": 8}
    with pytest.raises(ConfigError, match="attention_head_dim"):
        ddpm_config_from_diffusers(config)


# ----------------------------------------------------------------------------------------------------------------
# DDPMConfig validation


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(ch_mult=()), "ch_mult"),
        (dict(ch_mult=(1, 0)), "ch_mult"),
        (dict(resolution=18, ch_mult=(1, 2, 2)), "divisible by 2"),
        (dict(ch=48), "norm_groups"),
        (dict(ch=32, ch_mult=(1, 3), norm_groups=64), "norm_groups"),
        (dict(resolution=0), "resolution"),
        (dict(num_res_blocks=0), "num_res_blocks"),
        (dict(in_channels=0), "in_channels"),
        (dict(dropout=1.0), "dropout"),
        (dict(dropout=-0.1), "dropout"),
    ],
)
def test_ddpm_config_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        DDPMConfig(**{"resolution": 16, "ch": 32, "ch_mult": (1, 2), "attn_resolutions": (8,), **kwargs})


def test_ddpm_config_accepts_the_presets():
    for name in ("cifar10", "church", "demo"):
        DDPMConfig(**dataclasses.asdict(get_preset(name).config))


# ----------------------------------------------------------------------------------------------------------------
# Cache points


@pytest.fixture(scope="module")
def tiny_unet() -> DDPMUNet:
    return _cq_unet(TINY_CQ, seed=11)


@given(data=st.data())
def test_cache_points_are_exact(tiny_unet, data):
    point = data.draw(st.sampled_from(tiny_unet.cache_points()), label="point")
    batch = data.draw(st.integers(1, 3), label="batch")
    t = torch.tensor(data.draw(st.lists(st.integers(0, 999), min_size=batch, max_size=batch), label="t"))
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    x = torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    view = CacheView.full(record=[point])
    with torch.no_grad():
        plain = tiny_unet(x, t)
        full = tiny_unet(x, t, cache=view)
        assert set(view.features) == {point}
        feature = view.features[point]
        shallow = tiny_unet(x, t, cache=CacheView.shallow(point, feature))
    assert torch.equal(plain, full)
    assert feature.shape[:2] == (batch, tiny_unet.cache_channels(point))
    assert torch.equal(shallow, full)


@pytest.mark.parametrize("point", ["up.1.block.0", "up.1.block.2", "up.0.block.0", "up.0.block.2"])
def test_shallow_call_reads_the_feature(tiny_unet, point):
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    view = CacheView.full(record=[point])
    with torch.no_grad():
        full = tiny_unet(x, t, cache=view)
        feature = view.features[point]
        stale = tiny_unet(x, t, cache=CacheView.shallow(point, feature + torch.randn_like(feature)))
    assert not torch.allclose(stale, full, atol=1e-3)


def test_cache_points_and_channels(tiny_unet):
    # deepest first: up.1 (8 px, 64 ch) then up.0 (16 px, 32 ch); the first block of a level sees the level below
    assert tiny_unet.cache_points() == (
        "up.1.block.0",
        "up.1.block.1",
        "up.1.block.2",
        "up.0.block.0",
        "up.0.block.1",
        "up.0.block.2",
    )
    assert [tiny_unet.cache_channels(p) for p in tiny_unet.cache_points()] == [64, 64, 64, 64, 32, 32]
    assert all(tiny_unet.cache_consumer(p) == p for p in tiny_unet.cache_points())
    modules = dict(tiny_unet.named_modules())
    for p in tiny_unet.cache_points():  # the consumer block takes cat(cached, skip)
        assert modules[p].in_channels > tiny_unet.cache_channels(p)


_BLOCK = re.compile(
    r"conv_in|conv_out|norm_out|temb\.dense\.\d|mid\.\w+|(down|up)\.\d+\.(block|attn)\.\d+|down\.\d+\.downsample"
    r"|up\.\d+\.upsample"
)


def _called_blocks(unet: nn.Module, x: torch.Tensor, t: torch.Tensor, cache: CacheView | None) -> list[str]:
    """Names of the blocks (not their sub-layers) whose forward ran, in call order."""
    called: list[str] = []
    handles = [
        module.register_forward_hook(lambda *_, name=name: called.append(name))
        for name, module in unet.named_modules()
        if _BLOCK.fullmatch(name)
    ]
    try:
        with torch.no_grad():
            unet(x, t, cache=cache)
    finally:
        for handle in handles:
            handle.remove()
    return called


# encoder blocks that must run to produce the skips the decoder tail from each point pops (tiny model: skips are
# conv_in, down.0.block.0, down.0.block.1, down.0.downsample, down.1.block.0(+attn), down.1.block.1(+attn))
_HEAD = [
    "conv_in",
    "down.0.block.0",
    "down.0.block.1",
    "down.0.downsample",
    "down.1.block.0",
    "down.1.attn.0",
    "down.1.block.1",
    "down.1.attn.1",
]
_HEAD_LEN = {
    "up.1.block.0": 8,
    "up.1.block.1": 6,
    "up.1.block.2": 4,
    "up.0.block.0": 3,
    "up.0.block.1": 2,
    "up.0.block.2": 1,
}


@pytest.mark.parametrize("point", sorted(_HEAD_LEN))
def test_shallow_call_skips_the_deep_blocks(tiny_unet, point):
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 900])
    view = CacheView.full(record=[point])
    full_calls = _called_blocks(tiny_unet, x, t, view)
    assert tiny_unet.num_resolutions == 2 and len(set(full_calls)) == len(full_calls)
    assert {"mid.block_1", "mid.attn_1", "mid.block_2", *_HEAD} <= set(full_calls)

    shallow_calls = _called_blocks(tiny_unet, x, t, CacheView.shallow(point, view.features[point]))
    decoder = [n for n in full_calls if n.startswith("up.")]
    tail = decoder[decoder.index(point) :]
    expected = ["temb.dense.0", "temb.dense.1", *_HEAD[: _HEAD_LEN[point]], *tail, "norm_out", "conv_out"]
    assert shallow_calls == expected
    assert not any(n.startswith("mid.") for n in shallow_calls)


def test_shallow_call_at_the_last_block_runs_only_it(tiny_unet):
    point = "up.0.block.2"
    view = CacheView.full(record=[point])
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([42])
    with torch.no_grad():
        tiny_unet(x, t, cache=view)
    called: list[str] = []
    handles = [m.register_forward_hook(lambda *_, n=n: called.append(n)) for n, m in tiny_unet.named_modules() if n]
    try:
        with torch.no_grad():
            tiny_unet(x, t, cache=CacheView.shallow(point, view.features[point]))
    finally:
        for handle in handles:
            handle.remove()
    block = dict(tiny_unet.named_modules())[point]
    sublayers = {f"{point}.{n}" for n, _ in block.named_modules() if n}
    assert "mid.block_1" not in called
    assert set(called) == {"temb.dense.0", "temb.dense.1", "conv_in", point, *sublayers, "norm_out", "conv_out"}


def test_unknown_cache_point(tiny_unet):
    with pytest.raises(CachePointError, match="up.0.block.2"):  # the message lists the real points
        tiny_unet.cache_channels("up.2.block.0")
    with pytest.raises(CachePointError):
        tiny_unet.cache_consumer("mid.block_1")
    with pytest.raises(CachePointError):
        view = CacheView.shallow("mid", torch.zeros(1, 64, 4, 4))
        tiny_unet(torch.randn(1, 3, 16, 16), torch.tensor([1]), cache=view)


def test_shallow_call_without_feature(tiny_unet):
    with pytest.raises(CacheEmptyError, match="up.1.block.2"):
        tiny_unet(torch.randn(1, 3, 16, 16), torch.tensor([1]), cache=CacheView(read="up.1.block.2"))


@pytest.mark.parametrize("shape", [(1, 1, 16, 16), (1, 3, 8, 8), (1, 3, 16, 8), (3, 16, 16), (1, 1, 3, 16, 16)])
def test_wrong_input_shape(tiny_unet, shape):
    with pytest.raises(InputShapeError, match="16, 16"):
        tiny_unet(torch.randn(shape), torch.tensor([1]))


def test_cond_is_rejected(tiny_unet):
    with pytest.raises(InputShapeError, match="cond"):
        tiny_unet(torch.randn(1, 3, 16, 16), torch.tensor([1]), torch.zeros(1, 4))

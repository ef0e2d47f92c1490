"""SDXL's UNet -- ``addition_embed_type="text_time"`` (the vector conditioning y = pooled
text + embedded size/crop ids, through ``label_emb``), transformer depth per level, no attention at the first level
-- against diffusers' ``UNet2DConditionModel`` on the tiny config of diffusers' SDXL pipeline tests, and the
CompVis/SGM key map against diffusers' single-file converter."""

from __future__ import annotations

import pytest
import torch
from diffusers_test_sd import DIFFUSERS_TEST_SDXL_UNET
from hypothesis import given
from hypothesis import strategies as st

from cq.errors import ConfigError, InputShapeError
from cq.models import LDMUNet, build, load_weights
from cq.models.conditioners import sdxl_vector
from cq.models.convert_ldm import ldm_unet_config_from_diffusers, ldm_unet_from_diffusers, ldm_unet_to_diffusers


PARITY_ATOL = 5e-5
TIME_DIM = 8  # addition_time_embed_dim

SDXL_UNET = DIFFUSERS_TEST_SDXL_UNET  # diffusers' SDXL test UNet (sample 16), one copy in diffusers_test_sd


@pytest.fixture(scope="module")
def pair():
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        ref = UNet2DConditionModel(**SDXL_UNET).eval()
    unet = LDMUNet(ldm_unet_config_from_diffusers(dict(ref.config))).eval()
    load_weights(unet, ref.state_dict())
    return unet, ref


def _inputs(batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 16, 16, generator=g)
    ctx = torch.randn(batch, 7, 64, generator=g)  # penultimate states of the two text encoders, concatenated
    pooled = torch.randn(batch, 32, generator=g)  # the second encoder's projected pooled output
    sizes = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0], [768.0, 512.0, 32.0, 0.0, 512.0, 512.0]])
    return x, ctx, pooled, sizes[torch.arange(batch) % 2]


def test_the_config_maps_to_the_sgm_architecture(pair):
    unet, ref = pair
    c = unet.config
    assert c == build("tiny-sdxl").config
    assert (c.attention_resolutions, c.transformer_depth, c.adm_in_channels) == ((2,), (1, 2), 80)
    assert sum(p.numel() for p in unet.parameters()) == sum(p.numel() for p in ref.parameters())
    assert len(unet.middle_block[1].transformer_blocks) == 2 and not hasattr(unet.input_blocks[1], "1")


@given(seed=st.integers(0, 2**31 - 1), t=st.integers(0, 999))
def test_parity_with_diffusers_text_time(pair, seed, t):
    unet, ref = pair
    x, ctx, pooled, time_ids = _inputs(2, seed)
    ts = torch.tensor([t, 999 - t])
    with torch.no_grad():
        expected = ref(
            x, ts, encoder_hidden_states=ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}
        ).sample
        out = unet(x, ts, unet.pack_cond(ctx, sdxl_vector(pooled, time_ids, TIME_DIM)))
    assert expected.abs().max() > 0.1 and (out - expected).abs().max() <= PARITY_ATOL


def test_the_vector_conditioning_matters(pair):
    unet, _ = pair
    x, ctx, pooled, time_ids = _inputs(2, 0)
    with torch.no_grad():
        a = unet(x, torch.tensor([10, 10]), unet.pack_cond(ctx, sdxl_vector(pooled, time_ids, TIME_DIM)))
        b = unet(x, torch.tensor([10, 10]), unet.pack_cond(ctx, sdxl_vector(pooled, time_ids.flip(0), TIME_DIM)))
    assert (a - b).abs().max() > 100 * PARITY_ATOL
    packed = unet.pack_cond(ctx, sdxl_vector(pooled, time_ids, TIME_DIM))
    context, y = unet.unpack_cond(packed)
    assert torch.equal(context, ctx) and torch.equal(y, sdxl_vector(pooled, time_ids, TIME_DIM))


def test_sgm_keys_agree_with_diffusers_converter(pair):
    """diffusers' single-file converter (sgm/CompVis -> diffusers, label_emb.0 -> add_embedding) is the oracle."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet, ref = pair
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        fresh = LDMUNet(unet.config).state_dict()
    assert "label_emb.0.0.weight" in fresh and "label_emb.0.2.bias" in fresh
    oracle = convert_ldm_unet_checkpoint({f"model.diffusion_model.{k}": v for k, v in fresh.items()}, dict(ref.config))
    ours = ldm_unet_to_diffusers(fresh, unet.config)
    assert ours.keys() == oracle.keys() == ref.state_dict().keys()
    assert all(torch.equal(ours[k], oracle[k]) for k in ours)
    back = ldm_unet_from_diffusers(ours, unet.config)
    assert back.keys() == fresh.keys() and all(torch.equal(back[k], fresh[k]) for k in back)


def test_bad_sdxl_inputs_are_named(pair):
    unet, _ = pair
    x, ctx, pooled, time_ids = _inputs(1, 0)
    with pytest.raises(InputShapeError, match="pack_cond"):
        unet(x, torch.tensor([5]), ctx[:, :2])  # a context without the vector tokens
    with pytest.raises(InputShapeError, match=r"y \[B, 80\]"):
        unet.pack_cond(ctx, pooled)  # y without the time ids
    with pytest.raises(ConfigError, match="adm_in_channels is None"):
        build("tiny-sd").pack_cond(ctx, pooled)
    with pytest.raises(ConfigError, match="projection_class_embeddings_input_dim"):
        ldm_unet_config_from_diffusers({**SDXL_UNET, "projection_class_embeddings_input_dim": None})

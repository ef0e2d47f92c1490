"""First-stage autoencoders: parity with diffusers' AutoencoderKL / VQModel after key conversion, the map against
diffusers' own LDM converter, VQ decoding quantizes, config validation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cq.errors import CheckpointFormatError, CheckpointKeyMismatchError, ConfigError, InputShapeError
from cq.models import AutoencoderConfig, AutoencoderKL, VQModel, load_weights
from cq.models.convert_ldm import autoencoder_from_diffusers, autoencoder_to_diffusers


# fp32: same ops, but diffusers' mid-block attention runs through SDPA (reordered reductions). Measured max |diff|
# ~3e-6 on outputs of magnitude ~1.6; 5e-5 leaves a 10x margin.
PARITY_ATOL = 5e-5

# ecosystem.md §B tiny configs
COMMON = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(32, 64),
    layers_per_block=1,
    norm_num_groups=32,
    sample_size=32,
)
KL = AutoencoderConfig(kind="kl", embed_dim=4, z_channels=4, ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=32)
VQ = AutoencoderConfig(
    kind="vq", embed_dim=3, z_channels=3, n_embed=16, ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=32
)


def _seeded(make, seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make().eval()


@pytest.fixture(scope="module")
def kl_pair():
    from diffusers import AutoencoderKL as Reference

    ref = _seeded(lambda: Reference(**COMMON, latent_channels=4), 1)
    ae = AutoencoderKL(KL).eval()
    load_weights(ae, autoencoder_from_diffusers(ref.state_dict(), 2, 1))
    return ae, ref


@pytest.fixture(scope="module")
def vq_pair():
    from diffusers import VQModel as Reference

    ref = _seeded(lambda: Reference(**COMMON, latent_channels=3, num_vq_embeddings=16, vq_embed_dim=3), 2)
    ae = VQModel(VQ).eval()
    load_weights(ae, autoencoder_from_diffusers(ref.state_dict(), 2, 1))
    return ae, ref


def _images(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_kl_parity_with_diffusers(kl_pair):
    ae, ref = kl_pair
    x = _images()
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mean, logvar = ae.encode_moments(x)
        dist = ref.encode(x).latent_dist
        decoded, expected = ae.decode(z), ref.decode(z).sample
    assert (mean - dist.mean).abs().max() <= PARITY_ATOL
    assert (logvar - dist.logvar).abs().max() <= PARITY_ATOL
    assert torch.equal(ae.encode(x), mean)  # deterministic encode = the posterior mode
    assert expected.abs().max() > 0.1 and decoded.shape == (2, 3, 32, 32)
    assert (decoded - expected).abs().max() <= PARITY_ATOL


def test_kl_sampled_encode_uses_the_generator(kl_pair):
    ae, _ = kl_pair
    x = _images(1)
    with torch.no_grad():
        a = ae.encode(x, sample=True, generator=torch.Generator().manual_seed(3))
        b = ae.encode(x, sample=True, generator=torch.Generator().manual_seed(3))
        c = ae.encode(x, sample=True, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_vq_parity_with_diffusers(vq_pair):
    ae, ref = vq_pair
    x = _images()
    z = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        latents, expected_latents = ae.encode(x), ref.encode(x).latents
        assert (latents - expected_latents).abs().max() <= PARITY_ATOL
        decoded, expected = ae.decode(z), ref.decode(z).sample  # both quantize first
        assert expected.abs().max() > 0.1
        assert (decoded - expected).abs().max() <= PARITY_ATOL
        raw = ref.decode(z, force_not_quantize=True).sample
        assert (ae.decode(z, force_not_quantize=True) - raw).abs().max() <= PARITY_ATOL
        assert (raw - expected).abs().max() > 1e-3  # quantizing matters


def test_vq_quantizer_picks_the_nearest_code(vq_pair):
    ae, _ = vq_pair
    codebook = ae.quantize.embedding.weight
    z = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(5))
    idx = ae.quantize.indices(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 3)
    assert torch.equal(idx.flatten(), torch.cdist(flat, codebook).argmin(1))
    q = ae.quantize(z)
    assert torch.allclose(q, codebook[idx].permute(0, 3, 1, 2), atol=1e-6)
    assert torch.allclose(ae.quantize(q), q, atol=1e-6)  # idempotent


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_map_agrees_with_diffusers_converter(kind, kl_pair, vq_pair):
    """diffusers' single-file converter (LDM first_stage_model.* -> diffusers) as an independent oracle."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    ae, ref = kl_pair if kind == "kl" else vq_pair
    fresh = _seeded(lambda: type(ae)(ae.config), 9).state_dict()
    ckpt = {f"first_stage_model.{k}": v for k, v in fresh.items()}
    oracle = convert_ldm_vae_checkpoint(ckpt, dict(ref.config))
    ours = autoencoder_to_diffusers(fresh, 2)
    if kind == "vq":  # diffusers' VAE converter knows no codebook
        assert set(ours) - set(oracle) == {"quantize.embedding.weight"}
        oracle["quantize.embedding.weight"] = fresh["quantize.embedding.weight"]
    assert ours.keys() == oracle.keys() == ref.state_dict().keys()
    for key in ours:
        assert torch.equal(ours[key], oracle[key]), key
    back = autoencoder_from_diffusers(ours, 2, 1)
    assert back.keys() == fresh.keys()
    assert all(torch.equal(back[k], fresh[k]) for k in back)


def test_original_keys_are_ldms(kl_pair, vq_pair):
    kl, vq = kl_pair[0].state_dict(), vq_pair[0].state_dict()
    for key in (
        "encoder.down.0.block.0.conv1.weight",
        "encoder.down.0.downsample.conv.weight",
        "decoder.up.1.upsample.conv.weight",
        "decoder.mid.attn_1.q.weight",
        "encoder.down.1.block.0.nin_shortcut.weight",
        "quant_conv.weight",
        "post_quant_conv.weight",
        "decoder.norm_out.weight",
    ):
        assert key in kl and key in vq, key
    assert kl["quant_conv.weight"].shape == (8, 8, 1, 1)  # 2 z -> 2 embed_dim (mean, logvar)
    assert vq["quantize.embedding.weight"].shape == (16, 3)
    assert "quantize.embedding.weight" not in kl


def test_map_errors():
    with pytest.raises(CheckpointFormatError, match="down.0.attn"):
        autoencoder_to_diffusers({"encoder.down.0.attn.0.q.weight": torch.zeros(1)}, 2)
    with pytest.raises(CheckpointKeyMismatchError) as info:
        autoencoder_from_diffusers({"encoder.down_blocks.7.resnets.0.conv1.weight": torch.zeros(1)}, 2, 1)
    assert info.value.unexpected == ["encoder.down_blocks.7.resnets.0.conv1.weight"]


def test_config_validation_and_shapes():
    with pytest.raises(ConfigError, match="n_embed"):
        AutoencoderConfig(kind="vq", embed_dim=3, z_channels=3)
    with pytest.raises(ConfigError, match="n_embed"):
        AutoencoderConfig(kind="kl", embed_dim=4, z_channels=4, n_embed=16)
    with pytest.raises(ConfigError, match="kind"):
        AutoencoderConfig(kind="ae", embed_dim=4, z_channels=4)
    with pytest.raises(ConfigError, match="multiples of 32"):
        AutoencoderConfig(kind="kl", embed_dim=4, z_channels=4, ch=48)
    with pytest.raises(ConfigError, match="kind='vq'"):
        VQModel(KL)
    ae = AutoencoderKL(KL)
    assert KL.factor == 2 and ae.latent_shape(32) == (4, 16, 16)
    with pytest.raises(InputShapeError, match="decode"):
        ae.decode(torch.zeros(1, 3, 16, 16))
    with pytest.raises(InputShapeError, match="encode"):
        ae.encode(torch.zeros(1, 3, 31, 32))

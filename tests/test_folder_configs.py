"""`LatentDiffusion.from_pretrained(folder)` builds a diffusers pipeline folder from its own
configs (no preset), on the tiny Stable Diffusion of diffusers' own pipeline tests saved with ``save_pretrained``;
a named preset that disagrees with the folder is refused with the differing fields."""

from __future__ import annotations

import diffusers_test_sd
import pytest
import torch

from cq.errors import CheckpointFormatError, ConfigError
from cq.models import LatentDiffusion
from cq.models.folder_config import autoencoder_config_from_diffusers, preset_from_folder


DIFFUSERS_TEST_VAE = diffusers_test_sd.DIFFUSERS_TEST_VAE
save_tiny_sd_pipeline = diffusers_test_sd.save_tiny_sd_pipeline


PARITY_ATOL = 5e-5  # fp32; diffusers' SDPA reorders reductions (see test_openai_unet.py)


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    folder = tmp_path_factory.mktemp("diffusers-test-sd") / "pipe"
    return folder, save_tiny_sd_pipeline(folder)


def test_the_diffusers_test_pipeline_loads_from_its_own_configs(tiny_sd):
    folder, reference = tiny_sd
    pipe = LatentDiffusion.from_pretrained(folder)
    c = pipe.unet.config
    assert (c.attention_resolutions, c.num_heads, c.context_dim, c.image_size) == ((2,), 8, 32, 32)
    assert pipe.conditioner.transformer.config.intermediate_size == 37
    assert pipe.scale_factor == reference.vae.config.scaling_factor
    assert pipe.noise_schedule == preset_from_folder(folder).noise
    ids = pipe.conditioner.tokenize(["a photo of a cat", ""])
    x, t, z = torch.randn(2, 4, 32, 32), torch.tensor([3, 900]), torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        ctx = pipe.condition(ids)
        expected_ctx = reference.text_encoder(input_ids=ids).last_hidden_state
        assert (ctx - expected_ctx).abs().max() <= PARITY_ATOL
        eps = pipe.unet(x, t, ctx)
        expected = reference.unet(x, t, encoder_hidden_states=ctx).sample
        assert expected.abs().max() > 0.1 and (eps - expected).abs().max() <= PARITY_ATOL
        decoded, expected_decoded = pipe.decode(z), reference.vae.decode(z / pipe.scale_factor).sample
        assert (decoded - expected_decoded).abs().max() <= PARITY_ATOL


def test_guided_ddim_sampling_matches_the_diffusers_pipeline(tiny_sd):
    """The whole path: tokenizer, text encoder, guidance 7.5 with the empty prompt, LDM-spaced DDIM (diffusers'
    ``steps_offset=1``, ``set_alpha_to_one=False``), VAE decode."""
    folder, reference = tiny_sd
    pipe = LatentDiffusion.from_pretrained(folder)
    latents = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(3))
    prompt = ["a photo of a cat"]
    with torch.no_grad():
        ours = pipe.sample(cond=prompt, noise=latents, sampler="ddim", steps=5, guidance_scale=7.5)
        theirs = reference(
            prompt, latents=latents.clone(), num_inference_steps=5, guidance_scale=7.5, output_type="pt"
        ).images
    assert ours.shape == theirs.shape == (1, 3, 64, 64) and torch.isfinite(ours).all()
    assert ((ours.clamp(-1, 1) + 1) / 2 - theirs).abs().max() <= 1e-4


def test_plms_sample_runs_with_the_folder_defaults(tiny_sd):
    pipe = LatentDiffusion.from_pretrained(tiny_sd[0])
    images = pipe.sample(cond=["a cat"], steps=4, seed=0)  # PLMS, guidance 7.5: the folder preset's defaults
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()


def test_a_preset_that_disagrees_with_the_folder_is_refused_naming_the_fields(tiny_sd):
    folder, _ = tiny_sd
    with pytest.raises(ConfigError) as info:
        LatentDiffusion.from_pretrained("tiny-sd", folder)
    message = str(info.value)
    for field in ("unet.attention_resolutions", "unet.num_heads", "unet.image_size", "text_encoder.intermediate_size"):
        assert field in message
    assert "from_pretrained(" in message  # the fix: load by the folder's own configs


def test_a_preset_that_agrees_with_the_folder_loads_with_its_defaults(tiny_sd):
    folder, _ = tiny_sd
    preset = preset_from_folder(folder)
    pipe = LatentDiffusion.from_pretrained(preset, folder)
    assert pipe.preset is preset and pipe.unet.config == preset.config


def test_bad_folders_and_paths(tiny_sd, tmp_path):
    with pytest.raises(ConfigError, match="not a diffusers pipeline folder"):
        LatentDiffusion.from_pretrained(tmp_path / "model.ckpt")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointFormatError, match="no unet/ sub-folder"):
        LatentDiffusion.from_pretrained(empty)
    (empty / "unet").mkdir()
    (empty / "vae").mkdir()
    (empty / "unet" / "config.json").write_text("[]")
    with pytest.raises(CheckpointFormatError, match="non-empty JSON object"):
        LatentDiffusion.from_pretrained(empty)


@pytest.mark.parametrize(
    ("field", "value"),
    [("norm_num_groups", 16), ("down_block_types", ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"])],
)
def test_unsupported_autoencoder_configs_are_named(field, value):
    config = {**DIFFUSERS_TEST_VAE, field: value}
    with pytest.raises(ConfigError, match="norm_num_groups=16" if field == "norm_num_groups" else "AttnDown"):
        autoencoder_config_from_diffusers(config)

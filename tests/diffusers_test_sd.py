"""The tiny Stable Diffusion pipeline of diffusers' own pipeline tests, built offline with random weights and saved
with ``save_pretrained`` (shared by the folder-config, SD 2 and SDXL tests)."""

from __future__ import annotations

import json

import torch

from cq.models import CLIPTokenizer


# diffusers tests/pipelines/stable_diffusion/test_stable_diffusion.py get_dummy_components()
DIFFUSERS_TEST_UNET = dict(
    block_out_channels=(32, 64),
    layers_per_block=2,
    sample_size=32,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32,
)
DIFFUSERS_TEST_VAE = dict(
    block_out_channels=[32, 64],
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
    up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
    latent_channels=4,
)
DIFFUSERS_TEST_TEXT = dict(
    bos_token_id=0,
    eos_token_id=2,
    hidden_size=32,
    intermediate_size=37,
    layer_norm_eps=1e-05,
    num_attention_heads=4,
    num_hidden_layers=5,
    pad_token_id=1,
    vocab_size=1000,
)


def save_tiny_sd_pipeline(folder, *, unet_kwargs=None, text_kwargs=None, prediction_type="epsilon", seed=0):
    """diffusers' test StableDiffusionPipeline (random weights, a byte-level CLIP vocabulary written here), saved
    with ``save_pretrained``; returns the diffusers pipeline."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    from transformers import CLIPTokenizer as HFTokenizer

    vocab = folder.parent / f"{folder.name}-vocab"
    vocab.mkdir(parents=True, exist_ok=True)
    (vocab / "vocab.json").write_text(json.dumps(CLIPTokenizer.vocab_from_merges([])))
    (vocab / "merges.txt").write_text("#version: 0.2\n")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**(unet_kwargs or DIFFUSERS_TEST_UNET))
        vae = AutoencoderKL(**DIFFUSERS_TEST_VAE)
        text = CLIPTextModel(CLIPTextConfig(**{**DIFFUSERS_TEST_TEXT, **(text_kwargs or {})}))
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    pipe = StableDiffusionPipeline(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=text.eval(),
        tokenizer=HFTokenizer(str(vocab / "vocab.json"), str(vocab / "merges.txt"), model_max_length=77),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder)
    return pipe


# diffusers tests/pipelines/stable_diffusion_xl/test_stable_diffusion_xl.py get_dummy_components()
DIFFUSERS_TEST_SDXL_UNET = dict(
    block_out_channels=(32, 64),
    layers_per_block=2,
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    transformer_layers_per_block=(1, 2),
    projection_class_embeddings_input_dim=80,  # 6 * 8 + 32
    cross_attention_dim=64,
)
DIFFUSERS_TEST_SDXL_VAE = {**DIFFUSERS_TEST_VAE, "sample_size": 128}
DIFFUSERS_TEST_SDXL_TEXT = {**DIFFUSERS_TEST_TEXT, "hidden_act": "gelu", "projection_dim": 32}


def save_tiny_sdxl_pipeline(folder, *, seed=0, force_zeros_for_empty_prompt=True):
    """diffusers' test StableDiffusionXLPipeline (random weights; two offline tokenizers, the second padding with
    ``"!"`` as SDXL's does; a DDIM scheduler), saved with ``save_pretrained``; returns the diffusers pipeline."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    from transformers import CLIPTokenizer as HFTokenizer

    vocab = folder.parent / f"{folder.name}-vocab"
    vocab.mkdir(parents=True, exist_ok=True)
    (vocab / "vocab.json").write_text(json.dumps(CLIPTokenizer.vocab_from_merges([])))
    (vocab / "merges.txt").write_text("#version: 0.2\n")
    files = (str(vocab / "vocab.json"), str(vocab / "merges.txt"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**DIFFUSERS_TEST_SDXL_UNET)
        vae = AutoencoderKL(**DIFFUSERS_TEST_SDXL_VAE)
        text = CLIPTextModel(CLIPTextConfig(**DIFFUSERS_TEST_SDXL_TEXT))
        text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**DIFFUSERS_TEST_SDXL_TEXT))
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae.eval(),
        text_encoder=text.eval(),
        text_encoder_2=text_2.eval(),
        tokenizer=HFTokenizer(*files, model_max_length=77),
        tokenizer_2=HFTokenizer(*files, model_max_length=77, pad_token="!"),
        unet=unet.eval(),
        scheduler=scheduler,
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder)
    return pipe

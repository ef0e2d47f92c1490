"""SDXL's conditioning -- the two CLIP text encoders (penultimate hidden states; the second
with ``text_projection`` of the pooled output), the vector conditioning y of size/crop ids, diffusers'
``force_zeros_for_empty_prompt`` unconditional branch -- and `LatentDiffusion.from_pretrained` on a tiny SDXL
pipeline folder, against diffusers' ``StableDiffusionXLPipeline``."""

from __future__ import annotations

import diffusers_test_sd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cq.errors import ConfigError, InputShapeError
from cq.models import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, LatentDiffusion, load_weights
from cq.models.conditioners import SDXLConditioner, sdxl_vector
from cq.models.convert_ldm import clip_text_state


PARITY_ATOL = 2e-5  # fp32; transformers' SDPA reorders reductions (see test_clip.py)

# diffusers' SDXL test text encoders: the SD test encoder with a projection (get_dummy_components())
SDXL_TEXT = {**diffusers_test_sd.DIFFUSERS_TEST_TEXT, "hidden_act": "gelu", "projection_dim": 32}


def _reference_encoders(seed: int = 0, **overrides):
    from transformers import CLIPTextConfig as RefConfig
    from transformers import CLIPTextModel as RefModel
    from transformers import CLIPTextModelWithProjection as RefProjection

    config = RefConfig(**{**SDXL_TEXT, **overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return RefModel(config).eval(), RefProjection(config).eval()


@pytest.fixture(scope="module")
def encoders():
    plain, projected = _reference_encoders()
    ours_plain = CLIPTextModel(CLIPTextConfig.from_transformers(plain.config.to_dict()))
    ours_proj = CLIPTextModelWithProjection(
        CLIPTextConfig.from_transformers(projected.config.to_dict(), with_projection=True)
    )
    load_weights(ours_plain, clip_text_state(plain.state_dict()))
    load_weights(ours_proj, clip_text_state(projected.state_dict()))
    return (ours_plain.eval(), plain), (ours_proj.eval(), projected)


def _ids(seed: int, batch: int = 3, length: int = 77, eos: int = 999):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, eos, (batch, length), generator=g)
    ends = torch.randint(2, length, (batch,), generator=g)
    for row, end in enumerate(ends.tolist()):
        ids[row, 0], ids[row, end:] = 0, eos  # start token, end token repeated as padding
    return ids


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_penultimate_states_and_text_embeds_match_transformers(encoders, seed):
    (plain, ref_plain), (proj, ref_proj) = encoders
    ids = _ids(seed)
    with torch.no_grad():
        mine, theirs = plain.encode(ids), ref_plain(ids, output_hidden_states=True)
        assert len(mine.hidden_states) == len(theirs.hidden_states) == 6
        assert (mine.hidden_states[-2] - theirs.hidden_states[-2]).abs().max() <= PARITY_ATOL
        assert (mine.pooler_output - theirs.pooler_output).abs().max() <= PARITY_ATOL
        assert mine.text_embeds is None
        mine, theirs = proj.encode(ids), ref_proj(ids, output_hidden_states=True)
        assert theirs.text_embeds.abs().max() > 0.1
        assert (mine.text_embeds - theirs.text_embeds).abs().max() <= PARITY_ATOL
        assert (mine.hidden_states[-2] - theirs.hidden_states[-2]).abs().max() <= PARITY_ATOL
        assert (mine.last_hidden_state - theirs.last_hidden_state).abs().max() <= PARITY_ATOL


def test_the_pooled_token_is_the_first_eos_for_new_configs():
    """transformers 5: ``eos_token_id != 2`` reads the first position of that id (ids above it may follow)."""
    _, ref = _reference_encoders(seed=3, eos_token_id=500)
    ours = CLIPTextModelWithProjection(CLIPTextConfig.from_transformers(ref.config.to_dict(), with_projection=True))
    load_weights(ours, clip_text_state(ref.state_dict()))
    ids = _ids(1, eos=500)
    ids[:, -1] = 998  # larger than the end token: argmax would pick it
    with torch.no_grad():
        assert (ours.encode(ids).text_embeds - ref(ids).text_embeds).abs().max() <= PARITY_ATOL
        with pytest.raises(InputShapeError, match="end token 500"):
            ours.encode(torch.full((1, 5), 7))


def test_projection_config_checks():
    from transformers import CLIPTextConfig as RefConfig

    plain = RefConfig(**SDXL_TEXT).to_dict()
    assert CLIPTextConfig.from_transformers(plain).projection_dim is None  # no architectures: a plain encoder
    projected = {**plain, "architectures": ["CLIPTextModelWithProjection"]}
    assert CLIPTextConfig.from_transformers(projected).projection_dim == 32
    with pytest.raises(ConfigError, match="projection_dim"):
        CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4))
    with pytest.raises(ConfigError, match="integer projection_dim"):
        CLIPTextConfig.from_transformers({**plain, "projection_dim": None}, with_projection=True)


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    folder = tmp_path_factory.mktemp("diffusers-test-sdxl") / "pipe"
    return folder, diffusers_test_sd.save_tiny_sdxl_pipeline(folder)


def test_the_sdxl_folder_loads_from_its_own_configs(tiny_sdxl):
    folder, reference = tiny_sdxl
    pipe = LatentDiffusion.from_pretrained(folder)
    cond = pipe.conditioner
    assert isinstance(cond, SDXLConditioner) and cond.time_dim == 8 and cond.force_zeros_for_empty_prompt
    assert cond.time_ids == (32, 32, 0, 0, 32, 32) and cond.tokenizer_2.pad_id == cond.tokenizer_2.vocab["!"]
    assert (pipe.preset.pipeline.sampler, pipe.preset.pipeline.guidance_scale) == ("ddim", 5.0)
    prompts = ["a photo of a cat", "an astronaut riding a horse on mars"]
    with torch.no_grad():
        context, uncond_context, pooled, uncond_pooled = reference.encode_prompt(prompts, device="cpu")
        assert uncond_context.abs().max() == 0 and uncond_pooled.abs().max() == 0  # force_zeros_for_empty_prompt
        time_ids = reference._get_add_time_ids((32, 32), (0, 0), (32, 32), torch.float32, 32).repeat(2, 1)
        ours = pipe.condition(prompts)
        ours_context, ours_y = pipe.unet.unpack_cond(ours)
        assert (ours_context - context).abs().max() <= PARITY_ATOL and context.abs().max() > 0.1
        assert (ours_y - sdxl_vector(pooled, time_ids, 8)).abs().max() <= PARITY_ATOL
        uncond_context_ours, uncond_y = pipe.unet.unpack_cond(pipe.unconditional(2))
        assert torch.equal(uncond_context_ours, torch.zeros_like(context))
        assert torch.equal(uncond_y, sdxl_vector(torch.zeros_like(pooled), time_ids, 8))


@pytest.mark.parametrize("force_zeros", [True, False])
def test_guided_ddim_sampling_matches_the_diffusers_sdxl_pipeline(tiny_sdxl, tmp_path, force_zeros):
    """The whole path against ``StableDiffusionXLPipeline(...)(prompt, latents=, guidance_scale=5)``: both tokenizers
    and encoders, y, the unconditional branch (zeros by default; the empty prompt with
    ``force_zeros_for_empty_prompt=False`` in model_index.json), LDM-spaced DDIM, VAE decode."""
    folder, reference = tiny_sdxl
    if not force_zeros:
        folder = tmp_path / "pipe"
        reference = diffusers_test_sd.save_tiny_sdxl_pipeline(folder, force_zeros_for_empty_prompt=False)
    pipe = LatentDiffusion.from_pretrained(folder)
    assert pipe.conditioner.force_zeros_for_empty_prompt is force_zeros
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    prompts = ["a photo of a cat", "a red car"]
    with torch.no_grad():
        ours = pipe.sample(cond=prompts, noise=latents, sampler="ddim", steps=5, guidance_scale=5.0)
        theirs = reference(
            prompts, latents=latents.clone(), num_inference_steps=5, guidance_scale=5.0, output_type="pt"
        ).images
        pipe.conditioner.force_zeros_for_empty_prompt = not force_zeros  # the other unconditional branch
        other = pipe.sample(cond=prompts, noise=latents, sampler="ddim", steps=5, guidance_scale=5.0)
    assert ours.shape == theirs.shape == (2, 3, 32, 32) and theirs.std() > 0.01
    assert ((ours.clamp(-1, 1) + 1) / 2 - theirs).abs().max() <= 1e-4  # measured 1.4e-6 / 1.6e-6
    assert ((other.clamp(-1, 1) + 1) / 2 - theirs).abs().max() > 100 * 1e-4


def test_trace_and_deepcache_carry_y_through_guidance(tiny_sdxl):
    """``cq.trace(guidance_scale=, uncond=)`` records the packed ``[uncond; cond]`` rows (context + y tokens) and
    ``cq.deepcache`` fits on it: interval 1 reproduces the full-precision guided sample exactly; interval 2 reuses
    the deep features (measured max |diff| 0.07 on samples of std 0.33) and still follows y (the time ids)."""
    import cq

    folder, _ = tiny_sdxl
    pipe = LatentDiffusion.from_pretrained(folder)
    prompts = ["a photo of a cat", "a red car", "a dog", "a tree"]
    cond, uncond = pipe.condition(prompts), pipe.unconditional(1)
    common = dict(steps=10, num_samples=4, cond=cond, seed=0, spacing="ldm", batch_size=4, progress=False)
    trace = cq.trace(pipe.unet, points=cq.deepcache(2).points(pipe.unet), guidance_scale=5.0, uncond=uncond, **common)
    assert torch.equal(trace.cond[0, 1::2], cond) and torch.equal(trace.cond[3, 0::2], uncond.expand(4, -1, -1))
    sample = dict(cond=prompts[:2], seed=50, steps=10, sampler="ddim", guidance_scale=5.0)
    with torch.no_grad():
        full = pipe.sample(**sample)
        exact = pipe.sample(**sample, model=cq.deepcache(1).fit(pipe.unet, trace, progress=False))
        cached_model = cq.deepcache(2).fit(pipe.unet, trace, progress=False)
        cached = pipe.sample(**sample, model=cached_model)
        pipe.conditioner.time_ids = (64, 64, 0, 0, 64, 64)
        other_size = pipe.sample(**sample, model=cached_model)
    assert torch.equal(exact, full)
    assert 1e-3 < (cached - full).abs().max() < 0.5 * full.std()
    assert (other_size - cached).abs().max() > 1e-3


def test_bad_sdxl_inputs_and_folders_are_named(tiny_sdxl, tmp_path):
    import shutil

    folder, _ = tiny_sdxl
    pipe = LatentDiffusion.from_pretrained(folder)
    cond = pipe.conditioner
    with pytest.raises(InputShapeError, match="6 numbers"):
        SDXLConditioner(cond.transformer, cond.transformer_2, time_dim=8, time_ids=(32, 32))
    with pytest.raises(ConfigError, match="CLIPTextModelWithProjection"):
        SDXLConditioner(cond.transformer, cond.transformer, time_dim=8)
    with pytest.raises(ConfigError, match="time_ids is unset"):
        SDXLConditioner(cond.transformer, cond.transformer_2, time_dim=8)(torch.tensor([[0, 5, 999]]))
    with pytest.raises(ConfigError, match="both tokenizers"):
        SDXLConditioner(cond.transformer, cond.transformer_2, cond.tokenizer, time_dim=8)(["a cat"])
    with pytest.raises(InputShapeError, match="one shape"):
        cond((torch.tensor([[0, 5, 999]]), torch.tensor([[0, 999]])))
    with pytest.raises(ConfigError, match="adm_in_channels=80"):
        LatentDiffusion(pipe.unet, pipe.first_stage, SDXLConditioner(cond.transformer, cond.transformer_2, time_dim=4))
    ids = torch.tensor([[0, 5, 999] + [999] * 74])
    assert torch.equal(pipe.condition(ids), pipe.condition((ids, ids)))  # one id tensor feeds both encoders

    refiner = tmp_path / "refiner"
    shutil.copytree(folder, refiner)
    shutil.rmtree(refiner / "text_encoder")
    with pytest.raises(ConfigError, match="SDXL refiner"):
        LatentDiffusion.from_pretrained(refiner)
    no_tokenizer = tmp_path / "no-tokenizer-2"
    shutil.copytree(folder, no_tokenizer)
    shutil.rmtree(no_tokenizer / "tokenizer_2")
    with pytest.raises(ConfigError, match="tokenizer_2/"):
        LatentDiffusion.from_pretrained(no_tokenizer)
    assert LatentDiffusion.from_pretrained(no_tokenizer, tokenizer=None).conditioner.tokenizer_2 is None


def test_the_command_line_fits_and_samples_an_sdxl_folder(tiny_sdxl, tmp_path):
    """``cq fit --model FOLDER --prompt ...`` takes the folder's SDXL defaults (DDIM, guidance 5); ``cq sample``'s
    images are the pipeline's own guided decode of the compressed model's samples."""
    import numpy as np

    import cq
    from cq.cli import main

    folder, _ = tiny_sdxl
    out, npz = tmp_path / "sdxl.cq", tmp_path / "images.npz"
    fit = ["fit", "--model", str(folder), "--recipe", "cachequant", "--interval", "2", "--steps", "4"]
    assert main([*fit, "--samples", "2", "--prompt", "a cat", "--prompt", "a red car", "-o", str(out)]) == 0
    model = cq.load(out)
    assert (model.calibration_guidance, model.sampler_settings.sampler, model.num_steps) == (5.0, "ddim", 4)
    argv = ["sample", str(out), "--weights", str(folder), "--prompt", "a bowl", "--num", "2", "--npz", str(npz)]
    assert main([*argv, "-o", str(tmp_path / "grid.png")]) == 0
    pipe = LatentDiffusion.from_pretrained(folder)
    with torch.no_grad():
        images = pipe.sample(cond=["a bowl"] * 2, model=cq.load(out), steps=4)
    expected = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.abs(np.load(npz)["arr_0"].astype(int) - expected.astype(int)).max() <= 1

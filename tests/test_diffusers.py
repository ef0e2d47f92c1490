"""cq on a diffusers pipeline (`cq.diffusers`): a tiny StableDiffusionPipeline built from diffusers' and
transformers' classes (random weights, a byte-level CLIP vocabulary written here), compressed in one call and run by
``pipe(prompt, num_inference_steps=N)`` under DDIM, PNDM, DPM-Solver++ and Euler with their configs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from test_pipelines import TINY_SD_TEXT, TINY_SD_UNET, TINY_SD_VAE

import cq
import cq.diffusers
from cq.errors import ConfigError, SamplerMismatchError, TimestepNotFittedError
from cq.models import CLIPTokenizer as ByteVocabulary


pytest.importorskip("diffusers")  # an optional dependency; installed in CI (the test extra), so this runs there

SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
SD_SPACING = dict(steps_offset=1, timestep_spacing="leading")  # SD v1's scheduler_config.json
SCHEDULERS = {  # name -> (diffusers class, config)
    "ddim-sd": ("DDIMScheduler", dict(**SD_BETAS, **SD_SPACING, clip_sample=False, set_alpha_to_one=False)),
    "ddim-clip": ("DDIMScheduler", dict(**SD_BETAS)),  # diffusers' defaults: clip_sample=True, alpha 1, leading
    "ddim-v-trailing": (
        "DDIMScheduler",
        dict(**SD_BETAS, prediction_type="v_prediction", timestep_spacing="trailing", clip_sample=False),
    ),
    "pndm-sd": ("PNDMScheduler", dict(**SD_BETAS, **SD_SPACING, skip_prk_steps=True, set_alpha_to_one=False)),
    "pndm-prk": ("PNDMScheduler", dict(**SD_BETAS)),  # Runge-Kutta warm-up: 12 calls, timesteps repeated
    "dpm": ("DPMSolverMultistepScheduler", dict(**SD_BETAS)),  # dpmsolver++, order 2, linspace
    "dpm-karras": ("DPMSolverMultistepScheduler", dict(**SD_BETAS, use_karras_sigmas=True)),
    "euler-sd": ("EulerDiscreteScheduler", dict(**SD_BETAS, **SD_SPACING)),
}
STEPS = 8


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [0, 1]."""
    return float(10 * torch.log10(1 / ((a - b) ** 2).mean()))


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = tmp_path_factory.mktemp("clip-vocab")
    vocab = ByteVocabulary.vocab_from_merges([])  # one token per byte + the two specials (514 ids)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    text_config = CLIPTextConfig(
        **{**TINY_SD_TEXT, "vocab_size": len(vocab)},
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**TINY_SD_UNET).eval()
        vae = AutoencoderKL(**TINY_SD_VAE).eval()
        text = CLIPTextModel(text_config).eval()
    return dict(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer)


def _pipe(parts, name: str = "ddim-sd", **overrides):
    import diffusers

    kind, config = SCHEDULERS[name]
    make = getattr(diffusers, kind)
    pipe = diffusers.StableDiffusionPipeline(
        **parts, scheduler=make(**config), safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.scheduler = make(**{**config, **overrides})  # as given: the constructor forces clip_sample off, offset 1
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(pipe, prompt="a red car", steps=STEPS, seed=123, **kwargs) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return pipe(prompt, num_inference_steps=steps, generator=generator, output_type="pt", **kwargs).images


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_an_uncompressing_recipe_reproduces_the_pipeline_under_each_scheduler(parts, name):
    """DeepCache with interval 1 computes the original UNet: through the adapter the pipeline's output is the
    original's up to the float32 conversion (measured <= 2.2e-6 on [0, 1] images), so the trace ran the scheduler's
    own timesteps, input scaling, clip_sample and prediction_type, and every call found its step."""
    pipe = _pipe(parts, name)
    reference = _images(pipe)
    model = cq.diffusers.compress(
        pipe, cq.deepcache(interval=1), prompts=["a cat", "a dog"], steps=STEPS, progress=False
    )
    assert isinstance(pipe.unet, cq.diffusers.DiffusersUNetAdapter) and pipe.unet.model is model
    assert list(model.sampler_settings.timesteps) == [int(t) for t in pipe.scheduler.timesteps]  # reference's run
    assert model.sampler_settings.clip_x0 == pipe.scheduler.config.get("clip_sample", False)
    if name == "ddim-clip":  # the clamp of x0 to [-1, 1] is discontinuous: float32 rounding moves elements across
        assert psnr(_images(pipe), reference) >= 70  # measured 79.8 dB (max |diff| 4e-4)
    else:
        assert (_images(pipe) - reference).abs().max() <= 1e-5
    cq.diffusers.restore(pipe)
    assert torch.equal(_images(pipe), reference)  # the original UNet, untouched


def test_the_adapter_has_the_diffusers_call_signature_and_output_type(parts):
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    pipe = _pipe(parts, "dpm")
    original = pipe.unet
    model = cq.diffusers.compress(pipe, cq.deepcache(interval=1), prompts=["a cat"], steps=4, progress=False)
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    t = torch.tensor(model.sampler_settings.timesteps[1])  # 0-d, as the pipelines pass it
    with torch.no_grad():
        expected = original(x, t, encoder_hidden_states=ctx).sample
        out = pipe.unet(x, t, encoder_hidden_states=ctx)
        assert isinstance(out, UNet2DConditionOutput) and (out.sample - expected).abs().max() <= 5e-5
        assert torch.equal(pipe.unet(x, t, ctx, return_dict=False)[0], out.sample)
    assert pipe.unet.config is original.config and pipe.unet.in_channels == original.config.in_channels
    assert pipe.unet.dtype == original.dtype and pipe.unet.device == original.device
    assert not any(p is q for p in pipe.unet.parameters() for q in original.parameters())  # not a submodule
    assert cq.diffusers.restore(pipe) is original and pipe.unet is original


@pytest.mark.parametrize("name", ["ddim-sd", "dpm", "euler-sd"])
def test_compressed_pipelines_stay_close_on_a_held_out_prompt(parts, name):
    """CacheQuant (DPS refresh every 2 of 8 steps, W8A8, DEC) fitted on 4 prompts, measured on another prompt and
    seed: image PSNR against the original pipeline >= 33 dB (measured: DDIM 39.0, DPM-Solver++ 39.6, Euler 41.2 dB;
    DeepCache interval 2 alone 44.7 / 41.9 / 44.7; W8A8 alone 41.8 / 43.4 / 41.7)."""
    pipe = _pipe(parts, name)
    reference = _images(pipe)
    prompts = ["a cat", "a dog", "a tree", "a house"]
    cq.diffusers.compress(pipe, cq.cachequant(interval=2), prompts=prompts, steps=STEPS, progress=False)
    assert psnr(_images(pipe), reference) >= 33
    assert len(pipe.unet.model.refresh_mask()) == STEPS and not all(pipe.unet.model.refresh_mask())
    cq.diffusers.restore(pipe)
    assert torch.equal(_images(pipe), reference)


def test_other_steps_or_scheduler_configs_are_refused(parts):
    pipe = _pipe(parts, "ddim-sd")
    model = cq.diffusers.compress(pipe, cq.deepcache(interval=2), prompts=["a cat"], steps=STEPS, progress=False)
    fitted = str(list(model.sampler_settings.timesteps))
    with pytest.raises(TimestepNotFittedError, match="is not one this model was fitted for") as e:
        _images(pipe, steps=STEPS - 1)
    assert fitted in str(e.value)
    pipe.scheduler = pipe.scheduler.__class__.from_config({**pipe.scheduler.config, "clip_sample": True})
    with pytest.raises(SamplerMismatchError, match="scheduler: fitted DDIMScheduler"):  # same timesteps, other run
        _images(pipe)
    import diffusers

    pipe.scheduler = diffusers.PNDMScheduler.from_config({**pipe.scheduler.config, "skip_prk_steps": True})
    with pytest.raises(SamplerMismatchError, match="running PNDMScheduler"):
        _images(pipe)


def test_save_and_load_against_a_pipeline(parts, tmp_path):
    pipe = _pipe(parts, "pndm-sd")
    cq.diffusers.compress(pipe, cq.cachequant(interval=3), prompts=["a cat", "a dog"], steps=STEPS, progress=False)
    compressed = _images(pipe)
    path = cq.diffusers.save(pipe, tmp_path / "sd.cq")
    fresh = _pipe(parts, "pndm-sd")
    loaded = cq.diffusers.load(fresh, path)
    assert loaded.sampler_settings == pipe.unet.model.sampler_settings
    assert torch.equal(_images(fresh), compressed)
    from diffusers import UNet2DConditionModel

    torch.manual_seed(1)  # conftest seeds 0 before each test, as the fixture did
    other = dict(parts, unet=UNet2DConditionModel(**TINY_SD_UNET).eval())  # other random weights
    with pytest.raises(ConfigError, match="another base model"):
        cq.diffusers.load(_pipe(other, "pndm-sd"), path)


def test_bad_inputs_are_refused(parts, tmp_path):
    pipe = _pipe(parts)
    recipe = cq.deepcache(interval=2)
    with pytest.raises(ConfigError, match="expected a diffusers DiffusionPipeline"):
        cq.diffusers.compress(object(), recipe, prompts=["a"], steps=4)
    with pytest.raises(ConfigError, match="recipe must be a cq.Recipe"):
        cq.diffusers.compress(pipe, "cachequant", prompts=["a"], steps=4)
    for prompts in ("a cat", [], [3]):
        with pytest.raises(ConfigError, match="prompts must be"):
            cq.diffusers.compress(pipe, recipe, prompts=prompts, steps=4)
    with pytest.raises(ConfigError, match="class_labels.*text-conditioned"):
        cq.diffusers.compress(pipe, recipe, class_labels=[1, 2], steps=4)
    with pytest.raises(ConfigError, match="denoise samples UNet2DModel pipelines"):
        cq.diffusers.denoise(pipe, torch.randn(1, 4, 8, 8), steps=4)
    with pytest.raises(ConfigError, match="fractional timesteps"):  # Euler's linspace default: 999 / 7 apart
        cq.diffusers.compress(_pipe(parts, "euler-sd", timestep_spacing="linspace"), recipe, prompts=["a"], steps=8)
    with pytest.raises(ConfigError, match="not compressed"):
        cq.diffusers.restore(pipe)
    with pytest.raises(ConfigError, match="not compressed"):
        cq.diffusers.save(pipe, tmp_path / "x.cq")
    model = cq.diffusers.compress(pipe, recipe, prompts=["a cat"], steps=4, progress=False)
    with pytest.raises(ConfigError, match="already compressed"):
        cq.diffusers.compress(pipe, recipe, prompts=["a cat"], steps=4)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor(model.sampler_settings.timesteps[0]), torch.randn(2, 77, 32)
    with pytest.raises(ConfigError, match="cross_attention_kwargs"):
        pipe.unet(x, t, ctx, cross_attention_kwargs={"scale": 0.5})
    with pytest.raises(ConfigError, match=r"\['timestep_cond'\]"):
        pipe.unet(x, t, ctx, timestep_cond=torch.randn(2, 8))
    # a model fitted with cq's own sampler has no pipeline loop to serve
    unet = cq.diffusers.convert_unet(parts["unet"], pipe.scheduler)
    trace = cq.trace(unet, steps=4, num_samples=1, cond=torch.randn(1, 77, 32), spacing="linspace", progress=False)
    cq.save(cq.quant_only().fit(unet, trace, progress=False), tmp_path / "own.cq")
    with pytest.raises(ConfigError, match="not fitted through a diffusers pipeline"):
        cq.diffusers.load(_pipe(parts), tmp_path / "own.cq")


def test_diffusers_stays_optional():
    """Without diffusers, cq and cq.diffusers import (nothing is imported at import time) and compress says what
    to install."""
    code = (
        "import sys; sys.modules['diffusers'] = None\n"
        "import cq, cq.diffusers\n"
        "try:\n"
        "    cq.diffusers.compress(object(), cq.deepcache(), prompts=['a'], steps=4)\n"
        "except cq.errors.ConfigError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "pip install 'cq[diffusers]'" in out
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, cq, cq.diffusers; print('diffusers' in sys.modules)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert loaded.strip() == "False"

"""Latent-diffusion pipelines: classifier-free guidance (one doubled-batch call per step, also through a cached
CompressedUNet), end-to-end sampling of the tiny presets on CPU, loading from CompVis checkpoints (Lightning pickles,
EMA, scale_factor buffers) and diffusers folders, and the loading errors."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil

import pytest
import torch
from conftest import save_lightning_ckpt
from safetensors.torch import save_file
from torch import nn

import cq
from cq.cache.deepcache import DeepCache
from cq.cache.uniform import UniformSchedule
from cq.compressed import CompressedUNet
from cq.errors import (
    CheckpointFormatError,
    CheckpointKeyMismatchError,
    ConfigError,
    InputShapeError,
    UnsafeCheckpointError,
)
from cq.models import CLIPTokenizer, LDMUNet, build, get_preset, load
from cq.models.conditioners import ClassEmbedder, TextConditioner
from cq.models.loading import build_from_description, describe_model
from cq.models.pipelines import ClassifierFreeGuidance, LatentDiffusion
from cq.sampling import FullPrecision, ddim, plms


# diffusers/transformers twins of the tiny-sd preset (same architecture, their key layouts)
TINY_SD_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=4,
    norm_num_groups=32,
)
TINY_SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(32, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=16,
)
TINY_SD_TEXT = dict(
    vocab_size=49408,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
)
PARITY_ATOL = 5e-5  # fp32, SDPA-reordered reductions (see test_openai_unet.py)


def _byte_tokenizer() -> CLIPTokenizer:
    """A valid CLIP tokenizer without merges (one token per byte); ids 0..513 fit any CLIP-sized embedding."""
    return CLIPTokenizer(CLIPTokenizer.vocab_from_merges([]), [])


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


class Recorder(nn.Module):
    """A sampler-facing model that records (step, batch) of every call, then runs ``model``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.noise_schedule = getattr(model, "noise_schedule", None)
        self.calls: list[tuple[int, int]] = []

    def forward(self, x, t, cond=None, *, step):
        self.calls.append((step, x.shape[0]))
        return self.model(x, t, cond, step=step)


@pytest.fixture(scope="module")
def sd() -> LatentDiffusion:
    return LatentDiffusion.build("tiny-sd", seed=0, tokenizer=_byte_tokenizer())


# ----------------------------------------------------------------------------------------------------------------
# Classifier-free guidance


def test_guidance_scale_one_is_the_conditional_model(sd):
    unet = sd.unet
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([10, 500, 990])
    cond = sd.condition(["a cat", "a dog", "a fox"])
    rec = Recorder(FullPrecision(unet))
    guided = ClassifierFreeGuidance(rec, 1.0, sd.unconditional(1))
    with torch.no_grad():
        assert torch.equal(guided(x, t, cond, step=0), unet(x, t, cond))
    assert rec.calls == [(0, 3)]  # no unconditional half at scale 1 (as LDM's samplers)
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = ddim(
            ClassifierFreeGuidance(FullPrecision(unet), 1.0, sd.unconditional(1)),
            noise,
            steps=5,
            cond=cond,
            spacing="ldm",
        )
        b = ddim(FullPrecision(unet), noise, steps=5, cond=cond, spacing="ldm")
    assert torch.equal(a, b)


@pytest.mark.parametrize("scale", [0.0, 1.5, 7.5])
def test_guidance_batches_uncond_and_cond_in_one_call(sd, scale):
    unet = sd.unet
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 700])
    cond = sd.condition(["a cat", "a dog"])
    uncond = sd.unconditional(1)
    rec = Recorder(FullPrecision(unet))
    with torch.no_grad():
        out = ClassifierFreeGuidance(rec, scale, uncond)(x, t, cond, step=3)
        eps_u = unet(x, t, uncond.expand(2, -1, -1))
        eps_c = unet(x, t, cond)
    assert rec.calls == [(3, 4)]  # one call, doubled batch, step passed through
    # a batch of 4 vs 2 may pick other conv kernels: ~1e-6 differences in eps, amplified by the scale
    atol = 1e-5 * (1 + scale)
    assert (out - (eps_u + scale * (eps_c - eps_u))).abs().max() < atol
    if scale == 0.0:
        assert (out - eps_u).abs().max() < atol


def test_guidance_through_a_cached_compressed_unet(sd):
    """The cache sees one call per step with the doubled batch; interval 1 equals the uncached guided model."""
    unet, steps = sd.unet, 5
    cond = sd.condition(["a cat", "a dog"])
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    uncond = sd.unconditional(1)
    calls: list[int] = []
    handle = unet.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            reference = ddim(
                ClassifierFreeGuidance(FullPrecision(unet), 7.5, uncond), noise, steps=steps, cond=cond, spacing="ldm"
            )
            calls.clear()
            every = CompressedUNet(unet, num_steps=steps, cacher=DeepCache(schedule=UniformSchedule(interval=1)))
            same = ddim(ClassifierFreeGuidance(every, 7.5, uncond), noise, steps=steps, cond=cond, spacing="ldm")
            assert calls == [4] * steps
            calls.clear()
            cached = CompressedUNet(unet, num_steps=steps, cacher=DeepCache(schedule=UniformSchedule(interval=2)))
            guided = ClassifierFreeGuidance(cached, 7.5, uncond)
            assert guided.num_steps == steps and guided.noise_schedule is unet.noise_schedule
            out = ddim(guided, noise, steps=steps, cond=cond, spacing="ldm")
    finally:
        handle.remove()
    assert torch.equal(same, reference)
    assert calls == [4] * steps and cached.cache._feature.shape[0] == 4
    assert torch.isfinite(out).all() and not torch.equal(out, reference)


def test_guidance_errors(sd):
    with pytest.raises(ConfigError, match="step="):
        ClassifierFreeGuidance(sd.unet, 2.0, sd.unconditional(1))  # a bare UNet takes no step=
    guided = ClassifierFreeGuidance(FullPrecision(sd.unet), 2.0, torch.zeros(3, 5, 32))
    with pytest.raises(InputShapeError, match="uncond"):
        guided(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.zeros(2, 77, 32), step=0)
    with pytest.raises(InputShapeError, match="conditional"):
        guided(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), None, step=0)


# ----------------------------------------------------------------------------------------------------------------
# End-to-end sampling on CPU


def test_tiny_sd_samples_end_to_end(sd):
    """Prompts -> CLIP context -> guided PLMS (the preset's defaults: scale 7.5) -> KL decoder."""
    assert sd.preset.pipeline.sampler == "plms" and sd.preset.pipeline.guidance_scale == 7.5
    prompts = ["a photo of a cat", "an astronaut riding a horse"]
    images = sd.sample(cond=prompts, steps=5, seed=0)
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    assert not torch.allclose(images[0], images[1])
    z = sd.sample(cond=prompts, steps=5, seed=0, decode=False)
    assert z.shape == (2, 4, 8, 8)
    assert torch.equal(sd.decode(z), images)
    assert torch.equal(sd.sample(cond=prompts, steps=5, seed=0), images)  # seeded, deterministic
    ids = sd.conditioner.tokenize(prompts)
    assert torch.equal(sd.sample(cond=ids, steps=5, seed=0), images)  # token ids work as well
    ddim_images = sd.sample(cond=prompts[0], steps=5, seed=0, sampler="ddim", guidance_scale=3.0)
    assert ddim_images.shape == (1, 3, 16, 16) and torch.isfinite(ddim_images).all()


def test_sampling_with_a_compressed_unet_for_plms(sd):
    """A CompressedUNet fitted for PLMS takes plms.num_calls(steps) as its step count."""
    steps = 5
    model = CompressedUNet(
        sd.unet, num_steps=plms.num_calls(steps), cacher=DeepCache(schedule=UniformSchedule(interval=2))
    )
    images = sd.sample(cond=["a cat"], steps=steps, seed=0, model=model)
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()


def test_class_conditional_sampling():
    pipe = LatentDiffusion.build("tiny-ldm-cin", seed=0)
    assert isinstance(pipe.conditioner, ClassEmbedder) and pipe.preset.pipeline.guidance_scale == 1.5
    labels = torch.tensor([88, 207, 999])
    context = pipe.condition(labels)
    assert context.shape == (3, 1, 32)
    uncond = pipe.unconditional(1)
    assert torch.equal(uncond, pipe.conditioner.embedding.weight[1000][None, None])  # class 1000
    images = pipe.sample(cond=labels, steps=5, seed=0)
    assert images.shape == (3, 3, 16, 16) and torch.isfinite(images).all()
    with pytest.raises(InputShapeError, match="1001"):
        pipe.sample(cond=torch.tensor([1001]), steps=5)
    with pytest.raises(InputShapeError, match="conditional"):
        pipe.sample(2, steps=5)


@pytest.mark.parametrize("name", ["tiny-ldm-bedroom", "tiny-ldm-church"])
def test_unconditional_presets_sample(name):
    pipe = LatentDiffusion.build(name, seed=0)
    images = pipe.sample(2, steps=5, seed=3)
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    with pytest.raises(InputShapeError, match="unconditional"):
        pipe.sample(cond=torch.tensor([1, 2]), steps=5)


def test_vq_pipeline_decodes_through_the_codebook():
    pipe = LatentDiffusion.build("tiny-ldm-bedroom", seed=0)
    z = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        quantized = pipe.first_stage.quantize(z)
        assert torch.equal(pipe.decode(z), pipe.first_stage.decode(quantized, force_not_quantize=True))


# ----------------------------------------------------------------------------------------------------------------
# Loading CompVis checkpoints


def _ldm_state(pipe: LatentDiffusion) -> dict[str, torch.Tensor]:
    """The state dict of a CompVis LatentDiffusion checkpoint holding ``pipe`` (plus the schedule buffers)."""
    state = {f"model.diffusion_model.{k}": v for k, v in pipe.unet.state_dict().items()}
    state |= {f"first_stage_model.{k}": v for k, v in pipe.first_stage.state_dict().items()}
    if isinstance(pipe.conditioner, TextConditioner):
        text = pipe.conditioner.transformer.state_dict()
        state |= {f"cond_stage_model.transformer.text_model.{k}": v for k, v in text.items()}
        state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    elif pipe.conditioner is not None:
        state |= {f"cond_stage_model.{k}": v for k, v in pipe.conditioner.state_dict().items()}
    betas = pipe.unet.noise_schedule.betas().float()
    state |= {"betas": betas, "alphas_cumprod": torch.cumprod(1 - betas, 0)}
    return state


def test_compvis_ckpt_round_trip(tmp_path, monkeypatch):
    source = LatentDiffusion.build("tiny-sd", seed=1)
    path = tmp_path / "sd.ckpt"
    save_lightning_ckpt(path, {"state_dict": _ldm_state(source), "global_step": 470000}, monkeypatch)
    with pytest.raises(Exception, match="ModelCheckpoint"):  # control: plain weights_only loading refuses it
        torch.load(path, weights_only=True)

    pipe = LatentDiffusion.from_pretrained("tiny-sd", path, tokenizer=_byte_tokenizer())
    _assert_same_state(pipe.unet, source.unet)
    _assert_same_state(pipe.first_stage, source.first_stage)
    _assert_same_state(pipe.conditioner, source.conditioner)
    assert pipe.scale_factor == 0.18215 and not pipe.training
    unet = load("tiny-sd", path=path)  # cq.models.load reads the UNet part
    assert isinstance(unet, LDMUNet) and unet.preset.name == "tiny-sd"
    _assert_same_state(unet, source.unet)
    images = pipe.sample(cond=["a cat"], steps=5, seed=0)
    source.conditioner.tokenizer = _byte_tokenizer()
    assert torch.equal(images, source.sample(cond=["a cat"], steps=5, seed=0))


def test_compvis_safetensors_and_class_embedder(tmp_path):
    source = LatentDiffusion.build("tiny-ldm-cin", seed=2)
    path = tmp_path / "cin.safetensors"
    save_file(_ldm_state(source), path)
    pipe = LatentDiffusion.from_pretrained("tiny-ldm-cin", path)
    _assert_same_state(pipe.conditioner, source.conditioner)
    _assert_same_state(pipe.unet, source.unet)
    _assert_same_state(pipe.first_stage, source.first_stage)


def test_ema_weights_are_preferred(tmp_path):
    """LitEma stores model_ema.<name without dots>; LDM samples with them, so cq does by default."""
    source = LatentDiffusion.build("tiny-ldm-bedroom", seed=3)
    state = _ldm_state(source)
    ema_unet = build("tiny-ldm-bedroom", seed=4)
    for k, v in ema_unet.state_dict().items():
        state["model_ema." + f"diffusion_model.{k}".replace(".", "")] = v
    state["model_ema.decay"], state["model_ema.num_updates"] = torch.tensor(0.9999), torch.tensor(10)
    path = tmp_path / "bedroom.safetensors"
    save_file(state, path)
    _assert_same_state(LatentDiffusion.from_pretrained("tiny-ldm-bedroom", path).unet, ema_unet)
    _assert_same_state(LatentDiffusion.from_pretrained("tiny-ldm-bedroom", path, ema=False).unet, source.unet)
    _assert_same_state(load("tiny-ldm-bedroom", path=path), ema_unet)
    _assert_same_state(load("tiny-ldm-bedroom", path=path, ema=False), source.unet)


def test_scale_factor_buffer_is_read(tmp_path):
    """Churches (scale_by_std) store their scale_factor in the checkpoint."""
    source = LatentDiffusion.build("tiny-ldm-church", seed=5)
    state = _ldm_state(source)
    state["scale_factor"] = torch.tensor(0.22884)
    state["first_stage_model.loss.logvar"] = torch.zeros(())  # training-only parts of the AE are ignored
    path = tmp_path / "church.safetensors"
    save_file(state, path)
    assert LatentDiffusion.from_pretrained("tiny-ldm-church", path).scale_factor == pytest.approx(0.22884)
    church = get_preset("tiny-ldm-church")
    needs_buffer = dataclasses.replace(church, pipeline=dataclasses.replace(church.pipeline, scale_factor=None))
    del state["scale_factor"]
    save_file(state, path)
    with pytest.raises(CheckpointFormatError, match="scale_factor"):
        LatentDiffusion.from_pretrained(needs_buffer, path)


def test_loading_errors(tmp_path):
    source = LatentDiffusion.build("tiny-sd", seed=1)
    path = tmp_path / "sd.safetensors"
    save_file(_ldm_state(source), path)
    with pytest.raises(CheckpointKeyMismatchError, match="tiny-ldm-cin"):  # the wrong preset names itself
        LatentDiffusion.from_pretrained("tiny-ldm-cin", path)
    with pytest.raises(CheckpointKeyMismatchError):
        load("tiny-ldm-cin", path=path)
    with pytest.raises(CheckpointFormatError, match="not found"):
        LatentDiffusion.from_pretrained("tiny-sd", tmp_path / "missing.ckpt")
    bare = tmp_path / "bare.safetensors"
    save_file(source.unet.state_dict(), bare)
    with pytest.raises(CheckpointFormatError, match="model.diffusion_model"):
        LatentDiffusion.from_pretrained("tiny-sd", bare)
    _assert_same_state(load("tiny-sd", path=bare), source.unet)  # a bare UNet is fine for cq.models.load
    no_ae = tmp_path / "no_ae.safetensors"
    save_file({k: v for k, v in _ldm_state(source).items() if not k.startswith("first_stage_model.")}, no_ae)
    with pytest.raises(CheckpointFormatError, match="first_stage_model"):
        LatentDiffusion.from_pretrained("tiny-sd", no_ae)
    with pytest.raises(ConfigError, match="latent-diffusion"):
        LatentDiffusion.build("demo")
    with pytest.raises(ConfigError, match="tokenizer"):
        source.sample(cond=["a cat"], steps=5)  # no tokenizer: prompts cannot be encoded


def test_unsafe_pickle_is_refused(tmp_path):
    flag = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {shlex.quote(str(flag))}",))

    source = LatentDiffusion.build("tiny-ldm-church", seed=1)
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": _ldm_state(source), "callback": Payload()}, path)
    with pytest.raises(UnsafeCheckpointError, match="trust_pickle"):
        LatentDiffusion.from_pretrained("tiny-ldm-church", path)
    with pytest.raises(UnsafeCheckpointError):
        load("tiny-ldm-church", path=path)
    assert not flag.exists()


def test_describe_and_rebuild_an_ldm_unet():
    unet = build("tiny-sd", seed=0)
    desc = describe_model(unet)
    assert desc["family"] == "ldm" and desc["preset"] == "tiny-sd"
    rebuilt = build_from_description(json.loads(json.dumps(desc)))
    assert isinstance(rebuilt, LDMUNet) and rebuilt.config == unet.config and rebuilt.preset.name == "tiny-sd"
    assert rebuilt.noise_schedule == unet.noise_schedule


# ----------------------------------------------------------------------------------------------------------------
# Loading diffusers folders


@pytest.fixture(scope="module")
def diffusers_sd(tmp_path_factory):
    """A tiny diffusers StableDiffusionPipeline-style folder: unet/, vae/, text_encoder/, tokenizer/, scheduler/."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = tmp_path_factory.mktemp("tiny-sd-diffusers")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        unet = UNet2DConditionModel(**TINY_SD_UNET).eval()
        vae = AutoencoderKL(**TINY_SD_VAE).eval()
        text = CLIPTextModel(CLIPTextConfig(**TINY_SD_TEXT, bos_token_id=49406, eos_token_id=49407)).eval()
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text.save_pretrained(folder / "text_encoder")
    tok = folder / "tokenizer"
    tok.mkdir()
    (tok / "vocab.json").write_text(json.dumps(CLIPTokenizer.vocab_from_merges([])))
    (tok / "merges.txt").write_text("#version: 0.2\n")
    (folder / "scheduler").mkdir()
    scheduler = {
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "num_train_timesteps": 1000,
    }
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return folder, unet, vae, text


def test_diffusers_folder_pipeline(diffusers_sd):
    folder, unet, vae, text = diffusers_sd
    pipe = LatentDiffusion.from_pretrained("tiny-sd", folder)
    assert pipe.conditioner.tokenizer is not None
    assert pipe.scale_factor == vae.config.scaling_factor
    ids = pipe.conditioner.tokenize(["a photo of a cat", ""])
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 900])
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        ctx = pipe.condition(ids)
        expected_ctx = text(input_ids=ids).last_hidden_state
        assert (ctx - expected_ctx).abs().max() <= PARITY_ATOL
        eps, expected = pipe.unet(x, t, ctx), unet(x, t, encoder_hidden_states=ctx).sample
        assert expected.abs().max() > 0.1 and (eps - expected).abs().max() <= PARITY_ATOL
        assert (pipe.first_stage.decode(z) - vae.decode(z).sample).abs().max() <= PARITY_ATOL
    images = pipe.sample(cond=["a cat"], steps=5, seed=0)
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()


def test_diffusers_folder_unet_only(diffusers_sd):
    folder, unet, _, _ = diffusers_sd
    for loaded in (load("tiny-sd", path=folder), load(folder), load(folder / "unet")):
        assert isinstance(loaded, LDMUNet)
        assert loaded.config == build("tiny-sd").config
        x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([5]), torch.randn(1, 77, 32)
        with torch.no_grad():
            assert (loaded(x, t, ctx) - unet(x, t, encoder_hidden_states=ctx).sample).abs().max() <= PARITY_ATOL
    assert load(folder).noise_schedule == get_preset("tiny-sd").noise  # from scheduler/scheduler_config.json


def test_artifact_round_trip_of_a_compressed_ldm(tmp_path):
    """Integration with save/load of compressed models: a fitted tiny LDM recipe saves and loads bit-identically."""
    unet = build("tiny-ldm-church", seed=0)
    recipe = cq.deepcache(interval=2)
    trace = cq.trace(unet, steps=4, num_samples=2, points=recipe.points(unet), spacing="linspace", progress=False)
    model = recipe.fit(unet, trace, progress=False)
    path = cq.save(model, tmp_path / "church.cq")
    loaded = cq.load(path)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(
        ddim(loaded, noise, steps=4, spacing="linspace"), ddim(model, noise, steps=4, spacing="linspace")
    )


def test_tokenizer_from_a_path(diffusers_sd, tmp_path):
    """CompVis checkpoints carry no tokenizer: pass its folder (vocab.json + merges.txt) or the gz merge list."""
    folder = diffusers_sd[0]
    source = LatentDiffusion.build("tiny-sd", seed=1)
    path = tmp_path / "sd.safetensors"
    save_file(_ldm_state(source), path)
    pipe = LatentDiffusion.from_pretrained("tiny-sd", path, tokenizer=folder / "tokenizer")
    assert torch.equal(pipe.conditioner.tokenize(["a cat"]), _byte_tokenizer()(["a cat"]))


def test_a_missing_tokenizer_is_refused_at_load_time(diffusers_sd, tmp_path):
    """Prompts through a text-conditioned model without a tokenizer used to fail only at sample()."""
    source = LatentDiffusion.build("tiny-sd", seed=1)
    path = tmp_path / "sd.safetensors"
    save_file(_ldm_state(source), path)
    with pytest.raises(ConfigError, match="CompVis checkpoint contains none: pass tokenizer="):
        LatentDiffusion.from_pretrained("tiny-sd", path)
    ids_only = LatentDiffusion.from_pretrained("tiny-sd", path, tokenizer=None)  # explicit: token ids only
    assert ids_only.conditioner.tokenizer is None
    folder = diffusers_sd[0]
    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(folder, no_tokenizer, ignore=shutil.ignore_patterns("tokenizer"))
    with pytest.raises(ConfigError, match="tokenizer holds none"):
        LatentDiffusion.from_pretrained("tiny-sd", no_tokenizer)
    assert LatentDiffusion.from_pretrained("tiny-ldm-cin", _cin(tmp_path)).conditioner is not None


def _cin(tmp_path):
    """A class-conditional checkpoint: no tokenizer involved, none is asked for."""
    source = LatentDiffusion.build("tiny-ldm-cin", seed=2)
    path = tmp_path / "cin.safetensors"
    save_file(_ldm_state(source), path)
    return path


def test_a_transformers5_tokenizer_folder_loads(diffusers_sd, tmp_path):
    """A pipeline folder whose tokenizer/ holds only tokenizer.json (what transformers 5 saves)."""
    from transformers import CLIPTokenizer as Reference

    folder = tmp_path / "sd_tokenizer_json"
    shutil.copytree(diffusers_sd[0], folder)
    reference = Reference.from_pretrained(str(folder / "tokenizer"))
    shutil.rmtree(folder / "tokenizer")
    reference.save_pretrained(str(folder / "tokenizer"))
    assert sorted(p.name for p in (folder / "tokenizer").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    pipe = LatentDiffusion.from_pretrained("tiny-sd", folder)
    prompts = ["a photo of a cat", ""]
    expected = reference(prompts, padding="max_length", max_length=77, truncation=True)["input_ids"]
    assert pipe.conditioner.tokenize(prompts).tolist() == expected

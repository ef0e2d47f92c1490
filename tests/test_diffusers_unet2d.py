"""`cq.diffusers` on ``UNet2DModel`` pipelines: a class-conditional LDM-family UNet (``num_class_embeds``, the layout
of diffusers' LDM-ImageNet-style UNets) and an unconditional google/ddpm-style UNet, tiny and random, compressed in
one call with ``class_labels=`` / ``num_samples=`` and sampled with `cq.diffusers.denoise` (the scheduler loop of
diffusers' UNet2DModel pipelines) or the pipeline itself (``DDIMPipeline``, ``DDPMPipeline``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_ddpm_model import DDPM_DIFFUSERS_COMMON, TINY_DIFFUSERS
from test_openai_unet import LSUN_COMMON, UNCOND_CONFIGS

import cq
import cq.diffusers
from cq.errors import ConfigError, InputShapeError, SamplerMismatchError


diffusers = pytest.importorskip("diffusers")  # an optional dependency, installed in CI (the test extra)

BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SCHEDULERS = {
    "ddim": ("DDIMScheduler", dict(**BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1)),
    "dpm": ("DPMSolverMultistepScheduler", dict(**BETAS)),
    "euler": ("EulerDiscreteScheduler", dict(**BETAS, timestep_spacing="leading", steps_offset=1)),
}
STEPS = 8
CALIBRATION = [0, 1, 2, 3, 4, 5, 0, 1]  # labels of the calibration trajectories (seeds 0..7)
HELD_OUT = [6, 7, 8]  # labels never calibrated on, with noise of another seed
UNCOND = 9


def _class_unet():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return diffusers.UNet2DModel(**{**LSUN_COMMON, **UNCOND_CONFIGS["bedroom"], "num_class_embeds": 10}).eval()


def _pipe(unet, name="ddim"):
    kind, config = SCHEDULERS[name]
    pipe = diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler())
    pipe.scheduler = getattr(diffusers, kind)(**config)  # the constructor would convert it to DDIM
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _noise(batch=3, channels=3, seed=1234):
    return torch.randn(batch, channels, 16, 16, generator=torch.Generator().manual_seed(seed))


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Worst sample's ||out - ref|| / ||ref|| (random weights: samples are not images in [-1, 1])."""
    return float(((out - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)).max())


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_an_uncompressing_recipe_reproduces_the_class_conditional_loop(name):
    """DeepCache with interval 1 computes the original UNet: through the adapter, `denoise` gives the original's
    samples (measured relative error <= 5e-7 on samples of magnitude ~35-70), guided or not, so the trace ran the
    scheduler's own timesteps and every call found its step."""
    pipe = _pipe(_class_unet(), name)
    for scale, uncond in ((1.0, None), (3.0, UNCOND)):
        kwargs = dict(steps=STEPS, class_labels=HELD_OUT, guidance_scale=scale, uncond_class=uncond)
        reference = cq.diffusers.denoise(pipe, _noise(), **kwargs)
        model = cq.diffusers.compress(
            pipe, cq.deepcache(interval=1), class_labels=CALIBRATION[:2], steps=STEPS, progress=False,
            guidance_scale=scale, uncond_class=uncond,
        )  # fmt: skip
        assert isinstance(pipe.unet, cq.diffusers.DiffusersUNet2DAdapter) and pipe.unet.model is model
        assert list(model.sampler_settings.timesteps) == [int(t) for t in pipe.scheduler.timesteps]
        assert _relative_error(cq.diffusers.denoise(pipe, _noise(), **kwargs), reference) <= 1e-5
        original = cq.diffusers.restore(pipe)
        assert isinstance(original, diffusers.UNet2DModel)
        assert torch.equal(cq.diffusers.denoise(pipe, _noise(), **kwargs), reference)


@pytest.mark.parametrize("name", ["ddim", "dpm"])
def test_compressed_class_conditional_models_stay_close_on_held_out_labels(name, monkeypatch):
    """CacheQuant (DPS N=2, W8A8, DEC) and W8A8 alone, fitted on calibration labels / seeds, sampled on other
    labels and noise, guided as fitted. Measured worst relative error (DDIM / DPM-Solver++): W8A8 0.005 / 0.004,
    guided 0.014 / 0.013; CacheQuant 0.025 / 0.034, guided 0.050 / 0.067 (DeepCache N=2 alone 0.027 / 0.037,
    guided 0.047 / 0.062). Guided calibration records CacheQuant's pooled rows: ``[uncond_class; label]`` per
    trajectory."""
    traces = []
    monkeypatch.setattr(cq.diffusers.pipeline, "trace", lambda *a, **k: traces.append(cq.trace(*a, **k)) or traces[-1])
    pipe = _pipe(_class_unet(), name)
    for scale, uncond, bounds in ((1.0, None, (0.015, 0.05)), (3.0, UNCOND, (0.04, 0.1))):
        kwargs = dict(steps=STEPS, class_labels=HELD_OUT, guidance_scale=scale, uncond_class=uncond)
        reference = cq.diffusers.denoise(pipe, _noise(), **kwargs)
        for recipe, bound in zip((cq.quant_only("w8a8"), cq.cachequant(interval=2)), bounds, strict=True):
            model = cq.diffusers.compress(
                pipe, recipe, class_labels=CALIBRATION, steps=STEPS, guidance_scale=scale, uncond_class=uncond,
                progress=False,
            )  # fmt: skip
            assert model.calibration_seeds == tuple(range(len(CALIBRATION)))
            rows = traces[-1].cond[0].tolist()  # the labels of the first step's rows
            assert rows == (CALIBRATION if uncond is None else [v for y in CALIBRATION for v in (UNCOND, y)])
            assert _relative_error(cq.diffusers.denoise(pipe, _noise(), **kwargs), reference) <= bound
            cq.diffusers.restore(pipe)


def test_the_adapter_has_the_unet2d_call_signature_and_output_type():
    from diffusers.models.unets.unet_2d import UNet2DOutput

    pipe = _pipe(_class_unet())
    original = pipe.unet
    model = cq.diffusers.compress(pipe, cq.deepcache(interval=1), class_labels=[1], steps=4, progress=False)
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([3, 4])
    t = torch.tensor(model.sampler_settings.timesteps[1])
    with torch.no_grad():
        expected = original(x, t, class_labels=y).sample
        out = pipe.unet(x, t, class_labels=y)
        assert isinstance(out, UNet2DOutput) and (out.sample - expected).abs().max() <= 5e-5
        assert torch.equal(pipe.unet(x, t, y, return_dict=False)[0], out.sample)
        with pytest.raises(InputShapeError, match="class-conditional"):
            pipe.unet(x, t)
    assert pipe.unet.config is original.config and pipe.unet.dtype == original.dtype
    cq.diffusers.restore(pipe)
    for labels in (torch.tensor([3, 4]), np.array([3, 4]), [np.int64(3), 4]):  # any integer sequence
        same = cq.diffusers.denoise(pipe, _noise(2), steps=4, class_labels=labels)
        assert torch.equal(same, cq.diffusers.denoise(pipe, _noise(2), steps=4, class_labels=[3, 4]))


def test_an_unconditional_unet2d_pipeline_runs_compressed_through_its_own_call(tmp_path):
    """google/ddpm-style UNet2DModel (cq's DDPMUNet) in a DDIMPipeline: ``pipe(num_inference_steps=N)`` just works
    after `compress(num_samples=)`; interval 1 reproduces it; a CacheQuant file saves and reloads against a fresh
    pipeline; a pipeline run with another scheduler config is refused."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = diffusers.UNet2DModel(**DDPM_DIFFUSERS_COMMON, **TINY_DIFFUSERS["lpb2"]).eval()
    pipe = diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler(clip_sample=False))
    pipe.set_progress_bar_config(disable=True)

    def images(p):
        return p(batch_size=2, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(3), output_type="np")

    reference = images(pipe).images
    model = cq.diffusers.compress(pipe, cq.deepcache(interval=1), num_samples=2, steps=STEPS, progress=False)
    assert isinstance(model.unet, cq.models.DDPMUNet)
    assert abs(images(pipe).images - reference).max() <= 1e-4  # measured 7.5e-6
    cq.diffusers.restore(pipe)
    cq.diffusers.compress(pipe, cq.cachequant(interval=2), num_samples=4, steps=STEPS, progress=False)
    compressed = images(pipe).images
    path = cq.diffusers.save(pipe, tmp_path / "ddpm.cq")
    fresh = diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler(clip_sample=False))
    fresh.set_progress_bar_config(disable=True)
    cq.diffusers.load(fresh, path)
    assert isinstance(fresh.unet, cq.diffusers.DiffusersUNet2DAdapter)
    assert (images(fresh).images == compressed).all()
    fresh.scheduler = diffusers.DDIMScheduler(clip_sample=True)
    with pytest.raises(SamplerMismatchError, match="scheduler: fitted DDIMScheduler"):
        images(fresh)


def test_bad_inputs_are_refused():
    pipe = _pipe(_class_unet())
    recipe = cq.deepcache(interval=2)
    with pytest.raises(ConfigError, match="takes no text"):
        cq.diffusers.compress(pipe, recipe, prompts=["a cat"], steps=4)
    for labels in (None, [], "12", [1.5], [10], [-1], [True]):
        with pytest.raises(ConfigError, match="class_labels must be"):
            cq.diffusers.compress(pipe, recipe, class_labels=labels, steps=4)
    with pytest.raises(ConfigError, match="num_samples is len"):
        cq.diffusers.compress(pipe, recipe, class_labels=[1], num_samples=1, steps=4)
    for uncond in (None, 10, 1.0):
        with pytest.raises(ConfigError, match="needs uncond_class"):
            cq.diffusers.compress(pipe, recipe, class_labels=[1], guidance_scale=3.0, uncond_class=uncond, steps=4)
    with pytest.raises(ConfigError, match="without guidance"):
        cq.diffusers.compress(pipe, recipe, class_labels=[1], uncond_class=9, steps=4)
    with pytest.raises(InputShapeError, match="2 class labels for a batch of 3"):
        cq.diffusers.denoise(pipe, _noise(), steps=4, class_labels=[1, 2])
    for noise in (torch.randn(3, 16, 16), torch.zeros(3, 3, 16, 16, dtype=torch.long), "noise"):
        with pytest.raises(InputShapeError, match=r"floating-point \[B, C, H, W\]"):
            cq.diffusers.denoise(pipe, noise, steps=4, class_labels=[1, 2, 3])
    with pytest.raises(InputShapeError, match="in_channels=3"):
        cq.diffusers.denoise(pipe, torch.randn(3, 4, 16, 16), steps=4, class_labels=[1, 2, 3])
    for steps in (0, 2.5, True):
        with pytest.raises(ConfigError, match="steps must be an int >= 1"):
            cq.diffusers.denoise(pipe, _noise(), steps=steps, class_labels=[1, 2, 3])
    with torch.random.fork_rng(devices=[]):
        unconditional = diffusers.UNet2DModel(**DDPM_DIFFUSERS_COMMON, **TINY_DIFFUSERS["lpb2"]).eval()
    plain = _pipe(unconditional)
    with pytest.raises(ConfigError, match="unconditional"):
        cq.diffusers.compress(plain, recipe, class_labels=[1], steps=4)
    for count in (None, 0, True, 2.0):
        with pytest.raises(ConfigError, match="num_samples=N >= 1"):
            cq.diffusers.compress(plain, recipe, num_samples=count, steps=4)
    with pytest.raises(ConfigError, match="guidance needs a class-conditional UNet"):
        cq.diffusers.compress(plain, recipe, num_samples=1, guidance_scale=2.0, steps=4)
    with pytest.raises(ConfigError, match="unconditional"):
        cq.diffusers.denoise(plain, _noise(), steps=4, class_labels=[1, 2, 3])
    with pytest.raises(ConfigError, match="DDPM UNet needs None"):  # a DDPM-family UNet with class embeddings
        cq.diffusers.convert_unet(
            diffusers.UNet2DModel(**DDPM_DIFFUSERS_COMMON, **TINY_DIFFUSERS["lpb2"], num_class_embeds=3),
            plain.scheduler,
        )

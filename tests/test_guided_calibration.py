"""Calibration with classifier-free guidance records the pooled [uncond; cond] rows, and a model
fitted on them is closer to guided full precision than one fitted on the conditional half only."""

from __future__ import annotations

import math

import pytest
import torch

import cq
from cq.errors import ConfigError, InputShapeError
from cq.models import LatentDiffusion
from cq.sampling import ClassifierFreeGuidance, ddim


STEPS, SCALE = 10, 4.0


@pytest.fixture(scope="module")
def pipe():
    return LatentDiffusion.build("tiny-ldm-cin", seed=0)


def _trace(pipe, labels, *, guided: bool, seed: int = 10_000, keep=None):
    cond = pipe.condition(labels)
    kwargs = {"guidance_scale": SCALE, "uncond": pipe.unconditional(1)} if guided else {}
    return cq.trace(
        pipe.unet,
        steps=STEPS,
        num_samples=len(labels),
        cond=cond,
        seed=seed,
        keep=keep,
        batch_size=3,
        spacing="ldm",
        points=cq.cachequant(interval=2).points(pipe.unet),
        progress=False,
        **kwargs,
    )


def test_guided_trace_stores_both_halves_interleaved(pipe):
    labels = torch.tensor([3, 7, 1, 4, 9])
    trace = _trace(pipe, labels, guided=True, keep=4)
    kept = trace.sample_ids
    assert trace.guidance_scale == SCALE and trace.x.shape[1] == 2 * len(kept) == trace.cond.shape[1]
    uncond, cond = pipe.unconditional(1)[0], pipe.condition(labels)
    for i, trajectory in enumerate(kept.tolist()):
        for step in range(trace.steps):
            assert torch.equal(trace.cond[step, 2 * i], uncond)  # the unconditional half
            assert torch.equal(trace.cond[step, 2 * i + 1], cond[trajectory])  # the conditional half
            assert torch.equal(trace.x[step, 2 * i], trace.x[step, 2 * i + 1])  # one x_t for both halves
    point = trace.points[0]
    assert not torch.allclose(trace.features[point][:, 0::2], trace.features[point][:, 1::2])
    # the recorded trajectories are the guided ones: x0 matches guided full-precision sampling of those seeds
    noise = cq.sampling.seeded_noise(pipe.unet.sample_shape, [10_000 + int(k) for k in kept])
    guided = ClassifierFreeGuidance(cq.sampling.FullPrecision(pipe.unet), SCALE, pipe.unconditional(1))
    expected = ddim(guided, noise, steps=STEPS, cond=cond[kept], spacing="ldm")
    # x0 reaches ~100 on this random model: float32 summation order moves it by ulps of that scale
    assert torch.allclose(trace.x0, expected, rtol=1e-5, atol=1e-6 * (1 + float(expected.abs().max())))


def test_guidance_inside_the_sampler_is_refused_not_recorded_by_half(pipe):
    """The trap: CFG wrapped inside a custom sampler used to record only the unconditional rows."""
    uncond = pipe.unconditional(1)

    def guided_ddim(model, x, **kwargs):
        return ddim(ClassifierFreeGuidance(model, SCALE, uncond), x, **kwargs)

    with pytest.raises(ConfigError, match="pass guidance_scale= and uncond= to cq.trace"):
        cq.trace(pipe.unet, guided_ddim, steps=4, num_samples=2, cond=pipe.condition(torch.tensor([1, 2])),
                 spacing="ldm", progress=False)  # fmt: skip


def test_guided_trace_bad_input(pipe):
    cond = pipe.condition(torch.tensor([1, 2]))
    common = {"steps": 4, "num_samples": 2, "spacing": "ldm", "progress": False}
    with pytest.raises(ConfigError, match="needs cond"):
        cq.trace(pipe.unet, guidance_scale=SCALE, uncond=pipe.unconditional(1), **common)
    with pytest.raises(ConfigError, match="needs cond"):
        cq.trace(pipe.unet, cond=cond, guidance_scale=SCALE, **common)
    with pytest.raises(ConfigError, match="only used with guidance_scale != 1"):
        cq.trace(pipe.unet, cond=cond, uncond=pipe.unconditional(1), **common)
    with pytest.raises(InputShapeError):
        cq.trace(pipe.unet, cond=cond, guidance_scale=SCALE, uncond=torch.zeros(1, 3, 5), **common)
    with pytest.raises(ConfigError, match="guidance_scale must be a number"):
        cq.trace(pipe.unet, cond=cond, guidance_scale="7", uncond=pipe.unconditional(1), **common)


def _guided_sqnr(model, pipe, held) -> float:
    """Guided eps of ``model`` vs guided full precision, each step fed the held-out guided trace's x_t, in dB."""
    uncond = pipe.unconditional(1)
    fp = ClassifierFreeGuidance(cq.sampling.FullPrecision(pipe.unet), SCALE, uncond)
    guided = ClassifierFreeGuidance(model, SCALE, uncond)
    err = ref = 0.0
    for step in range(held.steps):
        x, c, t = held.x[step, 0::2], held.cond[step, 1::2], held.timesteps[step].expand(held.x.shape[1] // 2)
        want = fp(x, t, c, step=step)
        err += (guided(x, t, c, step=step) - want).pow(2).sum().item()
        ref += want.pow(2).sum().item()
    return 10 * math.log10(ref / err)


def test_fitting_on_the_pooled_rows_beats_fitting_on_the_conditional_half():
    """W8A8 activation tables calibrated on the guided (pooled) trace vs on an unguided (conditional-only) trace of
    the same labels and seeds, measured on a guided trace of held-out seeds and classes.

    The unconditional context is made 3x larger than the class contexts (SD's empty-prompt context is likewise
    unlike prompt contexts): calibrated on the conditional half only, the unconditional rows leave the ranges
    and are clamped. Teacher-forced per step, because this random-weight tiny LDM diverges end to end (its guided
    samples reach |x0| ~ 140); the end-to-end measure is `cq.evaluate(..., guidance_scale=, uncond=)`."""
    pipe = LatentDiffusion.build("tiny-ldm-cin", seed=0)
    with torch.no_grad():
        pipe.conditioner.embedding.weight[1000] *= 3
    labels = torch.arange(16) * 7 % 500
    fitted = {
        name: cq.quant_only("w8a8").fit(pipe.unet, _trace(pipe, labels, guided=guided), progress=False)
        for name, guided in (("pooled", True), ("cond", False))
    }
    held = _trace(pipe, torch.arange(8) * 11 % 500 + 500, guided=True, seed=60_000)
    pooled, conditional = (_guided_sqnr(fitted[n], pipe, held) for n in ("pooled", "cond"))
    assert pooled > conditional + 3, (pooled, conditional)  # measured: 27.0 vs 17.2 dB


def test_evaluate_with_guidance_wraps_both_models(pipe):
    """`cq.evaluate(guidance_scale=, uncond=)` samples both the compressed model and the reference guided: a model
    identical to full precision (no cache, no quantization) gives identical samples."""
    labels = torch.tensor([1, 2, 3, 4])
    model = cq.Recipe(cacher=cq.cache.DeepCache(schedule=cq.cache.UniformSchedule(interval=1))).fit(
        pipe.unet, _trace(pipe, labels, guided=True), progress=False
    )
    cond, uncond = pipe.condition(torch.tensor([600, 601])), pipe.unconditional(1)
    result = cq.evaluate(model, pipe.unet, seeds=[70_000, 70_001], cond=cond, guidance_scale=SCALE, uncond=uncond,
                         progress=False)  # fmt: skip
    assert torch.equal(result.samples, result.reference_samples)
    noise = cq.sampling.seeded_noise(pipe.unet.sample_shape, [70_000, 70_001])
    fp = ClassifierFreeGuidance(cq.sampling.FullPrecision(pipe.unet), SCALE, uncond)
    assert torch.allclose(
        result.reference_samples, ddim(fp, noise, steps=STEPS, cond=cond, spacing="ldm"), rtol=1e-5, atol=1e-5
    )
    with pytest.raises(ConfigError, match="needs cond and uncond"):
        cq.evaluate(model, pipe.unet, seeds=[70_000], guidance_scale=SCALE, progress=False)

"""A diffusers pipeline compressed in place: its own denoising loop traced (`compress`; `denoise`, the scheduler
loop for class-conditional and unconditional UNets), the compressed UNet swapped in, `restore`, `save`, `load`."""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .. import artifact
from ..calib.trace import trace
from ..compressed import CompressedUNet
from ..errors import ConfigError, InputShapeError
from ..sampling.settings import SamplerSettings
from .adapters import DiffusersUNet2DAdapter, DiffusersUNetAdapter
from .convert import (
    _PREFIX,
    _diffusers,
    convert_unet,
    scheduler_settings,
)


__all__ = ["compress", "restore", "save", "load", "denoise"]


def _check_pipeline(pipe: Any) -> None:
    diffusers = _diffusers()
    if not isinstance(pipe, diffusers.DiffusionPipeline):
        raise ConfigError(
            f"expected a diffusers DiffusionPipeline (e.g. StableDiffusionPipeline), got {type(pipe).__name__}"
        )
    unet = getattr(pipe, "unet", None)
    if not isinstance(unet, diffusers.UNet2DConditionModel | diffusers.UNet2DModel | DiffusersUNetAdapter):
        raise ConfigError(
            f"the pipeline's unet must be a diffusers UNet2DConditionModel or UNet2DModel, got {type(unet).__name__} "
            f"({type(pipe).__name__} is not a UNet pipeline cq can compress)"
        )
    if not isinstance(getattr(pipe, "scheduler", None), diffusers.SchedulerMixin):
        kind = type(getattr(pipe, "scheduler", None)).__name__
        raise ConfigError(f"the pipeline's scheduler must be a diffusers scheduler, got {kind}")


# ----------------------------------------------------------------------------------------------------------------
# Tracing through the pipeline's loop


class _PipelineLoop:
    """A cq sampler (``sampler(model, x, *, steps, cond, ...)``) that runs the pipeline's own denoising loop with
    ``model`` as its UNet: ``pipe(prompt_embeds=cond, latents=x, guidance_scale=1, output_type="latent")`` --
    guidance is done by cq's wrapper inside the call, so each call sees the pooled batch."""

    __name__ = "diffusers"

    def __init__(self, pipe: Any, eta: float):
        self.pipe = pipe
        self.eta = eta

    def planned_settings(self, steps: int, num_timesteps: int | None = None, kwargs: Any = None) -> SamplerSettings:
        return scheduler_settings(self.pipe.scheduler, steps, eta=self.eta)

    def num_calls(self, steps: int) -> int:
        return self.planned_settings(steps).calls

    def __call__(self, model, x, *, steps, cond=None, noise=None, generator=None, **kwargs) -> Tensor:
        pipe = self.pipe
        original = pipe.unet
        adapter = DiffusersUNetAdapter(model, self.planned_settings(steps), original, pipe)
        pipe.unet = adapter
        try:
            latents = pipe(
                prompt_embeds=cond.to(original.dtype),
                num_inference_steps=steps,
                guidance_scale=1.0,
                latents=x.to(original.dtype),
                eta=self.eta,
                generator=generator,
                output_type="latent",
                return_dict=False,
            )[0]
        finally:
            pipe.unet = original
        return latents


class _SchedulerLoop(_PipelineLoop):
    """The same for a ``UNet2DModel`` pipeline: `denoise`'s scheduler loop with ``model`` behind the
    ``UNet2DModel`` signature (guidance, again, inside the call)."""

    def __call__(self, model, x, *, steps, cond=None, noise=None, generator=None, **kwargs) -> Tensor:
        adapter = DiffusersUNet2DAdapter(model, self.planned_settings(steps), self.pipe.unet, self.pipe)
        return _scheduler_loop(adapter, self.pipe.scheduler, x, steps, cond, eta=self.eta, generator=generator)


def _scheduler_loop(
    unet: Any,
    scheduler: Any,
    noise: Tensor,
    steps: int,
    labels: Tensor | None,
    *,
    guidance_scale: float = 1.0,
    uncond_class: int | None = None,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """diffusers' denoising loop around ``unet(x, t[, class_labels=]).sample`` (the loop of ``DDIMPipeline``,
    ``DDPMPipeline`` and, with guidance, ``DiTPipeline``)."""
    scheduler.set_timesteps(steps, device=noise.device)
    x = noise * scheduler.init_noise_sigma
    accepted = inspect.signature(scheduler.step).parameters
    extra = {k: v for k, v in (("eta", eta), ("generator", generator)) if k in accepted}
    guided = guidance_scale != 1.0
    if guided:
        labels = torch.cat([torch.full_like(labels, uncond_class), labels])
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(torch.cat([x, x]) if guided else x, t)
        out = unet(x_in, t, class_labels=labels).sample if labels is not None else unet(x_in, t).sample
        if guided:
            eps_u, eps_c = out.chunk(2)
            out = eps_u + guidance_scale * (eps_c - eps_u)
        x = scheduler.step(out, t, x, **extra).prev_sample
    return x


def denoise(
    pipe: Any,
    noise: Tensor,
    *,
    steps: int,
    class_labels: Sequence[int] | Tensor | None = None,
    guidance_scale: float = 1.0,
    uncond_class: int | None = None,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Sample ``pipe.unet`` (a ``UNet2DModel``, original or compressed) from ``noise`` ``[B, C, H, W]`` (standard
    normal; scaled by the scheduler's ``init_noise_sigma``) with ``pipe.scheduler`` for ``steps`` steps; returns
    the final sample (pixels in [-1, 1], or latents to decode). ``class_labels`` (``[B]``) for a class-conditional
    UNet; with ``guidance_scale`` != 1 every call runs on the pooled ``[uncond_class; class_labels]`` batch
    (CacheQuant's guided layout, the batch `compress` calibrated on). No diffusers pipeline passes class labels to
    a UNet: this is the loop to sample such UNets with."""
    _check_pipeline(pipe)
    diffusers = _diffusers()
    unet = pipe.unet
    if not isinstance(unet, diffusers.UNet2DModel | DiffusersUNet2DAdapter):
        raise ConfigError(
            f"denoise samples UNet2DModel pipelines; {type(pipe).__name__} has a {type(unet).__name__}: call "
            "pipe(prompt, ...) for text-to-image pipelines"
        )
    if not isinstance(noise, Tensor) or noise.ndim != 4 or not noise.is_floating_point():
        got = f"{tuple(noise.shape)} {noise.dtype}" if isinstance(noise, Tensor) else type(noise).__name__
        raise InputShapeError(f"noise must be a floating-point [B, C, H, W] tensor, got {got}")
    if noise.shape[1] != unet.config.in_channels:
        raise InputShapeError(
            f"noise has {noise.shape[1]} channels; this UNet takes in_channels={unet.config.in_channels}"
        )
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be an int >= 1 (num_inference_steps), got {steps!r}")
    labels = _labels(unet.config, class_labels, guidance_scale, uncond_class, noise.device)
    if labels is not None and labels.shape[0] != noise.shape[0]:
        raise InputShapeError(f"{labels.shape[0]} class labels for a batch of {noise.shape[0]} noises")
    with torch.no_grad():
        return _scheduler_loop(
            unet,
            pipe.scheduler,
            noise.to(unet.dtype),
            steps,
            labels,
            guidance_scale=guidance_scale,
            uncond_class=uncond_class,
            eta=eta,
            generator=generator,
        )


def _labels(
    config: Any, class_labels: Any, guidance_scale: float, uncond_class: int | None, device: Any
) -> Tensor | None:
    """``class_labels`` as an int64 tensor checked against the UNet's ``num_class_embeds`` (None for an
    unconditional UNet), and the guidance settings against them."""
    classes = config.get("num_class_embeds")
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, int | float):
        raise ConfigError(f"guidance_scale must be a number, got {guidance_scale!r}")
    if classes is None:
        if class_labels is not None:
            raise ConfigError("this UNet2DModel is unconditional (no num_class_embeds): pass no class_labels")
        if guidance_scale != 1.0 or uncond_class is not None:
            raise ConfigError("guidance needs a class-conditional UNet; this UNet2DModel is unconditional")
        return None
    values = class_labels.tolist() if hasattr(class_labels, "tolist") else class_labels  # tensors, numpy arrays
    if isinstance(values, str) or not isinstance(values, Sequence) or not values:
        raise ConfigError(
            f"this UNet2DModel is class-conditional ({classes} classes): class_labels must be a non-empty list of "
            f"ints in [0, {classes}), got {class_labels!r}"
        )
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not 0 <= v < classes]
    if bad:
        raise ConfigError(f"class_labels must be ints in [0, {classes}) (num_class_embeds), got {bad[:5]}")
    values = [int(v) for v in values]
    if guidance_scale != 1.0 and (
        isinstance(uncond_class, bool) or not isinstance(uncond_class, int) or not 0 <= uncond_class < classes
    ):
        raise ConfigError(
            f"guidance_scale={guidance_scale} needs uncond_class, the label of the unconditional class in "
            f"[0, {classes}) (LDM-ImageNet: 1000), got {uncond_class!r}"
        )
    if guidance_scale == 1.0 and uncond_class is not None:
        raise ConfigError("uncond_class is given without guidance (guidance_scale=1): pass a guidance_scale")
    return torch.tensor(values, dtype=torch.long, device=device)


# ----------------------------------------------------------------------------------------------------------------
# The front door


def compress(
    pipe: Any,
    recipe: Any,
    *,
    prompts: Sequence[str] | None = None,
    class_labels: Sequence[int] | None = None,
    num_samples: int | None = None,
    steps: int,
    guidance_scale: float | None = None,
    negative_prompt: str = "",
    uncond_class: int | None = None,
    seed: int = 0,
    eta: float = 0.0,
    keep: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> CompressedUNet:
    """Trace, fit and swap ``pipe.unet`` for the compressed model; returns the fitted `CompressedUNet`.

    Args:
        pipe: a diffusers pipeline with a ``UNet2DConditionModel`` (``StableDiffusionPipeline``) or a
            ``UNet2DModel`` (``DDIMPipeline`` / ``DDPMPipeline`` / ``LDMPipeline`` or any pipeline holding one).
        recipe: a `cq.Recipe` (``cq.cachequant(interval=5)``, ...).
        prompts: calibration prompts of a text-conditioned UNet, one trajectory each (seeds ``seed + i``).
        class_labels: calibration labels of a class-conditional ``UNet2DModel``, one trajectory each.
        num_samples: calibration trajectories of an unconditional ``UNet2DModel``.
        steps: ``num_inference_steps`` the pipeline will be called with; the model is fitted on the pipeline's
            current scheduler's timesteps for it and refuses any other scheduler or step count.
        guidance_scale: the guidance the model will be sampled with (calibration pools ``[uncond; cond]``); 1 for
            none. Default: 7.5 with prompts (diffusers' default), 1 otherwise.
        negative_prompt: the unconditional prompt of text guidance.
        uncond_class: the unconditional label of class guidance (LDM-ImageNet: 1000).
        seed, eta, keep, batch_size, progress: as `cq.trace` (``eta`` goes to the scheduler, like ``pipe(eta=)``).
    """
    from ..fit.recipe import Recipe

    _check_pipeline(pipe)
    if isinstance(pipe.unet, DiffusersUNetAdapter):
        raise ConfigError("the pipeline's unet is already compressed: cq.diffusers.restore(pipe) first")
    if not isinstance(recipe, Recipe):
        raise ConfigError(f"recipe must be a cq.Recipe (e.g. cq.cachequant(interval=5)), got {type(recipe).__name__}")
    if isinstance(pipe.unet, _diffusers().UNet2DModel):
        loop, cond, count, scale, uncond = _label_calibration(
            pipe, prompts, class_labels, num_samples, guidance_scale, uncond_class, eta
        )
    else:
        loop, cond, count, scale, uncond = _text_calibration(
            pipe, prompts, class_labels, num_samples, guidance_scale, negative_prompt, uncond_class, eta
        )
    unet = convert_unet(pipe.unet, pipe.scheduler)
    calibration = trace(
        unet,
        loop,
        steps=steps,
        num_samples=count,
        points=recipe.points(unet),
        keep=keep,
        batch_size=batch_size,
        cond=cond,
        seed=seed,
        guidance_scale=scale,
        uncond=uncond,
        progress=progress,
    )
    model = recipe.fit(unet, calibration, progress=progress)
    _install(pipe, model)
    return model


_Calibration = tuple[_PipelineLoop, Tensor | None, int, float, Tensor | None]  # loop, cond, count, scale, uncond


def _text_calibration(
    pipe: Any,
    prompts: Any,
    class_labels: Any,
    num_samples: Any,
    guidance_scale: float | None,
    negative_prompt: str,
    uncond_class: Any,
    eta: float,
) -> _Calibration:
    """`compress`'s calibration of a text-conditioned pipeline: the pipeline's own loop on the prompts' contexts
    (guided: the negative prompt's context as the unconditional one)."""
    labelled = {"class_labels": class_labels, "num_samples": num_samples, "uncond_class": uncond_class}
    given = [name for name, value in labelled.items() if value is not None]
    if given:
        raise ConfigError(
            f"{given}: this pipeline's unet is a text-conditioned UNet2DConditionModel; pass prompts=[...] "
            "(class labels go with a class-conditional UNet2DModel)"
        )
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
        raise ConfigError("prompts must be a non-empty list of calibration prompts (strings)")
    if not all(isinstance(p, str) for p in prompts):
        raise ConfigError("prompts must be strings")
    scale = 7.5 if guidance_scale is None else guidance_scale
    guided = scale != 1.0
    negative = [negative_prompt] * len(prompts) if guided else None
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(list(prompts), pipe.unet.device, 1, guided, negative_prompt=negative)
    return _PipelineLoop(pipe, eta), cond.float(), len(prompts), scale, uncond[:1].float() if guided else None


def _label_calibration(
    pipe: Any,
    prompts: Any,
    class_labels: Any,
    num_samples: Any,
    guidance_scale: float | None,
    uncond_class: int | None,
    eta: float,
) -> _Calibration:
    """`compress`'s calibration of a ``UNet2DModel`` pipeline: `denoise`'s loop on the labels (guided: the pooled
    ``[uncond_class; label]`` rows), or unconditionally on ``num_samples`` noises."""
    if prompts is not None:
        raise ConfigError(
            "this pipeline's unet is a UNet2DModel, which takes no text: pass class_labels=[...] "
            "(class-conditional) or num_samples=N (unconditional)"
        )
    scale = 1.0 if guidance_scale is None else guidance_scale
    device = pipe.unet.device
    labels = _labels(pipe.unet.config, class_labels, scale, uncond_class, device)
    if labels is None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ConfigError(
                f"an unconditional UNet2DModel is calibrated on num_samples=N >= 1 trajectories, got {num_samples!r}"
            )
    elif num_samples is not None:
        raise ConfigError("num_samples is len(class_labels) for a class-conditional UNet2DModel: pass one of them")
    count = len(labels) if labels is not None else num_samples
    uncond = torch.tensor([uncond_class], device=device) if scale != 1.0 else None
    return _SchedulerLoop(pipe, eta), labels, count, scale, uncond


def _install(pipe: Any, model: CompressedUNet) -> None:
    settings = model.sampler_settings
    if settings is None or not settings.sampler.startswith(_PREFIX):
        raise ConfigError(
            "this compressed model was not fitted through a diffusers pipeline's loop (its sampler is "
            f"{settings.sampler.split(' ')[0] if settings else 'unknown'}); sample it with cq's samplers"
        )
    adapter = DiffusersUNet2DAdapter if isinstance(pipe.unet, _diffusers().UNet2DModel) else DiffusersUNetAdapter
    pipe.unet = adapter(model, settings, pipe.unet, pipe)


def restore(pipe: Any) -> nn.Module:
    """Put the original diffusers UNet back into ``pipe``; returns it."""
    _check_pipeline(pipe)
    if not isinstance(pipe.unet, DiffusersUNetAdapter):
        raise ConfigError("the pipeline's unet is not compressed by cq (nothing to restore)")
    pipe.unet = pipe.unet.original
    return pipe.unet


def save(pipe: Any, path: Any) -> Any:
    """`cq.save` of the compressed model inside ``pipe``."""
    _check_pipeline(pipe)
    if not isinstance(pipe.unet, DiffusersUNetAdapter):
        raise ConfigError("the pipeline's unet is not compressed by cq: cq.diffusers.compress(pipe, ...) first")
    return artifact.save(pipe.unet.model, path)


def load(pipe: Any, path: Any, *, int8: bool = False) -> CompressedUNet:
    """`cq.load` a model saved by `save` against ``pipe`` (refused if fitted on another UNet's weights) and swap it
    in for ``pipe.unet``; returns it."""
    _check_pipeline(pipe)
    if isinstance(pipe.unet, DiffusersUNetAdapter):
        raise ConfigError("the pipeline's unet is already compressed: cq.diffusers.restore(pipe) first")
    model = artifact.load(path, unet=convert_unet(pipe.unet, pipe.scheduler), int8=int8)
    model = model.to(pipe.unet.device)
    _install(pipe, model)
    return model

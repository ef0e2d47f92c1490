"""cq on a diffusers pipeline, in one line: ``cq.diffusers.compress(pipe, recipe, prompts=[...], steps=N)``.

`compress` converts ``pipe.unet`` (a diffusers ``UNet2DConditionModel``) to cq's own `LDMUNet`, traces it by running
**the pipeline's own denoising loop** (its scheduler, its ``scale_model_input``, its timesteps, ``clip_sample``,
``prediction_type`` and spacing, exactly as ``pipe(...)`` will run them) with a recording UNet in place of
``pipe.unet``, fits the recipe on that trace, and swaps ``pipe.unet`` for a `DiffusersUNetAdapter`: a module with
``UNet2DConditionModel``'s call signature and output type around the fitted `CompressedUNet`. ``pipe(prompt,
num_inference_steps=N)`` then just works; `restore` puts the original UNet back; `save` / `load` write and read the
compressed model (`cq.save` / `cq.load`) against a pipeline.

Why trace through the pipeline rather than with a cq sampler of the same algorithm: every scheduler (DDIM, PNDM with
or without its Runge-Kutta warm-up, DPM-Solver with any of its options, Euler with its input scaling) is then
calibrated on exactly the inputs it feeds the UNet at inference, with nothing to keep in sync between two
implementations; cq's `dpm_solver` / `ddim` / `plms` remain the samplers of cq's own models.

Guidance: the trace runs the loop with diffusers' guidance off and cq's `ClassifierFreeGuidance` inside the UNet
call, so every recorded call is the pooled ``[uncond; cond]`` batch -- the batch diffusers' guided loop passes the
UNet (negative prompt first), which the compressed model then sees at inference (CacheQuant calibrates on it too).

Step index: the adapter maps each timestep the loop passes to the fitted model-call index with the pure lookup of
`CompressedUNet.steps_of`; only where two calls share a timestep (PNDM's second timestep) it asks the pipeline's
scheduler for its own count of ``step()`` calls (PNDM's ``counter``) -- cq counts nothing. Before each call it also
checks that the pipeline's scheduler is the one the model was fitted on (class and config, timesteps), raising
`SamplerMismatchError` otherwise.

Class labels and unconditional pixel models: a pipeline whose ``unet`` is a ``UNet2DModel`` (class-conditional
with ``num_class_embeds``, as diffusers converts LDM-ImageNet-style UNets, or unconditional, as google/ddpm-*) is
compressed with ``class_labels=[...]`` or ``num_samples=N``. No diffusers pipeline passes class labels to a UNet, so
cq traces such UNets with `denoise`: the scheduler loop every diffusers pipeline runs (``set_timesteps``, the
initial noise times ``init_noise_sigma``, ``scale_model_input``, the UNet, ``step``; guidance on the pooled
``[uncond; cond]`` labels as DiT's pipeline does), which is also how a user samples the compressed UNet with labels;
``DDIMPipeline`` / ``DDPMPipeline`` run exactly that loop, so ``pipe(num_inference_steps=N)`` just works for an
unconditional UNet. The swapped-in `DiffusersUNet2DAdapter` has ``UNet2DModel``'s call signature
(``forward(sample, timestep, class_labels=None, return_dict=True)`` -> ``UNet2DOutput``).

diffusers is an optional dependency (``pip install 'cq[diffusers]'``), imported only inside these functions.
"""

from __future__ import annotations

import copy
import inspect
import json
import numbers
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from . import artifact
from .compressed import CompressedUNet, fitted_steps
from .errors import AmbiguousTimestepError, ConfigError, InputShapeError, SamplerMismatchError
from .models.loading import build, load_weights, unet_config_from_diffusers
from .models.presets import Preset
from .models.unet import CacheableUNet
from .sampling.noise import NoiseSchedule
from .sampling.settings import SamplerSettings
from .trace import trace


__all__ = [
    "compress",
    "restore",
    "save",
    "load",
    "denoise",
    "DiffusersUNetAdapter",
    "DiffusersUNet2DAdapter",
    "convert_unet",
    "scheduler_settings",
]

_PREFIX = "diffusers:"
_UNSUPPORTED = (
    "class_labels",
    "timestep_cond",
    "attention_mask",
    "added_cond_kwargs",
    "down_block_additional_residuals",
    "mid_block_additional_residual",
    "down_intrablock_additional_residuals",
    "encoder_attention_mask",
)


def _diffusers() -> Any:
    try:
        import diffusers
    except ImportError:
        raise ConfigError(
            "cq.diffusers needs the diffusers package: pip install 'cq[diffusers]' (cq's own models do not)"
        ) from None
    return diffusers


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
# Conversion and scheduler settings


def noise_schedule_of(scheduler: Any) -> NoiseSchedule:
    """The `NoiseSchedule` of a diffusers scheduler's config (linear / scaled_linear betas only)."""
    cfg = dict(scheduler.config)
    kind = cfg.get("beta_schedule", "linear")
    if cfg.get("trained_betas") is not None or kind not in ("linear", "scaled_linear"):
        raise ConfigError(
            f"{type(scheduler).__name__} uses beta_schedule={kind!r}"
            + (" with trained_betas" if cfg.get("trained_betas") is not None else "")
            + "; cq's NoiseSchedule has 'linear' and 'scaled_linear' betas only"
        )
    if cfg.get("rescale_betas_zero_snr"):
        raise ConfigError(f"{type(scheduler).__name__} has rescale_betas_zero_snr=True, which cq does not model")
    return NoiseSchedule(
        kind=kind,
        beta_start=float(cfg.get("beta_start", 1e-4)),
        beta_end=float(cfg.get("beta_end", 0.02)),
        num_timesteps=int(cfg.get("num_train_timesteps", 1000)),
    )


def convert_unet(unet: nn.Module, scheduler: Any) -> CacheableUNet:
    """cq's UNet with the weights of a diffusers ``UNet2DConditionModel`` or ``UNet2DModel`` (float32, on its device,
    eval mode) and the noise schedule of ``scheduler``: an `LDMUNet` (text- or class-conditional, or an LDM-family
    unconditional UNet) or a `DDPMUNet` (google/ddpm-* layout); numerically the same network
    (`tests/test_openai_unet.py`, `tests/test_convert.py`)."""
    diffusers = _diffusers()
    if not isinstance(unet, diffusers.UNet2DConditionModel | diffusers.UNet2DModel):
        raise ConfigError(f"expected a diffusers UNet2DConditionModel or UNet2DModel, got {type(unet).__name__}")
    config = dict(unet.config)
    config["_class_name"] = type(unet).__name__
    config, _ = unet_config_from_diffusers(config)
    preset = Preset(name="diffusers", config=config, noise=noise_schedule_of(scheduler))
    with torch.device("meta"):
        cq_unet = build(preset)
    cq_unet = cq_unet.to_empty(device=unet.device)
    load_weights(cq_unet, {k: v.float() for k, v in unet.state_dict().items()}, format="diffusers")
    return cq_unet.eval()


def _scheduler_name(scheduler: Any) -> str:
    """``"diffusers:<class> <config JSON>"``: what of the scheduler decides the trajectory (all its config)."""
    cfg = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
    return f"{_PREFIX}{type(scheduler).__name__} {json.dumps(cfg, sort_keys=True, default=str)}"


def scheduler_settings(scheduler: Any, steps: int, *, eta: float = 0.0) -> SamplerSettings:
    """The `SamplerSettings` of a pipeline loop of ``steps`` inference steps with ``scheduler``: the timestep of
    every UNet call (``set_timesteps`` on a copy), the scheduler's class and config, ``clip_sample``."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be an int >= 1 (num_inference_steps), got {steps!r}")
    planned = copy.deepcopy(scheduler)
    planned.set_timesteps(steps)
    timesteps = [float(t) for t in planned.timesteps]
    fractional = [t for t in timesteps if not t.is_integer()]
    if fractional:
        raise ConfigError(
            f"{type(scheduler).__name__} with {steps} steps calls the UNet at fractional timesteps "
            f"{fractional[:4]}: cq's per-step tables are keyed by integer timesteps; use timestep_spacing "
            "'leading' or 'trailing', or a step count that gives integer timesteps"
        )
    cfg = dict(scheduler.config)
    spacing = str(cfg.get("timestep_spacing", "leading"))
    return SamplerSettings(
        _scheduler_name(scheduler),
        steps,
        spacing,
        eta,
        bool(cfg.get("clip_sample", False)),
        timesteps=tuple(int(t) for t in timesteps),
    )


def _scheduler_position(scheduler: Any) -> int | None:
    """The scheduler's own count of ``step()`` calls so far (PNDM's ``counter``, the k-diffusion-style schedulers'
    ``step_index``), read only to tell apart two calls at one timestep."""
    counter = getattr(scheduler, "counter", None)
    if isinstance(counter, int):
        return counter
    index = getattr(scheduler, "step_index", None)
    return int(index) if index is not None else None


# ----------------------------------------------------------------------------------------------------------------
# The adapter


class DiffusersUNetAdapter(nn.Module):
    """A cq sampler-facing model (a `CompressedUNet`; while tracing, cq's recorder) behind diffusers'
    ``UNet2DConditionModel`` call signature: ``forward(sample, timestep, encoder_hidden_states, ...,
    return_dict=True)`` returns ``UNet2DConditionOutput`` (or ``(sample,)``), and ``config``, ``dtype``,
    ``device``, ``in_channels`` are those pipelines read.

    Args:
        model: called as ``model(x, t, cond, step=i)``.
        settings: the run it was fitted on (``model.sampler_settings``); maps timesteps to steps.
        original: the diffusers UNet it replaces (kept for `restore`, not a submodule).
        pipeline: the pipeline it serves; its scheduler is checked against ``settings`` at every call.
    """

    def __init__(self, model: nn.Module, settings: SamplerSettings, original: nn.Module, pipeline: Any):
        super().__init__()
        self.model = model
        self.settings = settings
        self.config = original.config
        self._original = (original,)  # a tuple: not registered, so pipe.to() / state_dict() see only the cq model
        self._dtype = original.dtype
        self._pipeline = weakref.ref(pipeline)

    @property
    def original(self) -> nn.Module:
        return self._original[0]

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def in_channels(self) -> int:
        return self.config.in_channels

    def forward(
        self,
        sample: Tensor,
        timestep: Tensor | float | int,
        encoder_hidden_states: Tensor | None = None,
        class_labels: Tensor | None = None,
        timestep_cond: Tensor | None = None,
        attention_mask: Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        added_cond_kwargs: dict[str, Tensor] | None = None,
        down_block_additional_residuals: tuple[Tensor, ...] | None = None,
        mid_block_additional_residual: Tensor | None = None,
        down_intrablock_additional_residuals: tuple[Tensor, ...] | None = None,
        encoder_attention_mask: Tensor | None = None,
        return_dict: bool = True,
    ) -> Any:
        extras = dict(
            class_labels=class_labels,
            timestep_cond=timestep_cond,
            attention_mask=attention_mask,
            added_cond_kwargs=added_cond_kwargs or None,
            down_block_additional_residuals=down_block_additional_residuals,
            mid_block_additional_residual=mid_block_additional_residual,
            down_intrablock_additional_residuals=down_intrablock_additional_residuals,
            encoder_attention_mask=encoder_attention_mask,
        )
        given = [name for name in _UNSUPPORTED if extras[name] is not None]
        if given or cross_attention_kwargs:
            given += ["cross_attention_kwargs"] if cross_attention_kwargs else []
            raise ConfigError(
                f"a cq-compressed UNet takes sample, timestep and encoder_hidden_states only; got {given} "
                "(ControlNet residuals, IP-adapters, LoRA scales, attention masks are not compressed); "
                "cq.diffusers.restore(pipe) for those"
            )
        out = self._run(sample, timestep, encoder_hidden_states)
        if not return_dict:
            return (out,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=out)

    def _run(self, sample: Tensor, timestep: Tensor | float | int, cond: Tensor | None) -> Tensor:
        """``model(sample, t, cond, step=i)`` with ``i`` looked up from the timestep, in the model's dtype."""
        t = torch.as_tensor(timestep, device=sample.device)
        step = self._step(t)
        self._check_scheduler()
        t = t.reshape(-1).expand(sample.shape[0]) if t.numel() == 1 else t
        inner = next(self.model.parameters()).dtype
        if cond is not None and cond.is_floating_point():
            cond = cond.to(inner)
        return self.model(sample.to(inner), t, cond, step=step).to(sample.dtype)

    def _step(self, t: Tensor) -> int:
        steps = fitted_steps(self.settings, t)
        if len(steps) == 1:
            return steps[0]
        pipe = self._pipeline()
        position = _scheduler_position(pipe.scheduler) if pipe is not None else None
        if position is None or position not in steps:
            raise AmbiguousTimestepError(
                f"timestep {float(t.reshape(-1)[0]):g} is visited by UNet calls {list(steps)} and the pipeline's "
                f"scheduler does not say which this is (its call count: {position}); run the pipeline's own loop"
            )
        return position

    def _check_scheduler(self) -> None:
        pipe = self._pipeline()
        if pipe is None:
            return
        scheduler = pipe.scheduler
        running = [int(t) for t in getattr(scheduler, "timesteps", ())]
        name = _scheduler_name(scheduler)
        diff = []
        if name != self.settings.sampler:
            diff.append(f"scheduler: fitted {self.settings.sampler[len(_PREFIX) :]}, running {name[len(_PREFIX) :]}")
        if running != list(self.settings.timesteps):
            diff.append(f"timesteps: fitted {list(self.settings.timesteps)}, running {running}")
        if diff:
            raise SamplerMismatchError(
                f"the compressed UNet was fitted on another scheduler run than the pipeline's: {'; '.join(diff)}. "
                "Use the scheduler and num_inference_steps it was fitted with, or compress again"
            )

    def extra_repr(self) -> str:
        return f"fitted for {self.settings.describe()[:160]}"


class DiffusersUNet2DAdapter(DiffusersUNetAdapter):
    """`DiffusersUNetAdapter` behind ``UNet2DModel``'s call signature: ``forward(sample, timestep,
    class_labels=None, return_dict=True)`` returns ``UNet2DOutput`` (or ``(sample,)``). ``class_labels`` are
    required by a class-conditional UNet (``num_class_embeds``) and refused by an unconditional one."""

    def forward(
        self,
        sample: Tensor,
        timestep: Tensor | float | int,
        class_labels: Tensor | None = None,
        return_dict: bool = True,
    ) -> Any:
        classes = self.config.get("num_class_embeds")
        if classes is not None and class_labels is None:
            raise InputShapeError(
                f"this UNet is class-conditional ({classes} classes): call it with class_labels=[B] ints"
            )
        if classes is None and class_labels is not None:
            raise InputShapeError("this UNet is unconditional: call it without class_labels")
        out = self._run(sample, timestep, class_labels)
        if not return_dict:
            return (out,)
        from diffusers.models.unets.unet_2d import UNet2DOutput

        return UNet2DOutput(sample=out)


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
    from .recipe import Recipe

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

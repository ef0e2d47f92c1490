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

diffusers is an optional dependency (``pip install 'cq[diffusers]'``), imported only inside these functions.
"""

from __future__ import annotations

import copy
import json
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from . import artifact
from .compressed import CompressedUNet, fitted_steps
from .errors import AmbiguousTimestepError, ConfigError, SamplerMismatchError
from .models.convert_ldm import ldm_unet_config_from_diffusers
from .models.loading import build, load_weights
from .models.openai_unet import LDMUNet
from .models.presets import Preset
from .sampling.noise import NoiseSchedule
from .sampling.settings import SamplerSettings
from .trace import trace


__all__ = ["compress", "restore", "save", "load", "DiffusersUNetAdapter", "convert_unet", "scheduler_settings"]

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
    if not isinstance(unet, diffusers.UNet2DConditionModel | DiffusersUNetAdapter):
        raise ConfigError(
            f"the pipeline's unet must be a diffusers UNet2DConditionModel, got {type(unet).__name__} "
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


def convert_unet(unet: nn.Module, scheduler: Any) -> LDMUNet:
    """cq's `LDMUNet` with the weights of a diffusers ``UNet2DConditionModel`` (float32, on its device, eval mode)
    and the noise schedule of ``scheduler``; numerically the same network (`tests/test_openai_unet.py`)."""
    diffusers = _diffusers()
    if not isinstance(unet, diffusers.UNet2DConditionModel):
        raise ConfigError(f"expected a diffusers UNet2DConditionModel, got {type(unet).__name__}")
    config = ldm_unet_config_from_diffusers(dict(unet.config))
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
        t = torch.as_tensor(timestep, device=sample.device)
        step = self._step(t)
        self._check_scheduler()
        t = t.reshape(-1).expand(sample.shape[0]) if t.numel() == 1 else t
        inner = next(self.model.parameters()).dtype
        cond = encoder_hidden_states.to(inner) if encoder_hidden_states is not None else None
        out = self.model(sample.to(inner), t, cond, step=step).to(sample.dtype)
        if not return_dict:
            return (out,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=out)

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


# ----------------------------------------------------------------------------------------------------------------
# The front door


def compress(
    pipe: Any,
    recipe: Any,
    *,
    prompts: Sequence[str] | None = None,
    class_labels: Sequence[int] | None = None,
    steps: int,
    guidance_scale: float = 7.5,
    negative_prompt: str = "",
    seed: int = 0,
    eta: float = 0.0,
    keep: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> CompressedUNet:
    """Trace, fit and swap ``pipe.unet`` for the compressed model; returns the fitted `CompressedUNet`.

    Args:
        pipe: a diffusers text-to-image pipeline with a ``UNet2DConditionModel`` (``StableDiffusionPipeline``).
        recipe: a `cq.Recipe` (``cq.cachequant(interval=5)``, ...).
        prompts: calibration prompts, one trajectory each (seeds ``seed + i``).
        class_labels: not supported yet (diffusers has no class-conditional UNet pipeline loop to run).
        steps: ``num_inference_steps`` the pipeline will be called with; the model is fitted on the pipeline's
            current scheduler's timesteps for it and refuses any other scheduler or step count.
        guidance_scale, negative_prompt: the guidance the pipeline will be called with (calibration pools
            ``[uncond; cond]``); 1 for no guidance.
        seed, eta, keep, batch_size, progress: as `cq.trace` (``eta`` goes to the scheduler, like ``pipe(eta=)``).
    """
    from .recipe import Recipe

    _check_pipeline(pipe)
    if isinstance(pipe.unet, DiffusersUNetAdapter):
        raise ConfigError("the pipeline's unet is already compressed: cq.diffusers.restore(pipe) first")
    if not isinstance(recipe, Recipe):
        raise ConfigError(f"recipe must be a cq.Recipe (e.g. cq.cachequant(interval=5)), got {type(recipe).__name__}")
    if class_labels is not None:
        raise ConfigError(
            "class_labels: diffusers has no class-conditional UNet2DConditionModel pipeline whose loop cq can run; "
            "compress a class-conditional LDM with cq.models.LatentDiffusion and cq.trace(cond=labels)"
        )
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
        raise ConfigError("prompts must be a non-empty list of calibration prompts (strings)")
    if not all(isinstance(p, str) for p in prompts):
        raise ConfigError("prompts must be strings")
    unet = convert_unet(pipe.unet, pipe.scheduler)
    guided = guidance_scale != 1.0
    negative = [negative_prompt] * len(prompts) if guided else None
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(list(prompts), pipe.unet.device, 1, guided, negative_prompt=negative)
    calibration = trace(
        unet,
        _PipelineLoop(pipe, eta),
        steps=steps,
        num_samples=len(prompts),
        points=recipe.points(unet),
        keep=keep,
        batch_size=batch_size,
        cond=cond.float(),
        seed=seed,
        guidance_scale=guidance_scale,
        uncond=uncond[:1].float() if guided else None,
        progress=progress,
    )
    model = recipe.fit(unet, calibration, progress=progress)
    _install(pipe, model)
    return model


def _install(pipe: Any, model: CompressedUNet) -> None:
    settings = model.sampler_settings
    if settings is None or not settings.sampler.startswith(_PREFIX):
        raise ConfigError(
            "this compressed model was not fitted through a diffusers pipeline's loop (its sampler is "
            f"{settings.sampler.split(' ')[0] if settings else 'unknown'}); sample it with cq's samplers"
        )
    pipe.unet = DiffusersUNetAdapter(model, settings, pipe.unet, pipe)


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

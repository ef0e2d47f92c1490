"""The modules swapped in for ``pipe.unet``: `DiffusersUNetAdapter` (``UNet2DConditionModel``'s call signature
and output) and `DiffusersUNet2DAdapter` (``UNet2DModel``'s) around a fitted `CompressedUNet`."""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor, nn

from ..compressed import fitted_steps
from ..errors import AmbiguousTimestepError, ConfigError, InputShapeError, SamplerMismatchError
from ..sampling.settings import SamplerSettings
from .convert import _PREFIX, _scheduler_name, _scheduler_position


__all__ = ["DiffusersUNetAdapter", "DiffusersUNet2DAdapter"]

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

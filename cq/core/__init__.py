"""The contract between a diffusion UNet and everything cq does around it: `CacheableUNet` (the model),
`CacheView` (the slot through which one call reads or writes cached features) and the sampling step as scoped
context (`step_scope`, read by per-step modules)."""

from .step import current_step, current_step_index, step_row, step_scope, table_step
from .unet import CacheableUNet, PresetInfo, check_cacheable, check_model_inputs, check_timestep_values
from .view import CacheView


__all__ = [
    "CacheableUNet",
    "PresetInfo",
    "check_cacheable",
    "check_model_inputs",
    "check_timestep_values",
    "CacheView",
    "step_scope",
    "current_step",
    "current_step_index",
    "table_step",
    "step_row",
]

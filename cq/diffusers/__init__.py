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

from .adapters import DiffusersUNet2DAdapter, DiffusersUNetAdapter
from .convert import convert_unet, scheduler_settings
from .convert import noise_schedule_of as noise_schedule_of
from .pipeline import compress, denoise, load, restore, save


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

"""`CompressedUNet`: a UNet run with caching (and, later, quantization and corrections) over a fixed step count.

``forward(x, t, cond=None, *, step)`` is the only place the sampling step is written: it enters
``step_scope(step)`` for per-step modules and asks the cache whether ``step`` refreshes or reuses. Nothing is
counted; calling twice with the same step gives the same output. The model is tied to the step count its
schedule was fitted for: samplers with another count are refused (`StepCountMismatchError`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .cache.cacher import Cacher
from .core.step import step_scope
from .core.unet import check_cacheable, check_model_inputs
from .errors import (
    AmbiguousTimestepError,
    ConfigError,
    InputValueError,
    StepCountMismatchError,
    TimestepNotFittedError,
)
from .quant.backend import Backend
from .sampling.model import SamplerModel
from .sampling.settings import SamplerSettings


__all__ = ["CompressedUNet", "fitted_steps"]


class CompressedUNet(SamplerModel):
    """A cq UNet plus what compresses it, for sampling with exactly ``num_steps`` steps.

    Save it with `cq.save`, report on it with `cq.report`, measure it with `cq.evaluate`.

    Args:
        unet: a cq UNet (exposes ``cache_points()`` and takes ``cache=``); not modified.
        num_steps: sampler steps this model is fitted for.
        cacher: a fitted `Cacher` (e.g. ``DeepCache(schedule=UniformSchedule(interval=5))``), or None for no
            caching. The model owns the one run-time `FeatureCache` it builds (``self.cache``).
        calibration_seeds: the initial-noise seeds of the trace the model was fitted on (`Trace.seeds`);
            `cq.evaluate` refuses them, so quality is only ever stated on held-out seeds.
        sampler_settings: how the trace was sampled (`Trace.settings`); the samplers refuse any other settings
            (`SamplerMismatchError`). None: only the call count ``num_steps`` is checked.
        recipe: the fitted `Recipe` that made this model (set by `Recipe.fit` / `Recipe.build`; `cq.save` needs it).
        base_fingerprint: SHA-256 of the full-precision weights it was fitted on (`cq.io.fingerprint`); "" unknown.
        calibration_guidance: the classifier-free guidance scale of its trace (`Trace.guidance_scale`; 1: unguided),
            what sampling should use by default (the CLI does); None: unknown (files written before it was saved).

    Example:
        >>> model = CompressedUNet(unet, num_steps=50, cacher=DeepCache(schedule=UniformSchedule(interval=5)))
        >>> x0 = cq.sampling.ddim(model, noise, steps=50)
    """

    def __init__(
        self,
        unet: nn.Module,
        *,
        num_steps: int,
        cacher: Cacher | None = None,
        calibration_seeds: tuple[int, ...] = (),
        sampler_settings: SamplerSettings | None = None,
        recipe: Any = None,  # the fitted cq.Recipe (not imported here: recipe.py builds CompressedUNets)
        base_fingerprint: str = "",
        calibration_guidance: float | None = None,
    ):
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise StepCountMismatchError(f"num_steps must be an int >= 1, got {num_steps!r}")
        if sampler_settings is not None and sampler_settings.calls != num_steps:
            raise StepCountMismatchError(
                f"sampler_settings make {sampler_settings.calls} model calls, num_steps is {num_steps}"
            )
        super().__init__(
            noise_schedule=check_cacheable(unet, "CompressedUNet").noise_schedule,
            num_steps=num_steps,
            sampler_settings=sampler_settings,
        )
        self.unet = unet
        self.calibration_seeds = tuple(int(s) for s in calibration_seeds)
        self.cacher = cacher
        self.cache = cacher.build(unet, num_steps) if cacher is not None else None
        self.recipe = recipe
        self.base_fingerprint = base_fingerprint
        self.calibration_guidance = None if calibration_guidance is None else float(calibration_guidance)
        #: layer name -> how it runs after `to_int8` ("int8 (oneDNN)", ...); empty while all layers are fake-quant
        self.execution: dict[str, str] = {}
        #: the inference runtime that runs ``unet``'s calls after `to_runtime` (`cq.runtime.OpenVINOUNet`), or None
        self.runtime: Any = None

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.unet.sample_shape)

    def cache_points(self) -> tuple[str, ...]:
        return tuple(self.unet.cache_points())

    def refresh_mask(self) -> tuple[bool, ...]:
        """Per step: True = full forward. All True without a cacher."""
        return self.cache.mask if self.cache is not None else (True,) * self.num_steps

    def forward(self, x: Tensor, t: Tensor, cond: Any = None, *, step: int | None = None) -> Tensor:
        """``step``: the model-call index (cq's samplers pass it). Without it, the step is looked up from ``t``
        among the fitted timesteps (`step_of`): how a diffusers scheduler's loop, which passes only ``t``, drives
        the model."""
        if step is None:
            self._check_inputs(x, t)
            step = self.step_of(t)
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < self.num_steps:
            raise StepCountMismatchError(
                f"step must be an int in [0, {self.num_steps}) for a model fitted for {self.num_steps} steps, "
                f"got {step!r}"
            )
        self._check_inputs(x, t)
        unet = self.unet if self.runtime is None else self.runtime
        with step_scope(step):
            if self.cache is None:
                return unet(x, t, cond)
            return self.cache.run(unet, x, t, cond, step)

    def steps_of(self, t: Tensor | int | float) -> tuple[int, ...]:
        """The model-call indices at timestep ``t`` (a number, or a tensor whose entries are all that number) in the
        fitted sampler settings: a pure lookup, nothing counted. Raises `TimestepNotFittedError` when the model
        records no settings or ``t`` is not a fitted timestep."""
        return fitted_steps(self.sampler_settings, t)

    def step_of(self, t: Tensor | int | float) -> int:
        """The model-call index of timestep ``t`` (`steps_of`); a timestep two calls share (PLMS's second) raises
        `AmbiguousTimestepError`: pass ``step=`` there."""
        steps = self.steps_of(t)
        if len(steps) > 1:
            raise AmbiguousTimestepError(
                f"timestep {_single_timestep(t):g} is visited by model calls {list(steps)} of "
                f"{self.sampler_settings.describe()} (PLMS / PNDM call the model twice there): pass step= explicitly"
            )
        return steps[0]

    def _check_inputs(self, x: Tensor, t: Tensor) -> None:
        """Refuse what the fitted tables cannot represent instead of clamping it silently: timesteps outside the
        noise schedule's ``[0, T)`` and non-finite inputs."""
        t = torch.as_tensor(t)
        check_model_inputs(x, t, self.noise_schedule.num_timesteps if self.noise_schedule is not None else None, self)
        if not bool(torch.isfinite(x).all()):
            raise InputValueError("x contains NaN or inf; the sampler state diverged or the input is corrupted")

    def compile(self, **kwargs: Any) -> None:
        """Compile the UNet in place (`torch.nn.Module.compile`; ``kwargs`` go to `torch.compile`).

        Only the UNet is compiled: the cache's refresh-or-reuse decision, the input checks and the step stay in
        Python, so the UNet compiles to exactly two graphs -- the full call and the shallow call -- with no
        graph break, and the per-step activation tables and corrections are indexed by the step as a tensor
        (`cq.core.step.current_step_index`), so no step recompiles them. Fake-quant layers compile
        (Inductor fuses their rounding into the surrounding elementwise ops); the state dict keeps its keys, so
        a compiled model saves as before. Compiled float kernels sum in another order than eager ones, so
        measure the compiled model itself (`cq.evaluate`).

        oneDNN int8 layers (`to_int8` on CPUs with VNNI / AMX) do not lower through Inductor in torch 2.14: its
        oneDNN lowerings want the prepacked weight as a graph constant, which a module's packed weight is not
        (seen: ``InductorError: packed_weight must be a graph constant`` at the first call, also with
        ``freezing``). Such a model is refused here with the two ways that work: ``to_int8("int_mm")`` before
        compiling (exact on any CPU), or ``compile(backend="aot_eager")`` (graphs without Inductor's kernels)."""
        backend = kwargs.get("backend", "inductor")
        onednn = [name for name, mode in (self.execution or {}).items() if mode == "int8 (oneDNN)"]
        if onednn and backend == "inductor":
            raise ConfigError(
                f"{len(onednn)} layers run oneDNN int8 kernels (e.g. {onednn[0]}), which Inductor cannot lower in "
                "this torch (its oneDNN lowerings need the prepacked weight as a graph constant): convert with "
                "model.to_int8('int_mm') before compile(), or compile(backend='aot_eager')"
            )
        self.unet.compile(**kwargs)

    def to_int8(self, backend: Backend | str = Backend.INT8) -> dict[str, str]:
        """Run quantized layers on integer kernels from now on (in place); returns each layer's execution mode.

        ``backend="int8"`` (alias ``"auto"``) picks the fastest exact path the model's device has: on the CPU
        `cq.runtime.dispatch.cpu_int8_path` (OpenVINO wherever it is installed, else PyTorch's oneDNN kernels where
        they are exact (VNNI / AMX); `BackendUnavailableError` naming ``pip install 'cq[openvino]'`` where neither
        applies); ``torch._int_mm`` on CUDA.
        ``"openvino"``, ``"onednn"``, ``"int_mm"``: that path by name (`cq.quant.int8.to_int8`). The model computes
        the same function (up to float summation order and rounding-boundary codes) and saves the same file;
        ``cq.load(path, int8=True)`` converts a loaded one. `execution` (and ``cq report``) says what runs each
        layer.
        """
        from .quant import int8

        backend = Backend.parse(backend)
        if backend is Backend.INT8 and int8.module_device(self.unet).type == "cpu":
            from .runtime.dispatch import cpu_int8_path

            backend, _ = cpu_int8_path(self.unet)
        if backend is Backend.OPENVINO:
            return self.to_runtime("openvino")
        self.execution = int8.to_int8(self.unet, backend)
        return self.execution

    def to_runtime(self, backend: str = "openvino", *, threads: int | None = None, fallback: bool = False) -> dict:
        """Run the UNet's calls on an inference runtime from now on (in place); returns each layer's execution mode.

        ``backend="openvino"``: the model is lowered to ONNX with its own scales (`cq.runtime.lower`: a full and a
        shallow graph) and run by OpenVINO's int8 kernels (`cq.runtime.OpenVINOUNet`); the schedule, the step and
        the cache correction stay here. Layers whose weights the CPU's int8 kernels cannot sum exactly (8-bit
        codes without VNNI, asymmetric weights) keep float weights: `cq.runtime.cpu`. ``fallback``: lower
        activation quantizers ONNX cannot express as float operators instead of refusing them
        (`ExportUnsupportedError`). Saving is unchanged: the .cq file holds the fitted tables, not the graphs.
        """
        if backend != "openvino":
            raise ConfigError(f"to_runtime: backend must be 'openvino', got {backend!r}")
        from .runtime.openvino import OpenVINOUNet

        point = self.cache.point if self.cache is not None else self.unet.default_cache_point()
        self.runtime = OpenVINOUNet(self.unet, point, self.num_steps, threads=threads, fallback=fallback)
        self.execution = self.runtime.describe()
        return self.execution

    def extra_repr(self) -> str:
        mask = self.refresh_mask()
        return f"num_steps={self.num_steps}, refreshes={sum(mask)}, cacher={self.cacher!r}"


def fitted_steps(settings: SamplerSettings | None, t: Tensor | int | float) -> tuple[int, ...]:
    """`CompressedUNet.steps_of` for any fitted `SamplerSettings` (the `cq.diffusers` adapter uses it too)."""
    if settings is None:
        raise TimestepNotFittedError(
            "this model records no fitted timesteps (fitted on a trace built by hand, or loaded from a file "
            "written before sampler settings were saved): pass step= (the model-call index)"
        )
    value = _single_timestep(t)
    steps = settings.calls_at(int(value)) if float(value).is_integer() else ()
    if not steps:
        raise TimestepNotFittedError(
            f"timestep {value:g} is not one this model was fitted for: {settings.describe()}. Sample it with "
            "those settings (`model.sampler_settings.call_kwargs()`; a diffusers scheduler: the same "
            "num_inference_steps and timestep_spacing), or refit it on a trace of the sampler / scheduler you "
            "use (cq.trace with its steps and spacing, or cq.diffusers.compress on the pipeline)"
        )
    return steps


def _single_timestep(t: Tensor | int | float) -> float:
    """The one timestep of a call (a number, or a tensor with all entries equal); `InputValueError` otherwise."""
    if isinstance(t, bool) or not isinstance(t, Tensor | int | float):
        raise InputValueError(f"t must be a tensor or a number, got {type(t).__name__}")
    values = torch.as_tensor(t).flatten()
    if values.numel() == 0 or not bool((values == values[0]).all()):
        raise InputValueError(
            f"a call without step= must have one timestep for the whole batch, got {values.tolist()[:8]}; "
            "pass step= for a batch of mixed timesteps"
        )
    return float(values[0])

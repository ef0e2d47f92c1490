"""`report`: what a compressed model does per step, what it costs, and how far it is from full precision.

Per step: refresh or cached, MACs of the call, and -- given the full-precision UNet and a trace -- the SQNR of
the model's output against full precision on the trace's inputs. That SQNR is **teacher-forced**: every step
sees the recorded full-precision x_t (errors never accumulate) and the trace is the calibration data, so it
says where along the trajectory the error enters, not how good the samples are; it is labelled so everywhere.
How good the samples are is `cq.evaluate` (held-out seeds, end to end, per sample): pass its result as
``evaluation=`` and the report prints it beside. Summary: MAC speedup, parameter storage, which layers are
quantized. `Report.plot` draws the schedule and the per-step error (matplotlib, the ``plot`` extra).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..core.unet import check_cacheable
from ..errors import ConfigError
from ..metrics.error import sqnr
from ..metrics.evaluate import check_reference
from ..metrics.macs import unet_macs
from ..quant.layer_table import float_classes, integer_classes, kind_of
from ..quant.quantizer import quantized_modules


if TYPE_CHECKING:
    from ..calib.trace import Trace
    from ..compressed import CompressedUNet
    from ..fit.recipe import Recipe
    from ..metrics.evaluate import Evaluation

__all__ = ["Report", "StepReport", "report", "print_table", "tensor_bytes"]


@dataclass(frozen=True)
class StepReport:
    step: int
    refresh: bool
    macs: int
    sqnr_db: float | None = None


@dataclass
class Report:
    """Per-step and summary figures of a `CompressedUNet` (see `report`)."""

    steps: list[StepReport]
    full_macs: int
    model_bytes: int
    reference_bytes: int | None
    quantized_layers: int
    float_layers: int
    recipe: str = ""
    integer_layers: int = 0  # of the quantized layers, those running on integer kernels
    notes: list[str] = field(default_factory=list)
    evaluation: Evaluation | None = None  # end-to-end quality on held-out seeds (`cq.evaluate`)

    @property
    def total_macs(self) -> int:
        return sum(s.macs for s in self.steps)

    @property
    def mac_speedup(self) -> float:
        return self.full_macs * len(self.steps) / self.total_macs

    @property
    def refreshes(self) -> int:
        return sum(s.refresh for s in self.steps)

    @property
    def mean_sqnr_db(self) -> float | None:
        values = [s.sqnr_db for s in self.steps if s.sqnr_db is not None and math.isfinite(s.sqnr_db)]
        return sum(values) / len(values) if values else None

    def summary(self) -> str:
        lines = [
            f"recipe: {self.recipe}" if self.recipe else "recipe: none",
            f"steps: {len(self.steps)}, refreshes: {self.refreshes}, cached: {len(self.steps) - self.refreshes}",
            f"MACs per run: {self.total_macs / 1e9:.3f} G vs {self.full_macs * len(self.steps) / 1e9:.3f} G full "
            f"-> {self.mac_speedup:.2f}x fewer",
            f"layers: {self.quantized_layers} quantized ({self.integer_layers} on integer kernels, "
            f"{self.quantized_layers - self.integer_layers} fake-quant), {self.float_layers} float",
            f"parameter storage: {self.model_bytes / 2**20:.2f} MiB"
            + (
                f" vs {self.reference_bytes / 2**20:.2f} MiB full precision "
                f"({self.reference_bytes / self.model_bytes:.2f}x smaller)"
                if self.reference_bytes
                else ""
            ),
        ]
        if self.mean_sqnr_db is not None:
            lines.append(
                f"teacher-forced per-step SQNR vs full precision (each step fed the full-precision x_t of the "
                f"trace; errors do not accumulate): mean {self.mean_sqnr_db:.1f} dB, "
                f"min {min(s.sqnr_db for s in self.steps if s.sqnr_db is not None):.1f} dB"
            )
        if self.evaluation is not None:
            lines.append(self.evaluation.summary())
        return "\n".join(lines + self.notes)

    def table(self) -> str:
        rows = ["| step | call | GMACs | teacher-forced SQNR dB |", "|---|---|---|---|"]
        for s in self.steps:
            db = "-" if s.sqnr_db is None else f"{s.sqnr_db:.1f}"
            rows.append(f"| {s.step} | {'full' if s.refresh else 'cached'} | {s.macs / 1e9:.4f} | {db} |")
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.summary()

    def plot(self, path: str | Path) -> Path:
        """Schedule (refresh steps) and per-step SQNR as a PNG."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise ConfigError("plotting needs matplotlib: pip install 'cq[plot]'") from None
        from ..io import atomic_path

        fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 4.5), sharex=True, gridspec_kw={"height_ratios": [1, 2]})
        idx = [s.step for s in self.steps]
        top.bar(
            idx,
            [1 if s.refresh else 0.35 for s in self.steps],
            color=["tab:blue" if s.refresh else "tab:orange" for s in self.steps],
            width=0.9,
        )
        top.set_yticks([])
        top.set_title(
            f"{self.refreshes} full calls (blue), {len(idx) - self.refreshes} cached (orange); "
            f"{self.mac_speedup:.2f}x fewer MACs"
        )
        if any(s.sqnr_db is not None for s in self.steps):
            bottom.plot(idx, [s.sqnr_db if s.sqnr_db is not None else float("nan") for s in self.steps], "k.-")
            bottom.set_ylabel("SQNR vs FP (dB)")
            bottom.set_title("teacher-forced per-step SQNR (full-precision inputs; errors do not accumulate)")
        bottom.set_xlabel("sampling step (0 = noisiest)")
        fig.tight_layout()
        path = Path(path)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
        plt.close(fig)
        return path


@torch.no_grad()
def report(
    model: CompressedUNet,
    *,
    reference: nn.Module | None = None,
    trace: Trace | None = None,
    samples: int = 8,
    evaluation: Evaluation | None = None,
) -> Report:
    """Measure ``model``; with ``reference`` (the full-precision UNet) and ``trace``, also the teacher-forced
    per-step SQNR; ``evaluation`` (from `cq.evaluate`) adds the end-to-end held-out quality."""
    point = model.cache.point if model.cache is not None else None
    device = next(model.unet.parameters()).device  # traces live on the CPU; the model may not
    if trace is not None and trace.cond is not None:
        cond = trace.cond[0, :1].to(device)
    else:  # conditional UNets need a conditioning input of the right kind to be run at all
        cond = check_cacheable(model.unet, "cq.report").example_cond(1)
    macs = unet_macs(model.unet, cond=cond, points=[point] if point else [])
    mask = model.refresh_mask()
    sqnrs: list[float | None] = [None] * model.num_steps
    if reference is not None:
        check_reference(model, reference)
    if reference is not None and trace is not None:
        if trace.steps != model.num_steps:
            raise ConfigError(f"trace has {trace.steps} steps, the model {model.num_steps}")
        n = min(samples, trace.x.shape[1])
        for step in range(model.num_steps):
            x = trace.x[step, :n].float().to(device)
            t = trace.timesteps[step].expand(n).to(device)
            cond = trace.cond[step, :n].to(device) if trace.cond is not None else None
            sqnrs[step] = sqnr(model(x, t, cond, step=step), reference(x, t, cond))
        if model.cache is not None:
            model.cache.clear()
    steps = [StepReport(i, r, macs["full"] if r else macs[point], sqnrs[i]) for i, r in enumerate(mask)]
    integer = _integer_modules(model.unet)
    q = quantized_modules(model.unet) | integer
    floats = float_classes()  # float layers with a weight (convs, linears; not attention matmuls)
    float_layers = sum(isinstance(m, floats) and kind_of(m).weighted for m in model.unet.modules())
    return Report(
        steps=steps,
        full_macs=macs["full"],
        model_bytes=tensor_bytes(model),
        reference_bytes=tensor_bytes(reference) if reference is not None else None,
        quantized_layers=len(q),
        integer_layers=len(integer)
        if model.runtime is None
        else sum(m.startswith("int8") for m in model.execution.values()),
        float_layers=float_layers,
        recipe=_describe(model.recipe),
        notes=_execution_notes(model.execution) if q else [],
        evaluation=evaluation,
    )


def _integer_modules(unet: nn.Module) -> dict[str, str]:
    integer = integer_classes()
    return {n: type(m).__name__ for n, m in unet.named_modules() if isinstance(m, integer)}


def _execution_notes(execution: dict[str, str]) -> list[str]:
    """Which quantized layers run integer kernels (per kernel) and why the others do not."""
    if not execution:
        return ["note: quantized layers run as fake quantization (float kernels) until converted to int8"]
    return [f"execution: {n} layer(s) {mode}" for mode, n in sorted(Counter(execution.values()).items())]


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of a module's state dict as stored (integer codes count 1 byte, scales 4)."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]], title: str = "") -> None:
    """Print a Markdown table (floats to 3 significant digits), with an optional ``## title``."""
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    if title:
        print(f"\n## {title}\n")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.3e}"
    return str(value)


def _describe(recipe: Recipe | None) -> str:
    if recipe is None:
        return ""
    parts = [part.label() for part in (recipe.cacher, recipe.quantizer) if part is not None]
    parts += [type(c).__name__ for c in recipe.correctors]
    return " + ".join(parts) or "none"

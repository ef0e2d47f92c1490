"""Training of the embedded demo model: a small DDPM UNet on scikit-learn's 8x8 digits, upsampled to 16x16.

Why digits: they ship inside scikit-learn (no download), 1797 images are enough for a 1.6M-parameter model to
learn on two CPU cores in minutes, and whether a sample "looks like a digit" is easy to judge by eye. The
objective is the simple epsilon-prediction loss of Ho et al. (2020), Eq. 14, with an EMA of the weights.

``x0_weight_cap > 1`` weights each sample's epsilon loss by ``clamp((1 - abar) / abar, 1, cap)`` (normalized to
mean 1 over t): the "truncated SNR" weighting of Salimans & Ho (2022, Sec. 4), ``max(SNR, 1)`` on the x0 error,
capped. The plain epsilon loss hardly sees errors at the noisiest steps, where DDIM's x0 prediction multiplies
them by ``sqrt((1 - abar) / abar)`` (~150 at t = 980): the first demo model (5,000 steps, plain loss) predicted
|x0| > 15 on 6% of fresh noises at the first step and 23 of 1,024 unclipped samples diverged. ``init`` starts
from earlier weights (a fine-tune); the output's metadata keeps the configs of every stage.

Training is resumable and deterministic: a state file (model, EMA, optimizer, data and dropout RNG states) is
written atomically every ``save_every`` steps; re-running the same command continues from it and produces the
same weights as an uninterrupted run. The result is the EMA weights as safetensors with the recipe in its
metadata.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import CheckpointFormatError, ConfigError
from ..io import atomic_torch_save, save_safetensors
from .checkpoint import read_pickle
from .loading import build
from .presets import get_preset


__all__ = ["TrainConfig", "digits_dataset", "train", "x0_loss_weights"]


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    preset: str = "demo"
    steps: int = 5000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 200
    ema_decay: float = 0.999
    seed: int = 0
    save_every: int = 500
    x0_weight_cap: float = 1.0
    init: str = ""  # safetensors weights to start from ("": the preset's random init)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "save_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"TrainConfig.{name} must be an int >= 1, got {value!r}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ConfigError(f"TrainConfig.warmup must be an int >= 0, got {self.warmup!r}")
        if not (isinstance(self.lr, int | float) and 0 < self.lr < float("inf")):
            raise ConfigError(f"TrainConfig.lr must be a finite number > 0, got {self.lr!r}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"TrainConfig.ema_decay must be in [0, 1), got {self.ema_decay!r}")
        if not (isinstance(self.x0_weight_cap, int | float) and 1 <= self.x0_weight_cap < float("inf")):
            raise ConfigError(f"TrainConfig.x0_weight_cap must be a finite number >= 1, got {self.x0_weight_cap!r}")
        if self.init and not Path(self.init).is_file():
            raise ConfigError(f"TrainConfig.init: no such weights file {self.init!r}")


def digits_dataset(resolution: int = 16) -> Tensor:
    """``[1797, 1, resolution, resolution]`` digits in [-1, 1] (bilinear upsampling of the 8x8 originals)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ConfigError("training the demo model needs scikit-learn: pip install 'cq[train]'") from None
    images = torch.from_numpy(load_digits().images).float()[:, None] / 16.0
    images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return images.clamp(0, 1) * 2 - 1


def train(config: TrainConfig, out: str | Path, *, progress: bool = True) -> Path:
    """Train (or resume training) and write ``out`` (EMA weights, safetensors). Returns ``out``."""
    out = Path(out)
    state_file = out.with_suffix(".state.pt")
    preset = get_preset(config.preset)
    data = digits_dataset(preset.config.resolution)
    if preset.config.in_channels != 1:
        raise ConfigError(f"preset {config.preset!r} takes {preset.config.in_channels} channels; digits have 1")

    torch.manual_seed(config.seed)
    model = build(preset, seed=config.seed).train()
    history: list = []
    if config.init:
        history = _load_init(model, config.init)
    ema = build(preset, seed=config.seed).eval()
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(config.seed)
    abar = preset.noise.alphas_cumprod().float()
    weight = x0_loss_weights(abar, config.x0_weight_cap)
    torch.manual_seed(config.seed)  # dropout draws from the global generator; its state is saved with the rest
    step, elapsed = 0, 0.0
    if state_file.exists():
        try:
            saved = read_pickle(state_file)
        except CheckpointFormatError as e:
            raise CheckpointFormatError(
                f"cannot resume from {state_file}: {e}. Delete it to train from the start (cq writes it atomically: "
                "it was damaged after it was written)"
            ) from None
        keys = {"config", "model", "ema", "opt", "rng", "torch_rng", "step", "elapsed"}
        if not isinstance(saved, dict) or not keys <= set(saved):
            raise CheckpointFormatError(
                f"{state_file} is not a cq training state (needs {sorted(keys)}); delete it to start over"
            )
        if saved["config"] != asdict(config):
            raise ConfigError(f"{state_file} was written by another training config; delete it to start over")
        model.load_state_dict(saved["model"])
        ema.load_state_dict(saved["ema"])
        opt.load_state_dict(saved["opt"])
        gen.set_state(saved["rng"])
        torch.set_rng_state(saved["torch_rng"])
        step, elapsed = saved["step"], saved["elapsed"]

    bar = tqdm(total=config.steps, initial=step, desc="train", disable=not progress)
    t_start = time.perf_counter() - elapsed
    while step < config.steps:
        idx = torch.randint(0, len(data), (config.batch_size,), generator=gen)
        x0 = data[idx]
        t = torch.randint(0, preset.noise.num_timesteps, (config.batch_size,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        a = abar[t].view(-1, 1, 1, 1)
        per_sample = (model(a.sqrt() * x0 + (1 - a).sqrt() * eps, t) - eps).square().flatten(1).mean(1)
        loss = (per_sample * weight[t]).mean()
        for group in opt.param_groups:
            group["lr"] = config.lr * _lr_factor(step, config)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
                pe.lerp_(pm, 1 - config.ema_decay)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % config.save_every == 0 or step == config.steps:
            atomic_torch_save(
                {
                    "config": asdict(config),
                    "model": model.state_dict(),
                    "ema": ema.state_dict(),
                    "opt": opt.state_dict(),
                    "rng": gen.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    "step": step,
                    "elapsed": time.perf_counter() - t_start,
                },
                state_file,
            )
    bar.close()
    meta = {
        "cq_train_config": json.dumps(asdict(config)),
        "train_seconds": f"{time.perf_counter() - t_start:.0f}",
        "dataset": "sklearn digits 8x8 -> bilinear 16x16, [-1, 1]",
        "cq_train_history": json.dumps(history),
    }
    save_safetensors(ema.state_dict(), out, metadata=meta)
    return out


def x0_loss_weights(alphas_cumprod: Tensor, cap: float) -> Tensor:
    """Per-timestep weights of the epsilon loss, ``clamp((1 - abar) / abar, 1, cap)`` normalized to mean 1 (module
    docstring); all ones for ``cap = 1``."""
    weight = ((1 - alphas_cumprod) / alphas_cumprod).clamp(1.0, float(cap))
    return weight / weight.mean()


def _load_init(model: torch.nn.Module, path: str) -> list:
    """Load ``path`` into ``model`` (`read_state_dict` + `load_weights`: any checkpoint format cq reads, every key
    and shape checked); returns the training configs of the stages that produced it (oldest first; a cq-trained
    safetensors file records them in its metadata, other files have none)."""
    from .checkpoint import read_state_dict
    from .loading import load_weights

    load_weights(model, read_state_dict(path))
    if not path.endswith(".safetensors"):
        return []
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    try:
        history = json.loads(meta.get("cq_train_history", "[]"))
        stage = json.loads(meta["cq_train_config"]) if "cq_train_config" in meta else None
    except json.JSONDecodeError:
        history, stage = [], None
    return [*history, stage] if stage is not None else list(history)


def _lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10%."""
    if step < config.warmup:
        return (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

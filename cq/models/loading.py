"""`build` and `load`: cq UNets from presets, checkpoint files and diffusers folders."""

from __future__ import annotations

import dataclasses
import json
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor, nn

from ..core.unet import CacheableUNet
from ..errors import CheckpointFormatError, CheckpointKeyMismatchError, CheckpointValueError, ConfigError, CqError
from ..sampling.noise import NoiseSchedule, Prediction
from .checkpoint import read_diffusers_folder, read_state_dict
from .convert import ddpm_config_from_diffusers
from .convert_ldm import ldm_unet_config_from_diffusers
from .ddpm import DDPMConfig
from .families import MODEL_FAMILIES, KeyFormat
from .openai_unet import LDMUNetConfig
from .presets import PRESETS, Preset, get_preset


__all__ = [
    "build",
    "load",
    "load_weights",
    "embedded_weights_path",
    "describe_model",
    "build_from_description",
    "diffusers_noise_schedule",
]


def build(preset: str | Preset, *, seed: int | None = None) -> CacheableUNet:
    """A randomly initialised UNet of ``preset`` (for benchmarks and tests), in eval mode, constructed with the
    preset's ``noise_schedule`` and the ``preset`` itself (what the samplers and the CLI read)."""
    p = get_preset(preset) if isinstance(preset, str) else preset
    return _construct(p, p.noise, seed)


def load(
    preset_or_path: str | Path,
    *,
    path: str | Path | None = None,
    format: KeyFormat = "auto",
    ema: bool = True,
    trust_pickle: bool = False,
    prediction: Prediction | None = None,
    check_finite: bool = True,
) -> CacheableUNet:
    """Load a cq UNet with real weights, in eval mode.

    Args:
        preset_or_path: a preset name (``"demo"``, ``"cifar10"``, ``"sd-v1"``, ``"ldm-cin256-v2"``...) or a diffusers
            model folder (``UNet2DModel`` / ``UNet2DConditionModel``, or a pipeline folder with ``unet/``).
        path: weights for the preset: ``.ckpt/.pt/.pth/.bin`` (``weights_only=True``; Lightning ``.ckpt`` files of
            LDM/SD included), ``.safetensors`` or a diffusers folder. Not needed for presets with embedded
            weights (``"demo"``). For latent-diffusion presets a full CompVis checkpoint is fine: only its
            ``model.diffusion_model.*`` part is read (`cq.models.LatentDiffusion` loads the rest).
        format: key layout of the file; ``"auto"`` detects original vs diffusers keys.
        ema: prefer EMA weights when the file holds both (LDM: the ``model_ema.*`` copy).
        trust_pickle: allow pickles with arbitrary objects (only for files you trust).
        prediction: what the network outputs, overriding the preset's (``"eps"`` or ``"v"``: a CompVis yaml's
            ``parameterization``); the samplers read it from ``unet.noise_schedule.prediction``.
        check_finite: refuse weights holding NaN or inf (`CheckpointValueError`); False loads them as they are.

    Raises:
        CheckpointKeyMismatchError: the weights do not fit the preset (lists missing/unexpected/mis-shaped keys).
        CheckpointFormatError, UnsafeCheckpointError: unreadable or unsafe files.
        CheckpointValueError: integer tensors for float parameters, or NaN / inf weights (``check_finite``).

    Example:
        >>> unet = cq.models.load("demo")
        >>> unet = cq.models.load("cifar10", path="ema_diffusion_cifar10_model/model-790000.ckpt")
        >>> unet = cq.models.load("sd-v1", path="v1-5-pruned-emaonly.safetensors")
        >>> unet = cq.models.load("ldm-cin256-v2", path="models/ldm/cin256-v2/model.ckpt")
    """
    key = str(preset_or_path)
    if key in PRESETS:
        p = get_preset(key)
        if prediction is not None:
            p = dataclasses.replace(p, noise=dataclasses.replace(p.noise, prediction=prediction))
        if path is None:
            if p.embedded is None:
                raise ConfigError(
                    f"preset {key!r} ships no weights; pass path=... to its checkpoint ({p.source}), "
                    f"or use cq.models.build({key!r}) for a randomly initialised model"
                )
            path = embedded_weights_path(p)
        unet = build(p)
        state = read_state_dict(path, ema=ema, trust_pickle=trust_pickle)
        load_weights(unet, state, format=format, check_finite=check_finite, ema=ema)
        return unet
    folder = Path(preset_or_path)
    if folder.is_dir():
        if prediction is not None:
            raise ConfigError(
                "prediction= overrides a preset's; a diffusers folder states its own (scheduler_config.json "
                "prediction_type)"
            )
        return _load_diffusers_folder(folder, check_finite=check_finite)
    if folder.exists():
        raise ConfigError(
            f"{folder} is a weights file; say which architecture it is: "
            f"cq.models.load(<preset>, path={str(folder)!r}) "
            f"with a preset from {sorted(PRESETS)}"
        )
    raise ConfigError(f"{key!r} is neither a preset ({sorted(PRESETS)}) nor an existing diffusers folder")


def _load_diffusers_folder(folder: Path, *, check_finite: bool = True) -> CacheableUNet:
    """A cq UNet built from a diffusers folder's own ``config.json`` (a malformed one is a CheckpointFormatError)."""
    state, config = read_diffusers_folder(folder)
    try:
        return _build_from_diffusers(folder, state, config, check_finite=check_finite)
    except CqError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointFormatError(
            f"{folder}: config.json does not describe a supported UNet ({type(e).__name__}: {e})"
        ) from None


def unet_config_from_diffusers(config: dict) -> tuple[DDPMConfig | LDMUNetConfig, dict]:
    """The cq UNet config of a diffusers UNet config (``UNet2DConditionModel`` or ``UNet2DModel``: LDM family
    or DDPM) and its preset's default sampling."""
    if _is_ldm_diffusers_config(config):
        return ldm_unet_config_from_diffusers(config), {"steps": 50, "spacing": "ldm", "eta": 0.0}
    return ddpm_config_from_diffusers(config), {}


def _build_from_diffusers(
    folder: Path, state: dict[str, Tensor], config: dict, *, check_finite: bool = True
) -> CacheableUNet:
    unet_config, sampling = unet_config_from_diffusers(config)
    preset = Preset(
        name=folder.name,
        config=unet_config,
        noise=diffusers_noise_schedule(folder) or NoiseSchedule(),
        sampling=sampling,
        source=str(folder),
    )
    unet = build(preset)
    load_weights(unet, state, format="diffusers", check_finite=check_finite)
    return unet


def load_weights(
    unet: nn.Module,
    state: dict[str, Tensor],
    *,
    format: KeyFormat = "auto",
    check_finite: bool = True,
    ema: bool = False,
) -> None:
    """Copy ``state`` into ``unet`` after key conversion (the ``convert_keys`` hook of the UNet's model family,
    `cq.models.register_family`; other modules take their own keys); every key and shape must match exactly, a
    float parameter takes only a float tensor, and (``check_finite``) no weight may be NaN or inf
    (`CheckpointValueError`, naming the tensors). ``ema``: from a full checkpoint holding both, the EMA weights
    (LDM's ``model_ema.*``)."""
    if format not in ("auto", "original", "diffusers"):
        raise ConfigError(f"format must be 'auto', 'original' or 'diffusers', got {format!r}")
    family = MODEL_FAMILIES.find(unet)
    if family is not None:
        state = family.checkpoint_state(state, unet.config, format=format, ema=ema)
    expected = unet.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        (k, tuple(state[k].shape), tuple(expected[k].shape))
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k].shape
    ]
    if missing or unexpected or shapes:
        preset = unet.preset if isinstance(unet, CacheableUNet) else None
        hint = f"model preset: {preset.name if preset is not None else '?'}; is this the right preset?"
        raise CheckpointKeyMismatchError(missing=missing, unexpected=unexpected, shape_mismatch=shapes, hint=hint)
    _check_weight_values(state, expected, check_finite=check_finite)
    with torch.no_grad():
        for k, v in state.items():
            expected[k].copy_(v)


def _check_weight_values(state: dict[str, Tensor], expected: dict[str, Tensor], *, check_finite: bool = True) -> None:
    """Refuse what ``copy_`` would take silently: an integer / bool tensor for a float parameter (cast to float
    without a word) and, with ``check_finite``, NaN or inf in a float tensor (every output would be NaN)."""
    wrong = [
        f"{k} ({state[k].dtype})"
        for k in sorted(state)
        if expected[k].is_floating_point() and not state[k].is_floating_point()
    ]
    if wrong:
        raise CheckpointValueError(
            f"{len(wrong)} float parameter(s) hold non-float tensors in the checkpoint: {', '.join(wrong[:20])}. "
            "The file was written wrongly (weights must be float); re-export it with float weights"
        )
    if check_finite:
        bad = [k for k in sorted(state) if state[k].is_floating_point() and not bool(torch.isfinite(state[k]).all())]
        if bad:
            raise CheckpointValueError(
                f"{len(bad)} tensor(s) of the checkpoint hold NaN or inf: {', '.join(bad[:20])}; the model would "
                "output NaN. Use another checkpoint (a diverged training run writes these), or pass "
                "check_finite=False if the values are there on purpose"
            )


def describe_model(unet: nn.Module) -> dict:
    """JSON-able description from which `build_from_description` rebuilds the architecture (random weights); the
    UNet's class must be a registered model family (`cq.models.register_family`)."""
    family = MODEL_FAMILIES.of_unet(unet)
    config = getattr(unet, "config", None)
    if type(config) is not family.config:
        raise ConfigError(
            f"{type(unet).__qualname__}.config is a {type(config).__qualname__}; model family {family.name!r} is "
            f"built from a {family.config.__qualname__}: keep the config the UNet was constructed with as self.config"
        )
    noise, preset = unet.noise_schedule, unet.preset
    return {
        "family": family.name,
        "config": dataclasses.asdict(config),
        "noise": dataclasses.asdict(noise) if noise is not None else None,
        # only a registered preset is named (equal, not identical: quantizing copies the UNet); a rebuilt
        # "custom" one describes itself as it was saved
        "preset": preset.name if preset is not None and PRESETS.get(preset.name) == preset else None,
    }


def build_from_description(desc: dict, *, device: str | torch.device | None = None) -> CacheableUNet:
    """Inverse of `describe_model` (weights are random, or unallocated with ``device="meta"``: load a state dict
    into the result)."""
    family = MODEL_FAMILIES.get(desc.get("family"))
    config = dict(desc["config"])
    config = family.config(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})
    noise = NoiseSchedule(**desc["noise"]) if desc.get("noise") else None
    name = desc.get("preset")
    preset = PRESETS[name] if name in PRESETS and PRESETS[name].config == config else None
    p = preset or Preset(name=name or "custom", config=config, noise=noise or NoiseSchedule())
    with torch.device(device or "cpu"):
        return _construct(p, noise if noise is not None else p.noise, seed=0)


def embedded_weights_path(preset: Preset) -> Path:
    ref = resources.files("cq.models") / "weights" / (preset.embedded or "")
    path = Path(str(ref))
    if not path.exists():
        raise CheckpointFormatError(
            f"embedded weights {path} are missing from this installation; reinstall cq or run `cq train` to make them"
        )
    return path


def _construct(preset: Preset, noise: NoiseSchedule, seed: int | None) -> CacheableUNet:
    """The UNet of ``preset.config``, initialised under ``seed`` (None: the global RNG), in eval mode."""
    kind = MODEL_FAMILIES.of_config(preset.config).unet
    if seed is None:
        return kind(preset.config, noise_schedule=noise, preset=preset).eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return kind(preset.config, noise_schedule=noise, preset=preset).eval()


def _is_ldm_diffusers_config(config: dict) -> bool:
    """A diffusers UNet config of the LDM family: ``UNet2DConditionModel``, or a ``UNet2DModel`` with LDM's
    cos-first timestep embedding (DDPM configs set ``flip_sin_to_cos: false``)."""
    if config.get("_class_name") == "UNet2DConditionModel" or "cross_attention_dim" in config:
        return True
    return config.get("flip_sin_to_cos", True) is True and config.get("freq_shift", 0) == 0


def diffusers_noise_schedule(folder: Path) -> NoiseSchedule | None:
    """Noise schedule from a diffusers ``scheduler_config.json`` next to the model (in the model folder, its
    ``scheduler/`` or its pipeline's ``scheduler/``), or None when there is none."""
    for candidate in (
        folder / "scheduler" / "scheduler_config.json",
        folder.parent / "scheduler" / "scheduler_config.json",
        folder / "scheduler_config.json",
    ):
        if candidate.exists():
            return _noise_from_scheduler_config(candidate)
    return None


def _noise_from_scheduler_config(path: Path) -> NoiseSchedule:
    """The betas of a diffusers ``scheduler_config.json``; anything malformed is a CheckpointFormatError."""
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointFormatError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise CheckpointFormatError(f"{path} must be a JSON object (a diffusers scheduler config)")
    fields = {
        "kind": cfg.get("beta_schedule", "linear"),
        "beta_start": cfg.get("beta_start", 1e-4),
        "beta_end": cfg.get("beta_end", 0.02),
        "num_timesteps": cfg.get("num_train_timesteps", 1000),
    }
    numbers = ("beta_start", "beta_end", "num_timesteps")
    if any(isinstance(fields[k], bool) or not isinstance(fields[k], int | float) for k in numbers):
        raise CheckpointFormatError(f"{path}: beta_start, beta_end and num_train_timesteps must be numbers")
    if not isinstance(fields["num_timesteps"], int):
        raise CheckpointFormatError(f"{path}: num_train_timesteps must be an integer")
    prediction = cfg.get("prediction_type", "epsilon")
    predictions = {"epsilon": "eps", "v_prediction": "v"}
    if prediction not in predictions:
        raise ConfigError(
            f"{path}: prediction_type={prediction!r}; cq samples models that predict the noise ('epsilon') or the "
            "velocity ('v_prediction')"
        )
    fields["prediction"] = predictions[prediction]
    try:
        return NoiseSchedule(**fields)
    except ConfigError as e:
        raise CheckpointFormatError(f"{path}: {e}") from None

"""Self-contained UNets whose attribute names reproduce the original checkpoints, plus loaders and presets."""

from .ddpm import DDPMConfig, DDPMUNet
from .loading import build, load, load_weights
from .presets import PRESETS, Preset, get_preset


__all__ = ["DDPMConfig", "DDPMUNet", "build", "load", "load_weights", "PRESETS", "Preset", "get_preset"]

"""Key maps between original checkpoint layouts (cq's attribute names) and diffusers layouts.

DDPM (ermongroup/ddim, pesser/pytorch_diffusion) <-> diffusers ``UNet2DModel`` (google/ddpm-* format), after
ecosystem.md §A2. The maps are exact inverses; 1x1-conv attention weights ``[C, C, 1, 1]`` become linear ``[C, C]``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from torch import Tensor

from ..errors import CheckpointFormatError, CheckpointKeyMismatchError, ConfigError
from .ddpm_config import DDPMConfig


__all__ = ["ddpm_to_diffusers", "ddpm_from_diffusers", "ddpm_config_from_diffusers", "looks_like_diffusers_ddpm"]

_RESNET = {
    "norm1": "norm1",
    "conv1": "conv1",
    "temb_proj": "time_emb_proj",
    "norm2": "norm2",
    "conv2": "conv2",
    "nin_shortcut": "conv_shortcut",
}
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_FIXED = {
    "temb.dense.0": "time_embedding.linear_1",
    "temb.dense.1": "time_embedding.linear_2",
    "conv_in": "conv_in",
    "norm_out": "conv_norm_out",
    "conv_out": "conv_out",
    "mid.block_1": "mid_block.resnets.0",
    "mid.attn_1": "mid_block.attentions.0",
    "mid.block_2": "mid_block.resnets.1",
}


def _module_to_diffusers(module: str, num_levels: int) -> str:
    if module in _FIXED:
        return _FIXED[module]
    for orig, diff in _FIXED.items():
        if module.startswith(orig + "."):
            rest = module[len(orig) + 1 :]
            table = _ATTN if "attn" in orig else _RESNET
            return f"{diff}.{table[rest]}"
    m = re.fullmatch(r"(down|up)\.(\d+)\.(block|attn)\.(\d+)\.(\w+)", module)
    if m:
        side, level, kind, idx, leaf = m.groups()
        level = int(level) if side == "down" else num_levels - 1 - int(level)
        if kind == "block":
            return f"{side}_blocks.{level}.resnets.{idx}.{_RESNET[leaf]}"
        return f"{side}_blocks.{level}.attentions.{idx}.{_ATTN[leaf]}"
    resampler = resampler_to_diffusers(module, num_levels)
    if resampler is None:
        raise KeyError(module)
    return resampler


def resampler_to_diffusers(module: str, num_levels: int) -> str | None:
    """``down.{l}.downsample.conv`` / ``up.{l}.upsample.conv`` (the original layout of the DDPM UNet and of the
    first-stage autoencoders) -> diffusers' ``down_blocks.{l}.downsamplers.0.conv`` /
    ``up_blocks.{num_levels - 1 - l}.upsamplers.0.conv`` (diffusers counts up blocks from the deepest); None for
    any other module."""
    m = re.fullmatch(r"down\.(\d+)\.downsample\.conv", module)
    if m:
        return f"down_blocks.{m.group(1)}.downsamplers.0.conv"
    m = re.fullmatch(r"up\.(\d+)\.upsample\.conv", module)
    if m:
        return f"up_blocks.{num_levels - 1 - int(m.group(1))}.upsamplers.0.conv"
    return None


def _split(key: str) -> tuple[str, str]:
    module, _, leaf = key.rpartition(".")
    return module, leaf


def _is_attn_proj(orig_module: str) -> bool:
    return bool(re.search(r"(attn\.\d+|attn_1)\.(q|k|v|proj_out)$", orig_module))


def ddpm_to_diffusers(state: dict[str, Tensor], num_levels: int) -> dict[str, Tensor]:
    """Original DDPM keys -> diffusers ``UNet2DModel`` keys (``num_levels = len(ch_mult)``)."""
    return rename_to_diffusers(state, lambda module: _module_to_diffusers(module, num_levels), _is_attn_proj, "DDPM")


def rename_to_diffusers(
    state: dict[str, Tensor], to_diffusers: Callable[[str], str], is_attn_proj: Callable[[str], bool], model: str
) -> dict[str, Tensor]:
    """Rename original keys through ``to_diffusers`` (original module -> diffusers module, `KeyError` for an
    unknown one); attention projections lose their 1x1-conv shape. An original key with no diffusers name raises
    `CheckpointFormatError` (``model``: what the keys are of, for the message). Inverse: `rename_from_diffusers`."""
    out = {}
    for key, value in state.items():
        module, leaf = _split(key)
        try:
            new = to_diffusers(module)
        except KeyError:
            raise CheckpointFormatError(f"no diffusers name for original {model} key {key!r}") from None
        if is_attn_proj(module) and leaf == "weight":
            value = value.reshape(value.shape[0], value.shape[1])
        out[f"{new}.{leaf}"] = value
    return out


def ddpm_from_diffusers(state: dict[str, Tensor], num_levels: int, num_res_blocks: int = 2) -> dict[str, Tensor]:
    """diffusers ``UNet2DModel`` keys -> original DDPM keys (inverse of `ddpm_to_diffusers`)."""
    inverse = {}
    for module in _original_modules(num_levels, num_res_blocks):
        inverse[_module_to_diffusers(module, num_levels)] = module
    return rename_from_diffusers(
        state, inverse, _is_attn_proj, f"a DDPM UNet with {num_levels} levels and {num_res_blocks} res blocks"
    )


def rename_from_diffusers(
    state: dict[str, Tensor], inverse: dict[str, str], is_attn_proj: Callable[[str], bool], model: str
) -> dict[str, Tensor]:
    """Rename diffusers keys through ``inverse`` (diffusers module -> original module); attention projections
    get their 1x1-conv shape back. Keys with no original name raise `CheckpointKeyMismatchError`."""
    out, unknown = {}, []
    for key, value in state.items():
        module, leaf = _split(key)
        if module not in inverse:
            unknown.append(key)
            continue
        orig = inverse[module]
        if is_attn_proj(orig) and leaf == "weight" and value.ndim == 2:
            value = value[:, :, None, None]
        out[f"{orig}.{leaf}"] = value
    if unknown:
        raise CheckpointKeyMismatchError(
            unexpected=sorted(unknown),
            hint=f"these diffusers keys have no place in {model}; is this the right preset?",
        )
    return out


def _original_modules(num_levels: int, num_res_blocks: int) -> list[str]:
    """Every leaf module name an original DDPM UNet of this depth could have (superset is fine)."""
    names = list(_FIXED)
    names += [f"{mid}.{leaf}" for mid in ("mid.block_1", "mid.block_2") for leaf in _RESNET]
    names += [f"mid.attn_1.{leaf}" for leaf in _ATTN]
    for level in range(num_levels):
        for side, blocks in (("down", num_res_blocks), ("up", num_res_blocks + 1)):
            for b in range(blocks):
                names += [f"{side}.{level}.block.{b}.{leaf}" for leaf in _RESNET]
                names += [f"{side}.{level}.attn.{b}.{leaf}" for leaf in _ATTN]
        names += [f"down.{level}.downsample.conv", f"up.{level}.upsample.conv"]
    return names


def looks_like_diffusers_ddpm(state: dict[str, Any]) -> bool:
    return any(k.startswith("time_embedding.") for k in state) and any(k.startswith("down_blocks.") for k in state)


def block_out_channels(config: dict[str, Any], default: list[int] | None = None) -> list[int]:
    """A diffusers config's ``block_out_channels``: a non-empty list of positive ints, each a multiple of the first
    (the channel multipliers of cq's configs); anything else is a `ConfigError` naming the value."""
    value = config.get("block_out_channels", default)
    if (
        not isinstance(value, list | tuple)
        or not value
        or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in value)
    ):
        raise ConfigError(
            f"diffusers config: block_out_channels must be a list of positive ints (one width per level, e.g. "
            f"[320, 640, 1280, 1280]), got {value!r}; fix config.json"
        )
    channels = list(value)
    if any(c % channels[0] for c in channels):
        raise ConfigError(f"block_out_channels {channels} are not multiples of the first ({channels[0]})")
    return channels


def ddpm_config_from_diffusers(config: dict[str, Any]) -> DDPMConfig:
    """`DDPMConfig` of a diffusers ``UNet2DModel`` config.json in the google/ddpm-* layout.

    Raises `ConfigError` when the config uses options the DDPM UNet does not have (another time embedding, a
    symmetric downsample pad, scale-shift norm...), naming the option.
    """
    expected = {
        "flip_sin_to_cos": False,
        "freq_shift": 1,
        "downsample_padding": 0,
        "act_fn": "silu",
        "resnet_time_scale_shift": "default",
        "time_embedding_type": "positional",
        "mid_block_scale_factor": 1,
        "class_embed_type": None,
        "num_class_embeds": None,
    }
    for key, want in expected.items():
        if key in config and config[key] != want:
            raise ConfigError(f"diffusers config has {key}={config[key]!r}; the DDPM UNet needs {want!r}")
    channels = block_out_channels(config)
    ch = channels[0]
    size = config["sample_size"]
    size = size[0] if isinstance(size, list | tuple) else size
    attn = tuple(size // 2**i for i, kind in enumerate(config["down_block_types"]) if kind.startswith("Attn"))
    up_attn = tuple(
        size // 2**i for i, kind in enumerate(reversed(config["up_block_types"])) if kind.startswith("Attn")
    )
    if attn != up_attn:
        raise ConfigError(f"attention levels differ between down ({attn}) and up ({up_attn}) blocks")
    head_dim = config.get("attention_head_dim", 8)  # UNet2DModel's default: 8 channels per head
    attn_channels = [
        c
        for i, (c, kind) in enumerate(zip(channels, config["down_block_types"], strict=False))
        if kind.startswith("Attn")
    ]
    if head_dim is not None and any(head_dim != c for c in attn_channels):
        raise ConfigError(
            f"diffusers config has attention_head_dim={head_dim}: multi-head attention over {attn_channels} channels; "
            "the DDPM UNet has one head (google/ddpm-* configs set attention_head_dim null)"
        )
    return DDPMConfig(
        resolution=size,
        in_channels=config.get("in_channels", 3),
        out_ch=config.get("out_channels", 3),
        ch=ch,
        ch_mult=tuple(c // ch for c in channels),
        num_res_blocks=config.get("layers_per_block", 2),
        attn_resolutions=attn,
        dropout=config.get("dropout", 0.0),
        norm_eps=config.get("norm_eps", 1e-6),
        norm_groups=config.get("norm_num_groups", 32),
    )

"""Key maps for latent diffusion: the LDM/SD UNet, the first-stage autoencoders and the CLIP text encoder.

Original layouts are cq's attribute names (the CompVis ``.ckpt`` keys without their ``model.diffusion_model.``,
``first_stage_model.`` and ``cond_stage_model.`` prefixes). diffusers layouts, after ecosystem.md §A3-A4:

* UNet <-> ``UNet2DConditionModel`` (SpatialTransformer models; the transformer's inner names are identical) or
  ``UNet2DModel`` (legacy ``AttentionBlock`` models: the qkv Conv1d ``[3C, C, 1]`` laid out ``[head][q|k|v][dh]``
  is split into ``to_q/to_k/to_v`` Linear ``[C, C]``); ``input_blocks.i`` (i >= 1) -> ``down_blocks[(i-1)//(R+1)]``,
  ``output_blocks.i`` -> ``up_blocks[i//(R+1)]`` with R = ``num_res_blocks``.
* Autoencoders <-> ``AutoencoderKL`` / ``VQModel``: ``down.l.block.b`` -> ``down_blocks.l.resnets.b``,
  ``up.l`` -> ``up_blocks.(L-1-l)``, ``mid.block_k`` -> ``mid_block.resnets.(k-1)``, 1x1-conv attention squeezed to
  Linear, ``nin_shortcut`` -> ``conv_shortcut``, ``norm_out`` -> ``conv_norm_out``.
* CLIP: transformers 4 (``text_model.*``), transformers 5 (flat) and SD (``cond_stage_model.transformer.*``) keys
  all normalise to the flat layout cq uses.
* OpenCLIP text towers (SD 2's ``cond_stage_model.model.*``, SDXL's ``conditioner.embedders.1.model.*``):
  ``transformer.resblocks.i`` -> ``encoder.layers.i`` with the fused ``attn.in_proj_{weight,bias}`` split into
  ``q/k/v_proj``, ``ln_1/ln_2`` -> ``layer_norm1/2``, ``mlp.c_fc/c_proj`` -> ``mlp.fc1/fc2``, ``ln_final`` ->
  ``final_layer_norm``, ``positional_embedding`` -> ``embeddings.position_embedding.weight`` and the
  ``text_projection`` matrix (``x @ P``) -> ``text_projection.weight = P^T``.

Every map is an exact inverse of its partner; unknown keys raise instead of being dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ..errors import CheckpointFormatError, CheckpointKeyMismatchError, ConfigError
from .convert import block_out_channels
from .convert_stages import (
    LDM_COND_STAGE_PREFIX,
    LDM_EMA_PREFIX,
    LDM_FIRST_STAGE_PREFIX,
    LDM_UNET_PREFIX,
    SDXL_CONDITIONER_PREFIX,
    autoencoder_from_diffusers,
    autoencoder_to_diffusers,
    clip_text_state,
    is_open_clip_text,
    open_clip_num_layers,
    open_clip_text_state,
)
from .ldm_config import LDMUNetConfig


__all__ = [
    "LDM_UNET_PREFIX",
    "LDM_FIRST_STAGE_PREFIX",
    "LDM_COND_STAGE_PREFIX",
    "split_ldm_checkpoint",
    "ldm_unet_state",
    "ldm_unet_to_diffusers",
    "ldm_unet_from_diffusers",
    "ldm_unet_config_from_diffusers",
    "looks_like_diffusers_ldm_unet",
    "autoencoder_to_diffusers",
    "autoencoder_from_diffusers",
    "clip_text_state",
    "is_open_clip_text",
    "open_clip_text_state",
    "open_clip_num_layers",
    "SDXL_CONDITIONER_PREFIX",
]

# ----------------------------------------------------------------------------------------------------------------
# CompVis checkpoints: the parts of one Lightning state dict


def split_ldm_checkpoint(state: dict[str, Tensor], *, ema: bool = True) -> dict[str, Any]:
    """Split a full LDM/SD state dict into its parts (an sgm SDXL file's ``conditioner.*`` keys are its cond stage).

    Returns ``{"unet": {...}, "first_stage": {...}, "cond_stage": {...}, "scale_factor": float | None,
    "ema_used": bool}`` with the prefixes removed. With ``ema=True`` and a ``model_ema.*`` copy of every UNet
    parameter (LitEma stores them with the dots removed: ``model_ema.diffusion_modelinput_blocks00weight``), the
    UNet weights are the EMA ones, as LDM samples them. The schedule buffers (``betas``, ``alphas_cumprod``...)
    are not needed: cq recomputes the schedule from the preset.
    """
    parts: dict[str, dict[str, Tensor]] = {"unet": {}, "first_stage": {}, "cond_stage": {}}
    for key, value in state.items():
        for prefix, part in (
            (LDM_UNET_PREFIX, "unet"),
            (LDM_FIRST_STAGE_PREFIX, "first_stage"),
            (LDM_COND_STAGE_PREFIX, "cond_stage"),
            (SDXL_CONDITIONER_PREFIX, "cond_stage"),
        ):
            if key.startswith(prefix):
                parts[part][key[len(prefix) :]] = value
    ema_used = False
    if ema and parts["unet"]:
        flat = {k: LDM_EMA_PREFIX + ("diffusion_model." + k).replace(".", "") for k in parts["unet"]}
        if all(v in state for v in flat.values()):
            parts["unet"] = {k: state[v] for k, v in flat.items()}
            ema_used = True
    scale = state.get("scale_factor")
    return {
        **parts,
        "scale_factor": float(scale) if isinstance(scale, Tensor) and scale.numel() == 1 else None,
        "ema_used": ema_used,
    }


def ldm_unet_state(state: dict[str, Tensor], *, ema: bool = True) -> dict[str, Tensor]:
    """The UNet weights of a full LDM/SD checkpoint (``model.diffusion_model.*``, EMA preferred), or ``state``
    itself when it is already a bare UNet state dict (original or diffusers keys)."""
    if any(k.startswith(LDM_UNET_PREFIX) for k in state):
        return split_ldm_checkpoint(state, ema=ema)["unet"]
    return state


# ----------------------------------------------------------------------------------------------------------------
# UNet


_RES = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_FIXED_UNET = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
    "label_emb": "class_embedding",
}


_ADM_UNET = {"label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2"}


@dataclass(frozen=True)
class _Block:
    """One leaf block of the UNet in both layouts; ``kind`` says how its inner names map."""

    original: str
    diffusers: str
    kind: str  # "fixed" | "res" | "st" | "attn" | "op" | "conv"
    channels: int = 0
    heads: int = 0


def _unet_blocks(config: LDMUNetConfig) -> list[_Block]:
    """Every block of an LDM UNet of this config, with its diffusers name (mirrors `LDMUNet.__init__`)."""
    c = config
    blocks = [_Block(o, d, "fixed") for o, d in _FIXED_UNET.items()]
    if c.adm_in_channels is not None:  # SDXL's vector conditioning (sgm label_emb.0 <-> add_embedding)
        blocks += [_Block(o, d, "fixed") for o, d in _ADM_UNET.items()]
    attn_kind = "st" if c.use_spatial_transformer else "attn"
    ch, ds, i = c.model_channels, 1, 1
    for level, mult in enumerate(c.channel_mult):
        for r in range(c.num_res_blocks):
            ch = mult * c.model_channels
            blocks.append(_Block(f"input_blocks.{i}.0", f"down_blocks.{level}.resnets.{r}", "res"))
            if ds in c.attention_resolutions:
                heads = c.heads(ch, level=level)
                blocks.append(
                    _Block(f"input_blocks.{i}.1", f"down_blocks.{level}.attentions.{r}", attn_kind, ch, heads)
                )
            i += 1
        if level != len(c.channel_mult) - 1:
            kind = "res" if c.resblock_updown else "op"
            blocks.append(_Block(f"input_blocks.{i}.0", f"down_blocks.{level}.downsamplers.0", kind))
            i += 1
            ds *= 2
    blocks.append(_Block("middle_block.0", "mid_block.resnets.0", "res"))
    mid_heads = c.heads(ch, level=len(c.channel_mult) - 1)
    blocks.append(_Block("middle_block.1", "mid_block.attentions.0", attn_kind, ch, mid_heads))
    blocks.append(_Block("middle_block.2", "mid_block.resnets.1", "res"))
    j = 0
    for up_level, (level, mult) in enumerate(list(enumerate(c.channel_mult))[::-1]):
        for r in range(c.num_res_blocks + 1):
            ch = mult * c.model_channels
            blocks.append(_Block(f"output_blocks.{j}.0", f"up_blocks.{up_level}.resnets.{r}", "res"))
            sub = 1
            if ds in c.attention_resolutions:
                heads = c.heads(ch, level=level, upsample=True)
                blocks.append(
                    _Block(f"output_blocks.{j}.1", f"up_blocks.{up_level}.attentions.{r}", attn_kind, ch, heads)
                )
                sub = 2
            if level and r == c.num_res_blocks:
                kind = "res" if c.resblock_updown else "conv"
                blocks.append(_Block(f"output_blocks.{j}.{sub}", f"up_blocks.{up_level}.upsamplers.0", kind))
                ds //= 2
            j += 1
    return blocks


def _inner_to_diffusers(block: _Block, rest: str) -> str:
    if block.kind == "res":
        module, _, leaf = rest.rpartition(".")
        if module not in _RES:
            raise KeyError(rest)
        return f"{_RES[module]}.{leaf}"
    if block.kind == "op":
        if not rest.startswith("op."):
            raise KeyError(rest)
        return "conv." + rest[len("op.") :]
    return rest  # "fixed" (leaf only), "st" (identical names), "conv"


def _inner_from_diffusers(block: _Block, rest: str) -> str:
    if block.kind == "res":
        module, _, leaf = rest.rpartition(".")
        inverse = {v: k for k, v in _RES.items()}
        if module not in inverse:
            raise KeyError(rest)
        return f"{inverse[module]}.{leaf}"
    if block.kind == "op":
        if not rest.startswith("conv."):
            raise KeyError(rest)
        return "op." + rest[len("conv.") :]
    return rest


def _attn_to_diffusers(block: _Block, sub: dict[str, Tensor]) -> dict[str, Tensor]:
    """Legacy ``AttentionBlock`` -> diffusers ``Attention``: split the ``[head][q|k|v][dh]`` qkv per head."""
    c, h = block.channels, block.heads
    out = {}
    for leaf in ("weight", "bias"):
        if f"norm.{leaf}" in sub:
            out[f"group_norm.{leaf}"] = sub[f"norm.{leaf}"]
        if f"qkv.{leaf}" in sub:
            qkv = sub[f"qkv.{leaf}"].reshape(h, 3, c // h, *(c,) * (leaf == "weight"))  # (H, 3, dh[, C])
            for n, name in enumerate(("to_q", "to_k", "to_v")):
                out[f"{name}.{leaf}"] = qkv[:, n].reshape(c, *(c,) * (leaf == "weight")).clone()
        if f"proj_out.{leaf}" in sub:
            value = sub[f"proj_out.{leaf}"]
            out[f"to_out.0.{leaf}"] = value.reshape(c, c) if leaf == "weight" else value
    unknown = set(sub) - {f"{m}.{leaf}" for m in ("norm", "qkv", "proj_out") for leaf in ("weight", "bias")}
    if unknown:
        raise KeyError(sorted(unknown)[0])
    return out


def _attn_from_diffusers(block: _Block, sub: dict[str, Tensor]) -> dict[str, Tensor]:
    c, h = block.channels, block.heads
    out = {}
    names = ("to_q", "to_k", "to_v")
    for leaf in ("weight", "bias"):
        if f"group_norm.{leaf}" in sub:
            out[f"norm.{leaf}"] = sub[f"group_norm.{leaf}"]
        present = [f"{n}.{leaf}" in sub for n in names]
        if any(present):
            if not all(present):
                missing = [f"{n}.{leaf}" for n, p in zip(names, present, strict=True) if not p]
                raise KeyError(missing[0])
            parts = [sub[f"{n}.{leaf}"].reshape(h, 1, c // h, *(c,) * (leaf == "weight")) for n in names]
            qkv = parts[0].new_empty((h, 3, c // h, *(c,) * (leaf == "weight")))
            for n, part in enumerate(parts):
                qkv[:, n : n + 1] = part
            out[f"qkv.{leaf}"] = qkv.reshape(3 * c, *(c, 1) * (leaf == "weight"))
        if f"to_out.0.{leaf}" in sub:
            value = sub[f"to_out.0.{leaf}"]
            out[f"proj_out.{leaf}"] = value.reshape(c, c, 1) if leaf == "weight" else value
    unknown = set(sub) - {f"{m}.{leaf}" for m in ("group_norm", *names, "to_out.0") for leaf in ("weight", "bias")}
    if unknown:
        raise KeyError(sorted(unknown)[0])
    return out


def _group(state: dict[str, Tensor], prefixes: dict[str, _Block]) -> tuple[dict[str, dict[str, Tensor]], list[str]]:
    """Keys grouped by the longest known block prefix; keys under no block are returned separately."""
    grouped: dict[str, dict[str, Tensor]] = {}
    unknown = []
    for key, value in state.items():
        parts = key.split(".")
        for n in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:n])
            if prefix in prefixes:
                grouped.setdefault(prefix, {})[".".join(parts[n:])] = value
                break
        else:
            unknown.append(key)
    return grouped, unknown


def ldm_unet_to_diffusers(state: dict[str, Tensor], config: LDMUNetConfig) -> dict[str, Tensor]:
    """Original LDM UNet keys -> diffusers keys (``UNet2DConditionModel`` for SpatialTransformer models,
    ``UNet2DModel`` for legacy-attention models)."""
    blocks = {b.original: b for b in _unet_blocks(config)}
    grouped, unknown = _group(state, blocks)
    if unknown:
        raise CheckpointFormatError(f"no diffusers name for original LDM UNet key(s) {sorted(unknown)[:10]}")
    out = {}
    for prefix, sub in grouped.items():
        block = blocks[prefix]
        try:
            if block.kind == "attn":
                converted = _attn_to_diffusers(block, sub)
            else:
                converted = {_inner_to_diffusers(block, rest): v for rest, v in sub.items()}
        except KeyError as e:
            raise CheckpointFormatError(f"no diffusers name for original LDM UNet key {prefix}.{e.args[0]}") from None
        out.update({f"{block.diffusers}.{k}": v for k, v in converted.items()})
    return out


def ldm_unet_from_diffusers(state: dict[str, Tensor], config: LDMUNetConfig) -> dict[str, Tensor]:
    """diffusers ``UNet2DConditionModel`` / ``UNet2DModel`` keys -> original LDM keys (inverse of the above)."""
    blocks = {b.diffusers: b for b in _unet_blocks(config)}
    grouped, unknown = _group(state, blocks)
    out = {}
    for prefix, sub in grouped.items():
        block = blocks[prefix]
        try:
            if block.kind == "attn":
                converted = _attn_from_diffusers(block, sub)
            else:
                converted = {_inner_from_diffusers(block, rest): v for rest, v in sub.items()}
        except KeyError as e:
            unknown.append(f"{prefix}.{e.args[0]}")
            continue
        out.update({f"{block.original}.{k}": v for k, v in converted.items()})
    if unknown:
        raise CheckpointKeyMismatchError(
            unexpected=sorted(unknown),
            hint="these diffusers keys have no place in an LDM UNet of this configuration; is this the right preset?",
        )
    return out


def looks_like_diffusers_ldm_unet(state: dict[str, Any]) -> bool:
    return any(k.startswith("time_embedding.") for k in state) and any(k.startswith("down_blocks.") for k in state)


def ldm_unet_config_from_diffusers(config: dict[str, Any]) -> LDMUNetConfig:
    """`LDMUNetConfig` of a diffusers ``UNet2DConditionModel`` (SD-like) or ``UNet2DModel`` (LDM-LSUN-like)
    config.json.

    Raises `ConfigError` naming the option when the config uses something the LDM UNet does not have.
    """
    conditional = config.get("_class_name") == "UNet2DConditionModel" or "cross_attention_dim" in config
    expected: dict[str, Any] = {
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "downsample_padding": 1,
        "act_fn": "silu",
        "norm_eps": 1e-5,
        "time_embedding_type": "positional",
        "mid_block_scale_factor": 1,
        "center_input_sample": False,
        "class_embed_type": None,
    }
    if conditional:
        expected |= {
            "resnet_time_scale_shift": "default",
            "only_cross_attention": False,
            "dual_cross_attention": False,
            "encoder_hid_dim": None,
            "time_cond_proj_dim": None,
            "conv_in_kernel": 3,
            "conv_out_kernel": 3,
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "attention_type": "default",
            "class_embeddings_concat": False,
            "resnet_skip_time_act": False,
            "resnet_out_scale_factor": 1.0,
            "timestep_post_act": None,
            "time_embedding_dim": None,
            "cross_attention_norm": None,
        }
    else:
        expected |= {"add_attention": True, "mid_block_type": "UNetMidBlock2D"}
    for key, want in expected.items():
        if key in config and config[key] != want:
            raise ConfigError(f"diffusers config has {key}={config[key]!r}; the LDM UNet needs {want!r}")
    down_types, up_types = list(config["down_block_types"]), list(config["up_block_types"])
    known_down, known_up = (
        ({"DownBlock2D", "CrossAttnDownBlock2D"}, {"UpBlock2D", "CrossAttnUpBlock2D"})
        if conditional
        else (
            {"DownBlock2D", "AttnDownBlock2D", "ResnetDownsampleBlock2D"},
            {"UpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D"},
        )
    )
    unknown = sorted({*down_types} - known_down) + sorted({*up_types} - known_up)
    if unknown:
        raise ConfigError(f"diffusers block types {unknown} have no LDM UNet counterpart")
    channels = block_out_channels(config)
    mc = channels[0]
    down_attn = [kind.startswith(("CrossAttn", "Attn")) for kind in config["down_block_types"]]
    up_attn = [kind.startswith(("CrossAttn", "Attn")) for kind in reversed(config["up_block_types"])]
    if down_attn != up_attn:
        raise ConfigError(f"attention levels differ between down ({down_attn}) and up ({up_attn[::-1]}) blocks")
    size = config.get("sample_size", 64)
    size = size[0] if isinstance(size, list | tuple) else size
    layers = config.get("layers_per_block", 2)
    if not isinstance(layers, int):
        raise ConfigError(f"layers_per_block={layers!r}: the LDM UNet has one count for every level")
    kwargs: dict[str, Any] = dict(
        image_size=size,
        in_channels=config.get("in_channels", 4),
        out_channels=config.get("out_channels", 4),
        model_channels=mc,
        num_res_blocks=layers,
        attention_resolutions=tuple(2**i for i, a in enumerate(down_attn) if a),
        channel_mult=tuple(ch // mc for ch in channels),
        dropout=config.get("dropout", 0.0),
        num_classes=config.get("num_class_embeds"),
        norm_groups=config.get("norm_num_groups", 32),
    )
    if conditional:
        levels = len(channels)
        addition = config.get("addition_embed_type")
        if addition not in (None, "text_time"):
            raise ConfigError(f"diffusers config has addition_embed_type={addition!r}; cq builds None or 'text_time'")
        if addition == "text_time":
            adm = config.get("projection_class_embeddings_input_dim")
            if not isinstance(adm, int) or isinstance(adm, bool) or adm < 1:
                raise ConfigError(
                    "addition_embed_type='text_time' needs projection_class_embeddings_input_dim (the width of "
                    f"the pooled text embedding + the time-id embeddings), got {adm!r}"
                )
            kwargs["adm_in_channels"] = adm
        context = config.get("cross_attention_dim", 1280)
        if isinstance(context, list | tuple):
            raise ConfigError(f"cross_attention_dim={context}: the LDM UNet uses one context width")
        if config.get("reverse_transformer_layers_per_block") is not None:
            raise ConfigError(
                "reverse_transformer_layers_per_block is set: the LDM UNet's decoder mirrors its encoder"
            )
        if config.get("mid_block_only_cross_attention"):
            raise ConfigError("mid_block_only_cross_attention=True has no LDM UNet counterpart")
        kwargs |= dict(
            use_spatial_transformer=True,
            context_dim=context,
            transformer_depth=_per_level(
                config.get("transformer_layers_per_block", 1), levels, "transformer_layers_per_block"
            ),
            use_linear_in_transformer=bool(config.get("use_linear_projection", False)),
            upcast_attention=bool(config.get("upcast_attention", False)),
            **_heads_from_diffusers(config, channels, down_attn),
        )
    else:
        scale_shift = config.get("resnet_time_scale_shift", "default")
        if scale_shift not in ("default", "scale_shift"):
            raise ConfigError(f"diffusers config has resnet_time_scale_shift={scale_shift!r}")
        attn_groups = config.get("attn_norm_num_groups")
        if scale_shift == "scale_shift" and any(down_attn) and attn_groups is None:
            raise ConfigError(
                "diffusers config has resnet_time_scale_shift='scale_shift' without attn_norm_num_groups: "
                "its mid-block attention then has no GroupNorm, unlike the LDM UNet"
            )
        updown = {config.get("downsample_type", "conv"), config.get("upsample_type", "conv")}
        if len(updown) != 1 or not updown <= {"conv", "resnet"}:
            raise ConfigError(f"downsample_type/upsample_type {sorted(updown)}: need both 'conv' or both 'resnet'")
        # the blocks that resample (all but the last of each list); diffusers' plain Down/UpBlock2D always
        # resample with a conv, its Resnet*sampleBlock2D always with a ResBlock
        resampling = down_types[:-1] + up_types[:-1]
        if updown == {"resnet"}:
            conv = [k for k in resampling if k in ("DownBlock2D", "UpBlock2D")]
            if conv:
                raise ConfigError(
                    f"{conv} resample with a conv although downsample_type/upsample_type='resnet'; LDM's "
                    "resblock_updown resamples with ResBlocks everywhere (use ResnetDownsampleBlock2D / "
                    "ResnetUpsampleBlock2D there)"
                )
        elif any(k.startswith("Resnet") for k in down_types + up_types):
            raise ConfigError("Resnet*sampleBlock2D blocks need downsample_type/upsample_type='resnet'")
        head_dim = config.get("attention_head_dim", 8)  # UNet2DModel: channels per head (None: one head)
        heads = dict(num_heads=1) if head_dim is None else dict(num_head_channels=head_dim)
        kwargs |= dict(
            use_scale_shift_norm=scale_shift == "scale_shift", resblock_updown=updown == {"resnet"}, **heads
        )
    return LDMUNetConfig(**kwargs)


def _per_level(value: Any, levels: int, name: str) -> int | tuple[int, ...]:
    """One int, or a tuple with one int per level (a uniform list collapses to its int)."""
    if isinstance(value, bool) or not isinstance(value, int | list | tuple):
        raise ConfigError(f"{name}={value!r}: expected an int or one int per block")
    if isinstance(value, int):
        return value
    if len(value) != levels or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ConfigError(f"{name}={value!r}: expected one int per block ({levels}); nested lists are not supported")
    return value[0] if len(set(value)) == 1 else tuple(value)


def _heads_from_diffusers(config: dict[str, Any], channels: list[int], attended: list[bool]) -> dict[str, Any]:
    """Heads of a ``UNet2DConditionModel`` config as LDM arguments.

    ``UNet2DConditionModel.__init__`` sets ``num_attention_heads = num_attention_heads or attention_head_dim``: its
    ``attention_head_dim`` is, despite the name, the number of heads per block (SD 2's ``[5, 10, 20, 20]`` on
    channels ``[320, 640, 1280, 1280]`` are 64-channel heads); ``Transformer2DModel(heads, out_channels // heads)``.
    One count everywhere gives ``num_heads``; counts with one head width over the attended levels (the middle block
    is the last level) give ``num_head_channels`` (CompVis SD 2 / SDXL); anything else a per-level ``num_heads``.
    """
    levels = len(channels)
    heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
    heads = _per_level(heads, levels, "attention_head_dim")
    per_level = heads if isinstance(heads, tuple) else (heads,) * levels
    used = sorted({i for i, a in enumerate(attended) if a} | {levels - 1})
    if len({per_level[i] for i in used}) == 1:
        return dict(num_heads=per_level[used[0]])
    widths = {channels[i] / per_level[i] for i in used}
    if len(widths) == 1 and all(channels[i] % per_level[i] == 0 for i in used):
        return dict(num_head_channels=channels[used[0]] // per_level[used[0]])
    return dict(num_heads=per_level)

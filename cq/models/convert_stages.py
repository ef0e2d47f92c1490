"""Key maps for the stages of latent diffusion besides the UNet (the layouts are described in
`cq.models.convert_ldm`): the prefixes each stage's keys carry in a CompVis checkpoint, the first-stage
autoencoders <-> diffusers ``AutoencoderKL`` / ``VQModel``, the CLIP text encoder's transformers and SD layouts, and
OpenCLIP text towers (SD 2, SDXL).

Every map is an exact inverse of its partner; unknown keys raise instead of being dropped.
"""

from __future__ import annotations

import re
from typing import Any

from torch import Tensor

from ..errors import CheckpointFormatError
from .convert import _ATTN, _FIXED, _RESNET, rename_from_diffusers, rename_to_diffusers, resampler_to_diffusers


LDM_UNET_PREFIX = "model.diffusion_model."
LDM_FIRST_STAGE_PREFIX = "first_stage_model."
LDM_COND_STAGE_PREFIX = "cond_stage_model."
LDM_EMA_PREFIX = "model_ema."
SDXL_CONDITIONER_PREFIX = "conditioner."  # sgm (SDXL) single-file checkpoints: GeneralConditioner's embedders


# ----------------------------------------------------------------------------------------------------------------
# Autoencoders (ldm.modules.diffusionmodules.model Encoder/Decoder <-> diffusers AutoencoderKL / VQModel)

# the Encoder / Decoder are built of the DDPM UNet's blocks (the same ldm file) and diffusers names them alike: the
# DDPM maps without the time embedding
_AE_RES = {k: v for k, v in _RESNET.items() if k != "temb_proj"}
_AE_ATTN = _ATTN
_AE_FIXED = {k: v for k, v in _FIXED.items() if not k.startswith("temb.")}
_AE_TOP = ("quant_conv", "post_quant_conv", "quantize.embedding")


def _ae_module_to_diffusers(module: str, num_levels: int) -> str:
    if module in _AE_TOP:
        return module
    side, _, rest = module.partition(".")
    if side not in ("encoder", "decoder"):
        raise KeyError(module)
    for orig, diff in _AE_FIXED.items():
        if rest == orig:
            return f"{side}.{diff}"
        if rest.startswith(orig + "."):
            leaf = rest[len(orig) + 1 :]
            table = _AE_ATTN if orig == "mid.attn_1" else _AE_RES
            return f"{side}.{diff}.{table[leaf]}"
    m = re.fullmatch(r"(down|up)\.(\d+)\.block\.(\d+)\.(\w+)", rest)
    if m:
        kind, level, idx, leaf = m.groups()
        level = int(level) if kind == "down" else num_levels - 1 - int(level)
        return f"{side}.{kind}_blocks.{level}.resnets.{idx}.{_AE_RES[leaf]}"
    resampler = resampler_to_diffusers(rest, num_levels)
    if resampler is None:
        raise KeyError(module)
    return f"{side}.{resampler}"


def _is_ae_attn_proj(module: str) -> bool:
    return bool(re.search(r"mid\.attn_1\.(q|k|v|proj_out)$", module))


def autoencoder_to_diffusers(state: dict[str, Tensor], num_levels: int) -> dict[str, Tensor]:
    """Original first-stage keys (``encoder.*``, ``decoder.*``, ``quant_conv``, ``post_quant_conv``,
    ``quantize.embedding``) -> diffusers ``AutoencoderKL`` / ``VQModel`` keys (``num_levels = len(ch_mult)``).

    Level attention (``down.l.attn``) has no diffusers counterpart and is refused.
    """
    return rename_to_diffusers(
        state, lambda module: _ae_module_to_diffusers(module, num_levels), _is_ae_attn_proj, "autoencoder"
    )


def autoencoder_from_diffusers(state: dict[str, Tensor], num_levels: int, num_res_blocks: int) -> dict[str, Tensor]:
    """diffusers ``AutoencoderKL`` / ``VQModel`` keys -> original keys (inverse of `autoencoder_to_diffusers`)."""
    inverse = {}
    for side in ("encoder", "decoder"):
        names = list(_AE_FIXED)
        names += [f"mid.block_{k}.{leaf}" for k in (1, 2) for leaf in _AE_RES]
        names += [f"mid.attn_1.{leaf}" for leaf in _AE_ATTN]
        for level in range(num_levels):
            names += [f"down.{level}.block.{b}.{leaf}" for b in range(num_res_blocks) for leaf in _AE_RES]
            names += [f"up.{level}.block.{b}.{leaf}" for b in range(num_res_blocks + 1) for leaf in _AE_RES]
            names += [f"down.{level}.downsample.conv", f"up.{level}.upsample.conv"]
        for name in names:
            module = f"{side}.{name}"
            inverse[_ae_module_to_diffusers(module, num_levels)] = module
    inverse |= {m: m for m in _AE_TOP}
    return rename_from_diffusers(
        state, inverse, _is_ae_attn_proj, f"an autoencoder with {num_levels} levels and {num_res_blocks} res blocks"
    )


# ----------------------------------------------------------------------------------------------------------------
# CLIP text encoder

_CLIP_PREFIXES = ("cond_stage_model.transformer.", "transformer.", "text_model.")


def clip_text_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """CLIP text-encoder keys of SD (``cond_stage_model.transformer.text_model.*``), transformers 4
    (``text_model.*``) or transformers 5 (flat) -> the flat layout of `cq.models.clip_text.CLIPTextModel`.

    ``embeddings.position_ids`` (a buffer some files carry) is dropped; keys of other SD parts are ignored.
    """
    if any(k.startswith(LDM_UNET_PREFIX) or k.startswith(LDM_FIRST_STAGE_PREFIX) for k in state):
        state = {k: v for k, v in state.items() if k.startswith(LDM_COND_STAGE_PREFIX)}
    out = {}
    for key, value in state.items():
        for prefix in _CLIP_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        if key == "embeddings.position_ids":
            continue
        out[key] = value
    return out


# ----------------------------------------------------------------------------------------------------------------
# OpenCLIP text towers (SD 2, SDXL's second encoder)

_OPEN_CLIP_PREFIXES = ("cond_stage_model.model.", "conditioner.embedders.1.model.", "model.")
_OPEN_CLIP_BLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")
_OPEN_CLIP_BLOCK_NAMES = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_OPEN_CLIP_UNUSED = ("logit_scale", "attn_mask")  # CLIP's loss temperature; the causal mask (rebuilt per call)


def _strip_open_clip_prefix(key: str) -> str:
    for prefix in _OPEN_CLIP_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def is_open_clip_text(state: dict[str, Any]) -> bool:
    """Whether ``state`` holds an OpenCLIP text tower (``transformer.resblocks.*`` keys, any known prefix)."""
    return any(_OPEN_CLIP_BLOCK.match(_strip_open_clip_prefix(k)) for k in state)


def open_clip_num_layers(state: dict[str, Any]) -> int:
    """The number of residual blocks of an OpenCLIP text tower's state dict."""
    blocks = {int(m.group(1)) for k in state if (m := _OPEN_CLIP_BLOCK.match(_strip_open_clip_prefix(k)))}
    return max(blocks) + 1 if blocks else 0


def open_clip_text_state(
    state: dict[str, Tensor], *, num_layers: int | None = None, with_projection: bool = False
) -> dict[str, Tensor]:
    """An OpenCLIP text tower (open_clip ``CLIP`` text attributes; SD 2 ``FrozenOpenCLIPEmbedder``, SDXL
    ``FrozenOpenCLIPEmbedder2``) -> the flat layout of `cq.models.clip_text.CLIPTextModel` (module docstring).

    Args:
        num_layers: keep blocks ``0 .. num_layers - 1`` only. SD 2 cross-attends to the *penultimate* block's
            output after ``ln_final`` (``layer="penultimate"``), which is a `CLIPTextModel` of one block fewer --
            the conversion diffusers' SD 2 text encoders were made with. None: every block.
        with_projection: keep ``text_projection`` (as ``text_projection.weight``, transposed) for a
            `CLIPTextModelWithProjection` (SDXL's pooled ``text_embeds``); else it is dropped with ``logit_scale``.

    Keys of other parts (``visual.*``) and unknown keys are kept as they are, so loading reports them.
    """
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        key = _strip_open_clip_prefix(key)
        if key in _OPEN_CLIP_UNUSED or (key == "text_projection" and not with_projection):
            continue
        if key == "token_embedding.weight":
            out["embeddings.token_embedding.weight"] = value
        elif key == "positional_embedding":
            out["embeddings.position_embedding.weight"] = value
        elif key.startswith("ln_final."):
            out["final_layer_norm." + key[len("ln_final.") :]] = value
        elif key == "text_projection":
            out["text_projection.weight"] = value.t().contiguous()  # open_clip computes x @ P
        elif m := _OPEN_CLIP_BLOCK.match(key):
            index, rest = int(m.group(1)), m.group(2)
            if num_layers is not None and index >= num_layers:
                continue
            base = f"encoder.layers.{index}."
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                if value.shape[0] % 3:
                    raise CheckpointFormatError(
                        f"{key}: a fused q/k/v projection has 3 x width rows, got {value.shape}"
                    )
                kind = rest.rsplit("_", 1)[1]
                for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0), strict=True):
                    out[f"{base}self_attn.{name}.{kind}"] = part.contiguous()
                continue
            module, _, param = rest.rpartition(".")
            out[base + _OPEN_CLIP_BLOCK_NAMES.get(module, module) + "." + param] = value
        else:
            out[key] = value
    return out

"""OpenCLIP text towers: SD 2's ``FrozenOpenCLIPEmbedder`` (CompVis ``cond_stage_model.model.*``, the
penultimate block through ``ln_final``) and SDXL's ``FrozenOpenCLIPEmbedder2`` (sgm ``conditioner.embedders.1
.model.*``: penultimate states, pooled output through ``text_projection``) mapped onto cq's `CLIPTextModel`.

The oracle is open_clip's own model (its ``encode_text`` and its residual blocks run as the CompVis / sgm embedders
run them) on tiny random configs; whole checkpoints are written in the CompVis and sgm single-file layouts and
loaded through `LatentDiffusion.from_pretrained`."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from diffusers_test_sd import save_tiny_sdxl_pipeline
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from cq.errors import CheckpointFormatError
from cq.models import CLIPTokenizer, LatentDiffusion, get_preset
from cq.models.clip_text import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from cq.models.convert_ldm import is_open_clip_text, open_clip_num_layers, open_clip_text_state
from cq.models.folder_config import preset_from_folder
from cq.models.loading import load_weights


open_clip = pytest.importorskip("open_clip")  # in the test extra: never skipped in CI

ATOL = 1e-5  # fp32; the same ops in the same order except q/k/v as three GEMMs instead of one fused


def _open_clip_text(*, width=32, heads=4, layers=3, mlp=64, vocab=1000, proj=16, seed=0):
    """A tiny open_clip ``CLIP`` (its text attributes are what SD 2 / SDXL checkpoints store), every parameter
    random (open_clip initialises some biases to 0, which would hide a swapped bias)."""
    from open_clip.model import CLIP

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIP(
            embed_dim=proj,
            vision_cfg=dict(layers=1, width=32, patch_size=8, image_size=16, head_width=16),
            text_cfg=dict(
                context_length=77, vocab_size=vocab, width=width, heads=heads, layers=layers, mlp_ratio=mlp / width
            ),
        )
        for p in model.parameters():
            p.data.normal_(0, 0.3 if p.ndim == 1 else 0.1)
    return model.eval()


def _text_state(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.startswith("visual.")}


def _blocks(model, ids, count):
    """open_clip's own forward up to block ``count`` (what ``FrozenOpenCLIPEmbedder.text_transformer_forward``
    runs for ``layer="penultimate"``), without ``ln_final``."""
    x = model.token_embedding(ids) + model.positional_embedding
    for block in model.transformer.resblocks[:count]:
        x = block(x, attn_mask=model.attn_mask)
    return x


def _ids(seed: int, batch: int = 3, vocab: int = 1000) -> torch.Tensor:
    """open_clip-style rows: start token, words, end token (the largest id: the pooled output reads it), pad 0."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(batch, 77, dtype=torch.long)
    for row in range(batch):
        n = int(torch.randint(0, 75, (1,), generator=g))
        ids[row, 0] = vocab - 2
        ids[row, 1 : n + 1] = torch.randint(1, vocab - 2, (n,), generator=g)
        ids[row, n + 1] = vocab - 1
    return ids


def _config(layers: int, **kw) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=1000,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        hidden_act="gelu",
        **kw,
    )


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_sd2_penultimate_tower_matches_open_clip(seed):
    """SD 2: ``ln_final`` of the penultimate block's output == cq's `CLIPTextModel` of one block fewer."""
    reference = _open_clip_text(seed=seed % 7)
    ours = CLIPTextModel(_config(2))
    load_weights(ours, open_clip_text_state(_text_state(reference), num_layers=2))
    ids = _ids(seed)
    with torch.no_grad():
        expected = reference.ln_final(_blocks(reference, ids, 2))
        out = ours(ids)
    assert expected.abs().max() > 0.1 and (out - expected).abs().max() <= ATOL


def test_sdxl_bigg_tower_matches_open_clip():
    """SDXL: penultimate hidden states (no ``ln_final``) and the projected pooled output (``encode_text``)."""
    reference = _open_clip_text(seed=1)
    ours = CLIPTextModelWithProjection(_config(3, projection_dim=16))
    load_weights(ours, open_clip_text_state(_text_state(reference), with_projection=True))
    ids = _ids(5)
    with torch.no_grad():
        out = ours.encode(ids)
        penultimate = _blocks(reference, ids, 2)
        pooled = reference.encode_text(ids)
    assert (out.hidden_states[-2] - penultimate).abs().max() <= ATOL
    assert pooled.abs().max() > 0.1 and (out.text_embeds - pooled).abs().max() <= ATOL


def test_key_map_names_every_part_and_keeps_unknown_keys():
    state = _text_state(_open_clip_text())
    assert is_open_clip_text(state) and open_clip_num_layers(state) == 3
    assert is_open_clip_text({f"cond_stage_model.model.{k}": v for k, v in state.items()})
    assert not is_open_clip_text({"text_model.embeddings.token_embedding.weight": torch.zeros(1)})
    mapped = open_clip_text_state({**state, "model.visual.proj": torch.zeros(2)}, num_layers=2)
    assert "text_projection.weight" not in mapped and "logit_scale" not in mapped
    assert not any(k.startswith("encoder.layers.2.") for k in mapped)
    assert "visual.proj" in mapped  # unknown keys stay, so loading names them
    q, k, v = (mapped[f"encoder.layers.0.self_attn.{n}_proj.weight"] for n in "qkv")
    assert torch.equal(torch.cat([q, k, v]), state["transformer.resblocks.0.attn.in_proj_weight"])
    with_projection = open_clip_text_state(state, with_projection=True)
    assert torch.equal(with_projection["text_projection.weight"], state["text_projection"].t())


# ----------------------------------------------------------------------------------------------------------------
# Whole checkpoints


def _byte_tokenizer_folder(path):
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(CLIPTokenizer.vocab_from_merges([])))
    (path / "merges.txt").write_text("#version: 0.2\n")
    return path


def _tiny_sd2_preset(vocab: int = 1000):
    """tiny-sd-v2 with the text tower of `_open_clip_text` (2 of its 3 blocks used, as SD 2 uses 23 of 24)."""
    p = get_preset("tiny-sd-v2")
    conditioner = dataclasses.replace(p.pipeline.conditioner, text=_config(2), pad_id=0)
    return dataclasses.replace(p, pipeline=dataclasses.replace(p.pipeline, conditioner=conditioner))


def test_a_compvis_sd2_checkpoint_loads_whole(tmp_path):
    preset = _tiny_sd2_preset()
    source = LatentDiffusion.build(preset, seed=2)
    tower = _open_clip_text(seed=3)
    state = {f"model.diffusion_model.{k}": v for k, v in source.unet.state_dict().items()}
    state |= {f"first_stage_model.{k}": v for k, v in source.first_stage.state_dict().items()}
    state |= {f"cond_stage_model.model.{k}": v for k, v in _text_state(tower).items()}
    path = tmp_path / "v2-tiny.safetensors"
    save_file(state, path)
    tokenizer = _byte_tokenizer_folder(tmp_path / "tok")  # pads with <|endoftext|> by itself
    pipe = LatentDiffusion.from_pretrained(preset, path, tokenizer=tokenizer)
    for name in ("unet", "first_stage"):
        theirs = getattr(source, name).state_dict()
        assert all(torch.equal(v, theirs[k]) for k, v in getattr(pipe, name).state_dict().items()), name
    assert pipe.conditioner.tokenizer.pad_id == 0  # the preset's padding (OpenCLIP's), not the tokenizer's own
    ids = pipe.conditioner.tokenizer(["a photo of a cat", ""])
    assert ids[0, -1] == 0 and ids[1, 2:].eq(0).all()
    with torch.no_grad():
        context = pipe.conditioner(["a photo of a cat", ""])
        expected = tower.ln_final(_blocks(tower, ids, 2))
        images = pipe.sample(cond=["a photo of a cat"], steps=2, sampler="ddim")
    assert (context - expected).abs().max() <= ATOL
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()


def test_a_tower_of_the_wrong_depth_is_named(tmp_path):
    preset = _tiny_sd2_preset()
    source = LatentDiffusion.build(preset, seed=2)
    state = {f"model.diffusion_model.{k}": v for k, v in source.unet.state_dict().items()}
    state |= {f"first_stage_model.{k}": v for k, v in source.first_stage.state_dict().items()}
    state |= {f"cond_stage_model.model.{k}": v for k, v in _text_state(_open_clip_text(layers=2)).items()}
    path = tmp_path / "short.safetensors"
    save_file(state, path)
    with pytest.raises(CheckpointFormatError, match="OpenCLIP text tower of 2 blocks.*needs 3"):
        LatentDiffusion.from_pretrained(preset, path, tokenizer=None)


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sgm-sdxl") / "pipe"
    return folder, save_tiny_sdxl_pipeline(folder)


def _sgm_file(tmp_path, reference_pipe, tower, **extra):
    """An sgm single-file SDXL checkpoint of the diffusers test pipeline's UNet / VAE / first text encoder (via
    cq's loaded copies, whose names are the sgm ones) and ``tower`` as embedder 1."""
    state = {f"model.diffusion_model.{k}": v for k, v in reference_pipe.unet.state_dict().items()}
    state |= {f"first_stage_model.{k}": v for k, v in reference_pipe.first_stage.state_dict().items()}
    text = reference_pipe.conditioner.transformer.state_dict()
    state |= {f"conditioner.embedders.0.transformer.text_model.{k}": v for k, v in text.items()}
    state |= {f"conditioner.embedders.1.model.{k}": v for k, v in _text_state(tower).items()}
    state |= extra
    path = tmp_path / "sd_xl_tiny.safetensors"
    save_file(state, path)
    return path


def test_an_sgm_sdxl_single_file_loads_whole(tiny_sdxl, tmp_path):
    folder, _ = tiny_sdxl
    from_folder = LatentDiffusion.from_pretrained(folder)
    p = preset_from_folder(folder)
    conditioner = dataclasses.replace(p.pipeline.conditioner, pad_id_2=0)
    preset = dataclasses.replace(p, pipeline=dataclasses.replace(p.pipeline, conditioner=conditioner))
    # the test pipeline's second encoder: 5 blocks of width 32, MLP 37, projection 32
    tower = _open_clip_text(layers=5, mlp=37, proj=32, seed=4)
    path = _sgm_file(tmp_path, from_folder, tower)
    pipe = LatentDiffusion.from_pretrained(preset, path, tokenizer=folder / "tokenizer")
    for name in ("unet", "first_stage"):
        theirs = getattr(from_folder, name).state_dict()
        assert all(torch.equal(v, theirs[k]) for k, v in getattr(pipe, name).state_dict().items()), name
    first = from_folder.conditioner.transformer.state_dict()
    assert all(torch.equal(v, first[k]) for k, v in pipe.conditioner.transformer.state_dict().items())
    assert pipe.conditioner.tokenizer.pad_id != 0 and pipe.conditioner.tokenizer_2.pad_id == 0
    ids = _ids(9, batch=2)
    with torch.no_grad():
        context, pooled = pipe.conditioner.embed(ids)
        first_states = pipe.conditioner.transformer.encode(ids).hidden_states[-2]
        expected = torch.cat([first_states, _blocks(tower, ids, 4)], dim=-1)
        assert (context - expected).abs().max() <= ATOL
        assert (pooled - tower.encode_text(ids)).abs().max() <= ATOL
        images = pipe.sample(cond=["a red car"], steps=2, sampler="ddim")
    assert torch.isfinite(images).all()


def test_an_sgm_file_with_foreign_conditioner_keys_is_refused(tiny_sdxl, tmp_path):
    folder, _ = tiny_sdxl
    from_folder = LatentDiffusion.from_pretrained(folder)
    tower = _open_clip_text(layers=5, mlp=37, proj=32, seed=4)
    path = _sgm_file(tmp_path, from_folder, tower, **{"conditioner.embedders.5.weight": torch.zeros(2)})
    with pytest.raises(CheckpointFormatError, match="not an sgm SDXL checkpoint.*embedders.5"):
        LatentDiffusion.from_pretrained(preset_from_folder(folder), path, tokenizer=None)
    short = _sgm_file(tmp_path, from_folder, _open_clip_text(layers=4, mlp=37, proj=32))
    with pytest.raises(CheckpointFormatError, match="OpenCLIP text tower of 4 blocks"):
        LatentDiffusion.from_pretrained(preset_from_folder(folder), short, tokenizer=None)


def test_full_size_presets_describe_the_released_models():
    sd2, sdxl = get_preset("sd-v2").pipeline, get_preset("sdxl")
    h14 = sd2.conditioner.text
    assert (h14.hidden_size, h14.num_hidden_layers, h14.hidden_act, sd2.conditioner.pad_id) == (1024, 23, "gelu", 0)
    c = sdxl.pipeline.conditioner
    assert (c.text_2.hidden_size, c.text_2.num_hidden_layers, c.text_2.projection_dim, c.pad_id_2) == (
        1280,
        32,
        1280,
        0,
    )
    assert c.text.hidden_act == "quick_gelu" and c.pad_id is None
    # UNet 2,567,463,684 parameters (SDXL base 1.0), counted on the meta device
    from cq.models.loading import build

    with torch.device("meta"):
        unet = build(sdxl)
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684
    assert sdxl.config.adm_in_channels == c.text_2.projection_dim + 6 * c.time_dim

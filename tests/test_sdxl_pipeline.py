"""Issue K item 2, step 4: SDXL's conditioning -- the two CLIP text encoders (penultimate hidden states; the second
with ``text_projection`` of the pooled output), the vector conditioning y of size/crop ids, diffusers'
``force_zeros_for_empty_prompt`` unconditional branch -- and `LatentDiffusion.from_pretrained` on a tiny SDXL
pipeline folder, against diffusers' ``StableDiffusionXLPipeline``."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cq.errors import ConfigError, InputShapeError
from cq.models import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, load_weights
from cq.models.convert_ldm import clip_text_state


PARITY_ATOL = 2e-5  # fp32; transformers' SDPA reorders reductions (see test_clip.py)

# diffusers tests/pipelines/stable_diffusion_xl/test_stable_diffusion_xl.py get_dummy_components()
SDXL_TEXT = dict(
    bos_token_id=0,
    eos_token_id=2,
    hidden_size=32,
    intermediate_size=37,
    layer_norm_eps=1e-05,
    num_attention_heads=4,
    num_hidden_layers=5,
    pad_token_id=1,
    vocab_size=1000,
    hidden_act="gelu",
    projection_dim=32,
)


def _reference_encoders(seed: int = 0, **overrides):
    from transformers import CLIPTextConfig as RefConfig
    from transformers import CLIPTextModel as RefModel
    from transformers import CLIPTextModelWithProjection as RefProjection

    config = RefConfig(**{**SDXL_TEXT, **overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return RefModel(config).eval(), RefProjection(config).eval()


@pytest.fixture(scope="module")
def encoders():
    plain, projected = _reference_encoders()
    ours_plain = CLIPTextModel(CLIPTextConfig.from_transformers(plain.config.to_dict()))
    ours_proj = CLIPTextModelWithProjection(
        CLIPTextConfig.from_transformers(projected.config.to_dict(), with_projection=True)
    )
    load_weights(ours_plain, clip_text_state(plain.state_dict()))
    load_weights(ours_proj, clip_text_state(projected.state_dict()))
    return (ours_plain.eval(), plain), (ours_proj.eval(), projected)


def _ids(seed: int, batch: int = 3, length: int = 77, eos: int = 999):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, eos, (batch, length), generator=g)
    ends = torch.randint(2, length, (batch,), generator=g)
    for row, end in enumerate(ends.tolist()):
        ids[row, 0], ids[row, end:] = 0, eos  # start token, end token repeated as padding
    return ids


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_penultimate_states_and_text_embeds_match_transformers(encoders, seed):
    (plain, ref_plain), (proj, ref_proj) = encoders
    ids = _ids(seed)
    with torch.no_grad():
        mine, theirs = plain.encode(ids), ref_plain(ids, output_hidden_states=True)
        assert len(mine.hidden_states) == len(theirs.hidden_states) == 6
        assert (mine.hidden_states[-2] - theirs.hidden_states[-2]).abs().max() <= PARITY_ATOL
        assert (mine.pooler_output - theirs.pooler_output).abs().max() <= PARITY_ATOL
        assert mine.text_embeds is None
        mine, theirs = proj.encode(ids), ref_proj(ids, output_hidden_states=True)
        assert theirs.text_embeds.abs().max() > 0.1
        assert (mine.text_embeds - theirs.text_embeds).abs().max() <= PARITY_ATOL
        assert (mine.hidden_states[-2] - theirs.hidden_states[-2]).abs().max() <= PARITY_ATOL
        assert (mine.last_hidden_state - theirs.last_hidden_state).abs().max() <= PARITY_ATOL


def test_the_pooled_token_is_the_first_eos_for_new_configs():
    """transformers 5: ``eos_token_id != 2`` reads the first position of that id (ids above it may follow)."""
    _, ref = _reference_encoders(seed=3, eos_token_id=500)
    ours = CLIPTextModelWithProjection(CLIPTextConfig.from_transformers(ref.config.to_dict(), with_projection=True))
    load_weights(ours, clip_text_state(ref.state_dict()))
    ids = _ids(1, eos=500)
    ids[:, -1] = 998  # larger than the end token: argmax would pick it
    with torch.no_grad():
        assert (ours.encode(ids).text_embeds - ref(ids).text_embeds).abs().max() <= PARITY_ATOL
        with pytest.raises(InputShapeError, match="end token 500"):
            ours.encode(torch.full((1, 5), 7))


def test_projection_config_checks():
    from transformers import CLIPTextConfig as RefConfig

    plain = RefConfig(**SDXL_TEXT).to_dict()
    assert CLIPTextConfig.from_transformers(plain).projection_dim is None  # no architectures: a plain encoder
    projected = {**plain, "architectures": ["CLIPTextModelWithProjection"]}
    assert CLIPTextConfig.from_transformers(projected).projection_dim == 32
    with pytest.raises(ConfigError, match="projection_dim"):
        CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4))
    with pytest.raises(ConfigError, match="integer projection_dim"):
        CLIPTextConfig.from_transformers({**plain, "projection_dim": None}, with_projection=True)

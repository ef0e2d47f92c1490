"""CLIP score (cq.metrics.clip_score) on a tiny randomly initialised open_clip model: no weights, no download."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from cq.errors import ConfigError, MetricUnavailableError
from cq.metrics.clip_score import ClipScorer
from cq.metrics.fidelity import measure
from cq.metrics.image_set import read_image_set


@pytest.fixture(scope="module")
def scorer():
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    model = CLIP(
        embed_dim=16,
        vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=32),
        text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1),
    ).eval()
    # the BPE vocabulary ships inside open_clip: the tokenizer needs no download
    return ClipScorer(model=model, tokenizer=open_clip.get_tokenizer("ViT-B-32"), image_size=32)


def _images(seed: int, n: int, size: int = 40) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


PROMPTS = ["a red square", "a photo of a church", "two dogs", "an empty room", "a bedroom at night", "digits"]


def test_scores_are_clipped_cosines(scorer):
    images = _images(0, 4)
    prompts = PROMPTS[:4]
    image = scorer.model.encode_image(scorer.preprocess(images))
    text = scorer.model.encode_text(scorer.tokenizer(prompts))
    expected = (100 * F.cosine_similarity(image, text, dim=-1)).clamp_min(0)
    assert torch.allclose(scorer.scores(images, prompts), expected, atol=1e-4)


@given(seed=st.integers(0, 1000), n=st.integers(1, 6), size=st.sampled_from([24, 32, 41]))
def test_scores_bounded_and_per_sample(scorer, seed, n, size):
    images = _images(seed, n, size)
    scores = scorer.scores(images, PROMPTS[:n])
    assert scores.shape == (n,) and bool(((scores >= 0) & (scores <= 100)).all())
    # a sample's score depends only on that sample and its prompt
    assert scorer.scores(images[-1:], PROMPTS[n - 1 : n]) == pytest.approx(float(scores[-1]), abs=1e-4)
    assert scorer.preprocess(images).shape == (n, 3, 32, 32)


def test_prompt_count_and_image_layout_are_checked(scorer):
    with pytest.raises(ConfigError, match="one prompt"):
        scorer.scores(_images(0, 3), PROMPTS[:2])
    with pytest.raises(Exception, match="uint8"):
        scorer.scores(_images(0, 2).float(), PROMPTS[:2])


def test_measure_reports_mean_and_worst_clip_score(scorer, tmp_path):
    images = _images(1, 6, 32).permute(0, 2, 3, 1).numpy()
    np.savez(tmp_path / "s.npz", arr_0=images, prompts=np.asarray(PROMPTS))
    np.savez(tmp_path / "noprompts.npz", arr_0=images)

    class Features:
        name = "pixels"

        def __call__(self, x):
            return x.float().flatten(1)[:, :8], None

    result = measure(read_image_set(tmp_path / "s.npz"), Features(), None, metrics=("clip",), clip=scorer)
    per_sample = scorer.scores(torch.from_numpy(images).permute(0, 3, 1, 2), PROMPTS)
    assert result.clip_score == pytest.approx(float(per_sample.mean()), abs=1e-4)
    assert result.clip_score_min == pytest.approx(float(per_sample.min()), abs=1e-4)
    with pytest.raises(ConfigError, match="carries none"):
        measure(read_image_set(tmp_path / "noprompts.npz"), Features(), None, metrics=("clip",), clip=scorer)


def test_missing_clip_weights_refused_without_download(tmp_path):
    with pytest.raises(MetricUnavailableError, match="--clip-weights PATH"):
        ClipScorer.from_open_clip("ViT-B-32", str(tmp_path / "missing.bin"))

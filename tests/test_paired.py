"""`cq.metrics.paired.compare`: paired bootstrap differences of two evaluations on the same seeds."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cq.errors import ConfigError, InputValueError, ReferenceMismatchError
from cq.metrics import paired
from cq.metrics.evaluate import Evaluation
from cq.metrics.frechet import frechet_distance, gaussian_stats
from cq.metrics.paired import MAX_RESAMPLES, compare


def evaluation(psnr, seeds=None, samples=None) -> Evaluation:
    psnr = torch.as_tensor(psnr, dtype=torch.float32)
    n = psnr.shape[0]
    return Evaluation(
        seeds=tuple(seeds if seeds is not None else range(1000, 1000 + n)),
        psnr_db=psnr,
        max_abs=torch.ones(n),
        reference_max_abs=torch.ones(n),
        threshold_db=25.0,
        seconds=1.0,
        reference_seconds=None,
        samples=samples,
    )


psnr_lists = st.lists(st.floats(5.0, 60.0, allow_nan=False), min_size=2, max_size=40)


@settings(max_examples=25, deadline=None)
@given(psnr_lists)
def test_a_model_against_itself_differs_by_nothing(psnr):
    a = evaluation(psnr)
    c = compare(a, a, resamples=50)
    for d in (c.mean_db, c.p5_db, c.worst_db):
        assert (d.value, d.low, d.high) == (0.0, 0.0, 0.0) and not d.decided
    assert (c.wins, c.losses, c.worst_beats) == (0, 0, 0.5)


@settings(max_examples=25, deadline=None)
@given(psnr_lists, st.floats(0.01, 5.0))
def test_a_uniform_gain_is_recovered_exactly_and_decided(psnr, gain):
    b = evaluation(psnr)
    a = evaluation([p + gain for p in psnr])
    c = compare(a, b, resamples=50)
    for d in (c.mean_db, c.p5_db, c.worst_db):
        assert d.value == pytest.approx(gain, abs=1e-4)
        assert d.low == pytest.approx(gain, abs=1e-4) and d.high == pytest.approx(gain, abs=1e-4)
        assert d.decided
    assert (c.wins, c.losses, c.worst_beats) == (len(psnr), 0, 1.0)


@settings(max_examples=25, deadline=None)
@given(psnr_lists, psnr_lists, st.integers(0, 10_000))
def test_swapping_a_and_b_mirrors_every_difference(psnr_a, psnr_b, seed):
    n = min(len(psnr_a), len(psnr_b))
    a, b = evaluation(psnr_a[:n]), evaluation(psnr_b[:n])
    ab, ba = compare(a, b, resamples=64, seed=seed), compare(b, a, resamples=64, seed=seed)
    for name in ("mean_db", "p5_db", "worst_db"):
        x, y = getattr(ab, name), getattr(ba, name)
        assert x.value == pytest.approx(-y.value, abs=1e-9)
        assert x.low == pytest.approx(-y.high, abs=1e-9) and x.high == pytest.approx(-y.low, abs=1e-9)
    assert ab.worst_beats + ba.worst_beats == pytest.approx(1.0)
    assert (ab.wins, ab.losses) == (ba.losses, ba.wins)


def test_the_resampling_is_deterministic_given_its_seed_and_the_level_widens_the_interval():
    g = torch.Generator().manual_seed(0)
    base = 30 + 5 * torch.randn(200, generator=g)
    a, b = evaluation(base + 0.3 * torch.randn(200, generator=g)), evaluation(base)
    first, again = compare(a, b, seed=3), compare(a, b, seed=3)
    assert first == again
    wide = compare(a, b, seed=3, confidence=0.99)
    assert wide.mean_db.low <= first.mean_db.low and wide.mean_db.high >= first.mean_db.high


def test_noise_without_a_shift_is_not_decided_and_a_clear_shift_is():
    g = torch.Generator().manual_seed(1)
    base = 30 + 5 * torch.randn(256, generator=g)
    same = compare(evaluation(base + torch.randn(256, generator=g)), evaluation(base + torch.randn(256, generator=g)))
    assert same.mean_db.low < 0 < same.mean_db.high
    shifted = compare(evaluation(base + 1 + torch.randn(256, generator=g)), evaluation(base))
    assert shifted.mean_db.decided and shifted.mean_db.low > 0.5


def test_tie_db_leaves_small_differences_out_of_wins_and_losses():
    a, b = evaluation([30.0, 30.05, 31.0, 29.0]), evaluation([30.0, 30.0, 30.0, 30.0])
    assert (compare(a, b).wins, compare(a, b).losses) == (2, 1)
    assert (compare(a, b, tie_db=0.1).wins, compare(a, b, tie_db=0.1).losses) == (1, 1)


def flat(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1)


def test_the_frechet_difference_is_b_minus_a_and_zero_for_the_same_samples():
    g = torch.Generator().manual_seed(2)
    data_rows = torch.randn(500, 3, generator=g)
    data = gaussian_stats(data_rows)
    close = torch.randn(64, 3, generator=g).reshape(64, 3, 1, 1)
    far = close + 2.0
    a, b = evaluation(torch.full((64,), 30.0), samples=close), evaluation(torch.full((64,), 30.0), samples=far)
    c = compare(a, b, features=flat, data=data, resamples=200)
    expected = frechet_distance(gaussian_stats(flat(far)), data) - frechet_distance(gaussian_stats(flat(close)), data)
    assert c.fid.value == pytest.approx(expected)
    assert c.fid.decided and c.fid.low > 0
    same = compare(a, a, features=flat, data=data, resamples=20).fid
    assert (same.value, same.low, same.high) == (0.0, 0.0, 0.0)
    assert "FID" in c.summary() and c.as_dict()["fid"]["decided"] is True


def test_bad_input_is_refused_with_the_fix():
    a = evaluation([30.0, 31.0, 32.0])
    with pytest.raises(ReferenceMismatchError, match="same seeds"):
        compare(a, evaluation([30.0, 31.0, 32.0], seeds=(1, 2, 3)))
    with pytest.raises(ConfigError, match="cq.Evaluation"):
        compare(a, [30.0, 31.0, 32.0])
    with pytest.raises(ConfigError, match="at least 2"):
        compare(evaluation([30.0]), evaluation([31.0]))
    for bad in (0, True, 2.5):
        with pytest.raises(ConfigError, match="resamples"):
            compare(a, a, resamples=bad)
    for bad in (0, 1, 1.5, True):
        with pytest.raises(ConfigError, match="confidence"):
            compare(a, a, confidence=bad)
    with pytest.raises(InputValueError, match=r"seeds \[1001\]"):
        compare(evaluation([30.0, float("nan"), 32.0]), a)
    for bad in (MAX_RESAMPLES + 1, 10**12):
        with pytest.raises(ConfigError, match="resamples must be an int in"):
            compare(a, a, resamples=bad)
    for bad in (None, True, 1.0, "0"):
        with pytest.raises(ConfigError, match="seed"):
            compare(a, a, seed=bad)
    with pytest.raises(ConfigError, match="tie_db"):
        compare(a, a, tie_db=-1)
    with pytest.raises(ConfigError, match="both features= and data="):
        compare(a, a, features=flat)
    data = gaussian_stats(torch.randn(10, 1))
    with pytest.raises(ConfigError, match="keep_samples"):
        compare(a, a, features=flat, data=data)
    with_samples = evaluation([30.0, 31.0, 32.0], samples=torch.zeros(3, 1, 2, 2))
    with pytest.raises(ConfigError, match=r"\[N, D\]"):
        compare(with_samples, with_samples, features=lambda x: x, data=data)


@settings(max_examples=25, deadline=None)
@given(psnr_lists, st.data())
def test_excluding_seeds_keeps_every_other_row_in_order(psnr, data):
    n = len(psnr)
    samples = torch.arange(n * 4, dtype=torch.float32).reshape(n, 1, 2, 2)
    e = evaluation(psnr, samples=samples)
    drop = data.draw(st.sets(st.sampled_from(e.seeds), max_size=n - 1))
    kept = e.excluding(drop)
    rows = [i for i, s in enumerate(e.seeds) if s not in drop]
    assert kept.seeds == tuple(e.seeds[i] for i in rows)
    assert torch.equal(kept.psnr_db, e.psnr_db[rows]) and torch.equal(kept.samples, samples[rows])
    assert kept.min_db == pytest.approx(min(psnr[i] for i in rows), abs=1e-4)
    same = e.excluding(())
    assert same.seeds == e.seeds and torch.equal(same.psnr_db, e.psnr_db) and torch.equal(same.samples, samples)
    if len(rows) >= 2:
        assert compare(kept, e.excluding(drop)).mean_db.value == 0.0


def test_excluding_refuses_unknown_seeds_and_emptying():
    e = evaluation([30.0, 31.0])
    with pytest.raises(ConfigError, match=r"seeds \[7\] were not evaluated"):
        e.excluding([7])
    with pytest.raises(ConfigError, match="leaves nothing"):
        e.excluding(e.seeds)


def test_identical_samples_inf_db_compare_as_equal_not_nan():
    lossless = evaluation([float("inf")] * 4)  # an uncompressing recipe: every sample equals full precision
    c = compare(lossless, lossless, resamples=20)
    assert (c.mean_db.value, c.p5_db.value, c.worst_db.value) == (0.0, 0.0, 0.0)
    assert c.worst_db.low == c.worst_db.high == 0.0


def test_resamples_are_drawn_in_chunks_with_the_same_statistics(monkeypatch):
    """Memory stays bounded for many seeds: with a chunk of 8 indices (2 resamples of 4 seeds at a time) every
    resample is still drawn, deterministically, and a uniform gain is still recovered exactly."""
    monkeypatch.setattr(paired, "_CHUNK", 8)
    b = evaluation([20.0, 25.0, 30.0, 35.0])
    a = evaluation([21.0, 26.0, 31.0, 36.0])
    c = compare(a, b, resamples=7, seed=1)
    assert c == compare(a, b, resamples=7, seed=1)
    assert (c.mean_db.low, c.mean_db.high, c.worst_db.value, c.worst_beats) == (1.0, 1.0, 1.0, 1.0)
    g = torch.Generator().manual_seed(4)
    noisy = evaluation(30 + torch.randn(4, generator=g))
    spread = compare(noisy, b, resamples=7, seed=1).mean_db
    assert spread.low < spread.high  # seven distinct draws, not one repeated

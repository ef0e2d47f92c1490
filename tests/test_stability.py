"""Full precision's own per-seed stability (`cq.metrics.stability`, ``cq.evaluate(..., stability=eps)``) and the
worst-case fields over the stable seeds (`Evaluation.stable`, `cq.compare`'s stable rows)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cq
from cq.errors import ConfigError, ReferenceMismatchError
from cq.metrics import Stability, stability
from cq.metrics.evaluate import STABLE_DB, Evaluation
from cq.metrics.seed_stability import nudge
from cq.sampling.seeded import seeded_noise


@pytest.fixture(scope="module")
def fitted(unet):
    trace = cq.trace(unet, steps=4, num_samples=4, seed=500, progress=False)
    return cq.quant_only("w8a8").fit(unet, trace, progress=False)


def test_the_nudge_has_its_own_generator():
    noise = seeded_noise((1, 4, 4), [3, 4])
    delta = (nudge(noise, [3, 4], 0.5) - noise) / 0.5
    assert not torch.allclose(delta[0], noise[0]) and not torch.allclose(delta[0], delta[1])
    # per seed, not per batch: the nudge of seed 4 is the same drawn alone
    alone = (nudge(noise[1:], [4], 0.5) - noise[1:]) / 0.5
    assert torch.allclose(alone[0], delta[1], atol=1e-6)
    # it does not consume or depend on the global generator
    torch.manual_seed(1)
    a = nudge(noise, [3, 4], 0.5)
    torch.manual_seed(2)
    assert torch.equal(a, nudge(noise, [3, 4], 0.5))


def test_stability_tiny_and_large_nudges(unet):
    small = stability(unet, seeds=[0, 1, 2], steps=4, eps=1e-6, progress=False)
    assert small.seeds == (0, 1, 2) and small.eps == 1e-6 and small.psnr_db.shape == (3,)
    assert bool((small.psnr_db > 80).all()) and small.unstable_seeds == () and small.stable_seeds == (0, 1, 2)
    large = stability(unet, seeds=[0, 1, 2], steps=4, eps=5.0, progress=False)
    assert bool((large.psnr_db < STABLE_DB).all()) and large.unstable_seeds == (0, 1, 2)
    assert large.stable_seeds == () and "3 of 3 seeds unstable" in large.describe()


def test_stability_per_seed_does_not_depend_on_the_batch(unet):
    batched = stability(unet, seeds=[5, 6, 7], steps=4, eps=1e-2, batch_size=3, progress=False)
    alone = stability(unet, seeds=[6], steps=4, eps=1e-2, progress=False)
    assert float(alone.psnr_db[0]) == pytest.approx(float(batched.psnr_db[1]), abs=0.05)


@settings(max_examples=20, deadline=None)
@given(
    st.one_of(
        st.floats(max_value=0.0),
        st.just(float("nan")),
        st.just(float("inf")),
        st.integers(max_value=0),
        st.just(True),
        st.text(max_size=3),
        st.none(),
    )
)
def test_bad_nudges_are_refused_naming_the_fix(eps):
    from cq.metrics.seed_stability import check_eps

    with pytest.raises(ConfigError, match=r"eps must be a finite number > 0.*stability=1e-2"):
        check_eps(eps)


def test_bad_input_is_refused(unet, fitted):
    for eps in (0.0, -1e-2, float("nan"), "0.01"):
        with pytest.raises(ConfigError, match="stability=1e-2"):
            stability(unet, seeds=[1], steps=4, eps=eps, progress=False)
        with pytest.raises(ConfigError, match="stability=1e-2"):
            cq.evaluate(fitted, unet, seeds=[1], steps=4, stability=eps, progress=False)
    with pytest.raises(ConfigError, match="at least one seed"):
        stability(unet, seeds=[], steps=4)
    with pytest.raises(ConfigError, match="full-precision cq UNet"):
        stability(fitted, seeds=[1], steps=4)
    with pytest.raises(ConfigError, match="one row per seed"):
        stability(unet, seeds=[1, 2], steps=4, reference_samples=torch.zeros(3, 1, 16, 16))
    record = stability(unet, seeds=[1, 2], steps=4, progress=False)
    with pytest.raises(ReferenceMismatchError, match="same seeds"):
        cq.evaluate(fitted, unet, seeds=[1, 3], steps=4, stability=record, progress=False)


def test_evaluate_records_stability_and_states_both(unet, fitted):
    r = cq.evaluate(fitted, unet, seeds=range(20, 24), steps=4, stability=1e-2, progress=False)
    assert isinstance(r.stability, Stability) and r.stability.seeds == r.seeds and r.stability.eps == 1e-2
    direct = stability(unet, seeds=range(20, 24), steps=4, eps=1e-2, progress=False)
    assert torch.allclose(direct.psnr_db, r.stability.psnr_db, atol=1e-3)
    text = str(r)
    assert "full precision's stability" in text and "stable seeds" in text
    d = r.as_dict()
    assert d["stability"]["eps"] == 1e-2 and ("stable" in d) == bool(r.stable_seeds)
    # reused by a second evaluation of the same seeds, as reference_samples are
    again = cq.evaluate(
        fitted,
        unet,
        seeds=range(20, 24),
        steps=4,
        reference_samples=r.reference_samples,
        stability=r.stability,
        progress=False,
    )
    assert again.stability is r.stability and torch.equal(again.psnr_db, r.psnr_db)
    plain = cq.evaluate(fitted, unet, seeds=[20], steps=4, progress=False)
    assert plain.stability is None and "stability" not in str(plain)
    with pytest.raises(ConfigError, match="stability=1e-2"):
        plain.stable()


def _evaluation(psnr, fp_psnr, eps=1e-2) -> Evaluation:
    n = len(psnr)
    seeds = tuple(range(1000, 1000 + n))
    return Evaluation(
        seeds=seeds,
        psnr_db=torch.tensor(psnr, dtype=torch.float32),
        max_abs=torch.arange(n, dtype=torch.float32),
        reference_max_abs=torch.ones(n),
        threshold_db=25.0,
        seconds=1.0,
        reference_seconds=None,
        stability=Stability(seeds=seeds, eps=eps, psnr_db=torch.tensor(fp_psnr, dtype=torch.float32)),
    )


rows = st.lists(
    st.tuples(st.floats(5.0, 60.0, allow_nan=False), st.floats(10.0, 80.0, allow_nan=False)), min_size=1, max_size=30
)


@settings(max_examples=40, deadline=None)
@given(rows)
def test_stable_fields_are_those_of_the_stable_seeds(pairs):
    psnr, fp = [p for p, _ in pairs], [f for _, f in pairs]
    e = _evaluation(psnr, fp)
    want_unstable = tuple(s for s, f in zip(e.seeds, e.stability.psnr_db.tolist(), strict=True) if f < STABLE_DB)
    assert e.unstable_seeds == want_unstable
    assert set(e.stable_seeds) | set(e.unstable_seeds) == set(e.seeds)
    if not e.stable_seeds:
        with pytest.raises(ConfigError):
            e.stable()
        assert "no stable seed" in e.summary()
        return
    s = e.stable()
    assert s.seeds == e.stable_seeds and s.stability.unstable_seeds == ()
    keep = [i for i, seed in enumerate(e.seeds) if seed in set(s.seeds)]
    assert torch.equal(s.psnr_db, e.psnr_db[keep]) and torch.equal(s.max_abs, e.max_abs[keep])
    assert s.min_db >= e.min_db and len(s.below()) <= len(e.below())
    assert f"on the {s.num_samples} stable seeds" in e.summary()
    assert e.as_dict()["stable"]["min_db"] == s.min_db


def test_compare_pairs_the_stable_seeds():
    a = _evaluation([30.0, 10.0, 32.0, 33.0], [50.0, 20.0, 50.0, 50.0])
    b = _evaluation([29.0, 40.0, 31.0, 32.0], [50.0, 20.0, 50.0, 50.0])
    c = cq.compare(a, b, resamples=200)
    assert c.unstable_seeds == (1001,) and c.stable is not None and c.stable.seeds == (1000, 1002, 1003)
    assert c.mean_db.value == pytest.approx(a.mean_db - b.mean_db)
    assert c.stable.mean_db.value == pytest.approx(1.0) and c.stable.mean_db.decided
    assert (c.stable.wins, c.stable.losses) == (3, 0) and (c.wins, c.losses) == (3, 1)
    assert "where full precision is stable" in c.summary() and c.as_dict()["stable"]["unstable_seeds"] == [1001]
    # a seed unstable in either record is left out
    b2 = _evaluation([29.0, 40.0, 31.0, 32.0], [50.0, 50.0, 20.0, 50.0])
    assert cq.compare(a, b2, resamples=50).unstable_seeds == (1001, 1002)
    # without records, no stable rows; other nudges are refused
    plain = Evaluation(**{**a.__dict__, "stability": None})
    assert cq.compare(plain, plain, resamples=20).stable is None
    with pytest.raises(ReferenceMismatchError, match="same stability"):
        cq.compare(a, _evaluation([1.0, 2.0, 3.0, 4.0], [50.0] * 4, eps=5e-2), resamples=20)


def test_stability_of_the_demo_model():
    unet = cq.models.load("demo")
    r = stability(unet, seeds=range(1000, 1004), steps=10, eps=1e-2, progress=False)
    assert all(math.isfinite(p) and p > 20 for p in r.psnr_db.tolist())


@given(st.integers(min_value=-(2**40), max_value=2**40))
def test_a_nudge_generator_is_never_its_seeds(seed):
    from cq.metrics.seed_stability import nudge_seed

    assert 0 <= nudge_seed(seed) < 2**32 and nudge_seed(seed) != seed % 2**32

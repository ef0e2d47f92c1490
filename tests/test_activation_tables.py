"""Deployable activation tables: ``activation_tables="per_group"`` gives one range per cache group,
the union of its steps' per-step ranges; it equals per-step tables when every group is one step, saves and
loads, runs on the int8 path, and older quantizer files load as per-step."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import cq
from cq.cache import UniformSchedule
from cq.cache.deepcache import DeepCache
from cq.calib.trace import seeded_noise
from cq.errors import ConfigError
from cq.quant import UniformQuantizer
from cq.quant.calibrate import RangeTables
from cq.quant.modules import ActQuantizer
from cq.quant.spec import QuantSpec
from cq.registry import from_dict, to_dict
from cq.sampling import ddim


STEPS = 6
FAST = {"refresh_samples": 4, "cached_samples": 2}


@st.composite
def observed_tables(draw):
    """Per-step ranges of one quantizer (some steps unobserved) and a refresh mask's groups."""
    n = draw(st.integers(1, 8))
    mask = [True] + draw(st.lists(st.booleans(), min_size=n - 1, max_size=n - 1))
    groups, last = [], 0
    for i, refresh in enumerate(mask):
        last = i if refresh else last
        groups.append(last)
    lo = torch.tensor(draw(st.lists(st.floats(-5, 0), min_size=n, max_size=n)))
    hi = lo + torch.tensor(draw(st.lists(st.floats(0.1, 5), min_size=n, max_size=n)))
    seen = torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    seen[draw(st.integers(0, n - 1))] = True
    return lo, hi, seen, groups


def applied(lo, hi, seen, groups):
    quantizer = torch.nn.Sequential(ActQuantizer(QuantSpec(per_step=True), lo.shape[0]))
    tables = RangeTables(groups=groups)
    tables.lo["0"], tables.hi["0"], tables.seen["0"] = lo.clone(), hi.clone(), seen.clone()
    tables.apply(quantizer)
    return quantizer[0].scale.clone(), quantizer[0].zero_point.clone()


@given(data=observed_tables())
def test_one_step_groups_equal_per_step_tables(data):
    lo, hi, seen, _ = data
    per_group = applied(lo, hi, seen, list(range(lo.shape[0])))
    per_step = applied(lo, hi, seen, None)
    assert all(torch.equal(a, b) for a, b in zip(per_group, per_step, strict=True))


@given(data=observed_tables())
def test_group_tables_are_constant_per_group_and_cover_each_observed_step(data):
    lo, hi, seen, groups = data
    scale, zero_point = applied(lo, hi, seen, groups)
    for g in set(groups):
        members = [i for i, gi in enumerate(groups) if gi == g]
        assert len({(float(scale[i]), float(zero_point[i])) for i in members}) == 1
        observed = [i for i in members if seen[i]]
        if observed:  # the group's grid spans the union of its observed ranges (within one quantum)
            s, z = float(scale[members[0]]), float(zero_point[members[0]])
            span_lo, span_hi = -z * s, (255 - z) * s
            assert span_lo <= float(lo[observed].min()) + s and span_hi >= float(hi[observed].max()) - s


@pytest.fixture(scope="module")
def trace(unet):
    return cq.trace(
        unet, steps=STEPS, num_samples=6, points=[unet.default_cache_point()], spacing="linspace", progress=False
    )


def fit(unet, trace, tables):
    recipe = cq.Recipe(
        cacher=DeepCache(schedule=UniformSchedule(interval=3)),
        quantizer=UniformQuantizer(activation_tables=tables, **FAST),
    )
    return recipe.fit(unet, trace, progress=False)


@pytest.fixture(scope="module")
def fitted(unet, trace):
    return {tables: fit(unet, trace, tables) for tables in ("per_step", "per_group")}


def quantizers(model):
    return {n: m for n, m in model.unet.named_modules() if isinstance(m, ActQuantizer) and m.fixed_range is None}


def test_fitted_tables_change_only_at_refresh_steps(fitted):
    model = fitted["per_group"]
    source = model.cache.source
    changed = 0
    for name, q in quantizers(model).items():
        for step in range(STEPS):
            same = torch.equal(q.scale[step], q.scale[source[step]]) and torch.equal(
                q.zero_point[step], q.zero_point[source[step]]
            )
            assert same, (name, step)
        per_step = quantizers(fitted["per_step"])[name]
        changed += int(not torch.equal(per_step.scale, q.scale))
    assert changed > 0  # per-step tables of tail layers differ within a group; the grouped ones do not


def test_per_group_saves_loads_and_runs_int8(fitted, unet, tmp_path):
    model = fitted["per_group"]
    noise = seeded_noise((1, 16, 16), range(2))
    before = ddim(model, noise, steps=STEPS, spacing="linspace")
    loaded = cq.load(cq.save(model, tmp_path / "m.cq"), unet=unet)
    assert loaded.recipe.quantizer.activation_tables == "per_group"
    assert torch.equal(ddim(loaded, noise, steps=STEPS, spacing="linspace"), before)
    fast = copy.deepcopy(model)
    fast.to_int8()
    got = ddim(fast, noise, steps=STEPS, spacing="linspace")
    error = (got - before).pow(2).mean() / before.pow(2).mean()
    assert float(error) < 1e-2  # integer kernels reproduce fake quantization (quantization-noise level)


def test_older_quantizer_files_load_as_per_step():
    data = to_dict(UniformQuantizer())
    data.pop("activation_tables")
    assert from_dict({**data, "version": 4}).activation_tables == "per_step"
    assert from_dict(to_dict(UniformQuantizer(activation_tables="per_group"))).activation_tables == "per_group"


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="activation_tables"):
        UniformQuantizer(activation_tables="per_layer")
    with pytest.raises(ConfigError, match="per_step=True"):
        UniformQuantizer(activation_tables="per_group", per_step=False)


def test_groups_must_cover_the_tables():
    quantizer = torch.nn.Sequential(ActQuantizer(QuantSpec(per_step=True), 4))
    tables = RangeTables(groups=[0, 0, 2])
    tables.lo["0"], tables.hi["0"], tables.seen["0"] = torch.zeros(4), torch.ones(4), torch.ones(4, dtype=torch.bool)
    with pytest.raises(ConfigError, match="cache groups cover 3 steps"):
        tables.apply(quantizer)

"""Recipe: fitting order, validation, round trips; save -> load bit-identical; loading errors; atomic writes."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import tiny_unet
from hypothesis import given
from hypothesis import strategies as st

import cq
from cq.cache import DPS, Power, UniformSchedule
from cq.cache.deepcache import DeepCache
from cq.calib.trace import seeded_noise
from cq.correct import CacheErrorCorrector, QuantErrorCorrector
from cq.errors import CheckpointFormatError, ConfigError, StepCountMismatchError
from cq.fit.recipe import PRESET_RECIPES, Recipe, parse_bits
from cq.quant import PTQ4DM, UniformQuantizer, quantized_modules
from cq.registry import from_dict, to_dict
from cq.sampling import ddim


STEPS = 6
FAST = {"refresh_samples": 4, "cached_samples": 2}


@pytest.fixture(scope="module")
def trace(unet):
    return cq.trace(
        unet, steps=STEPS, num_samples=6, points=[unet.default_cache_point()], spacing="linspace", progress=False
    )


def fast_recipe(name: str) -> Recipe:
    """The preset recipe with a cheaper calibration (same structure)."""
    recipe = PRESET_RECIPES[name](**({"interval": 3} if name != "quant_only" else {}))
    if recipe.quantizer is not None:
        recipe = Recipe(cacher=recipe.cacher, quantizer=UniformQuantizer(**FAST), correctors=recipe.correctors)
    return recipe


@pytest.fixture(scope="module")
def fitted(unet, trace):
    return {name: fast_recipe(name).fit(unet, trace, progress=False) for name in PRESET_RECIPES}


def test_fit_leaves_the_input_unet_untouched(trace):
    unet = tiny_unet()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    fast_recipe("cachequant").fit(unet, trace, progress=False)
    after = unet.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not quantized_modules(unet)


def test_cachequant_fits_every_component(fitted):
    model = fitted["cachequant"]
    assert isinstance(model.recipe.cacher.schedule, DPS) and model.recipe.cacher.schedule.steps
    assert model.cache.correction is not None
    consumer = model.unet.cache_consumer(model.cache.point)
    assert model.unet.get_submodule(f"{consumer}.nin_shortcut").correction is not None
    assert quantized_modules(model.unet)


def test_naive_and_deepcache_have_no_corrections(fitted):
    for name in ("naive", "deepcache"):
        assert fitted[name].cache is None or fitted[name].cache.correction is None
    assert not quantized_modules(fitted["deepcache"].unet)
    assert fitted["quant_only"].cache is None


@pytest.mark.parametrize("name", list(PRESET_RECIPES))
def test_save_load_gives_bit_identical_samples(name, fitted, unet, tmp_path):
    model = fitted[name]
    noise = seeded_noise((1, 16, 16), range(3))
    before = ddim(model, noise, steps=STEPS, spacing="linspace")
    path = cq.save(model, tmp_path / f"{name}.cq")
    loaded = cq.load(path, unet=unet, num_steps=STEPS)
    assert torch.equal(ddim(loaded, noise, steps=STEPS, spacing="linspace"), before)
    assert loaded.recipe == model.recipe
    assert [p.name for p in tmp_path.iterdir()] == [f"{name}.cq"]  # no temp file left behind


def test_quantized_file_stores_integer_weights(fitted, tmp_path):
    from safetensors import safe_open

    path = cq.save(fitted["cachequant"], tmp_path / "m.cq")
    with safe_open(str(path), framework="pt") as f:
        dtypes = {k: f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118
    assert dtypes["unet.down.0.block.0.conv1.weight.weight_q"] == torch.uint8
    assert not any(k.endswith("conv1.weight") for k in dtypes)  # no float copy of quantized weights


def test_loading_with_another_model_or_step_count_raises(fitted, tmp_path):
    path = cq.save(fitted["naive"], tmp_path / "m.cq")
    with pytest.raises(ConfigError, match="another base model"):
        cq.load(path, unet=tiny_unet(seed=1))
    with pytest.raises(StepCountMismatchError, match=str(STEPS)):
        cq.load(path, num_steps=STEPS + 4)
    loaded = cq.load(path)
    with pytest.raises(StepCountMismatchError):
        ddim(loaded, seeded_noise((1, 16, 16), range(1)), steps=STEPS + 4, spacing="linspace")


def test_corrupted_truncated_and_foreign_files_raise(fitted, tmp_path):
    path = cq.save(fitted["deepcache"], tmp_path / "m.cq")
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # flip bits inside the last tensor
    corrupted = tmp_path / "corrupted.cq"
    corrupted.write_bytes(bytes(data))
    with pytest.raises(CheckpointFormatError, match="checksum"):
        cq.load(corrupted)
    truncated = tmp_path / "truncated.cq"
    truncated.write_bytes(path.read_bytes()[: len(data) // 2])
    with pytest.raises(CheckpointFormatError):
        cq.load(truncated)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(CheckpointFormatError, match="not a saved cq model"):
        cq.load(foreign)
    with pytest.raises(CheckpointFormatError, match="no such file"):
        cq.load(tmp_path / "missing.cq")


def test_interrupted_save_leaves_no_file(fitted, tmp_path, monkeypatch):
    import safetensors.torch

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        cq.save(fitted["deepcache"], tmp_path / "m.cq")
    assert os.listdir(tmp_path) == []


def test_unfitted_models_cannot_be_saved(unet, tmp_path):
    model = cq.CompressedUNet(unet, num_steps=STEPS)
    with pytest.raises(ConfigError, match="Recipe.fit"):
        cq.save(model, tmp_path / "m.cq")


def test_trace_must_hold_the_cache_point(unet):
    bare = cq.trace(unet, steps=STEPS, num_samples=2, spacing="linspace", progress=False)
    with pytest.raises(ConfigError, match="points=recipe.points"):
        fast_recipe("cachequant").fit(unet, bare, progress=False)


# ---------------------------------------------------------------------------------------------------------------
# Values


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: Recipe(correctors=(CacheErrorCorrector(),)), "needs a cacher"),
        (
            lambda: Recipe(
                cacher=DeepCache(schedule=UniformSchedule(interval=2)), correctors=(QuantErrorCorrector(),)
            ),
            "needs a quantizer",
        ),
        (
            lambda: Recipe(
                cacher=DeepCache(schedule=UniformSchedule(interval=2)),
                correctors=(CacheErrorCorrector(), CacheErrorCorrector(chunk=3)),
            ),
            "repeats",
        ),
        (lambda: Recipe(cacher=UniformSchedule(interval=2)), "Cacher"),
        (lambda: Recipe(correctors=[CacheErrorCorrector()]), "tuple"),
        (lambda: parse_bits("8bit"), "w8a8"),
    ],
)
def test_invalid_recipes_raise(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


schedules = st.one_of(
    st.builds(UniformSchedule, interval=st.integers(1, 9)),
    st.builds(Power, interval=st.integers(1, 9)),
    st.builds(DPS, interval=st.integers(1, 9)),
)
recipes = st.builds(
    Recipe,
    cacher=st.builds(DeepCache, schedule=schedules, point=st.none() | st.just("up.0.block.2")),
    quantizer=st.one_of(st.builds(UniformQuantizer, weight_bits=st.integers(2, 8)), st.builds(PTQ4DM)),
    correctors=st.sampled_from([(), (CacheErrorCorrector(),), (CacheErrorCorrector(), QuantErrorCorrector())]),
)


@given(recipe=recipes)
def test_recipes_round_trip(recipe):
    assert from_dict(to_dict(recipe)) == recipe


@pytest.mark.parametrize("name", list(PRESET_RECIPES))
def test_preset_recipes_round_trip(name):
    recipe = PRESET_RECIPES[name]()
    assert from_dict(to_dict(recipe)) == recipe


def test_bits_parse():
    assert parse_bits("w8a8") == (8, 8) and parse_bits("W4A8") == (4, 8)
    assert cq.cachequant(bits="w4a8").quantizer.weight_bits == 4


def test_saved_files_get_ordinary_permissions(fitted, tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    path = cq.save(fitted["deepcache"], tmp_path / "m.cq")
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # like any new file, not a private temp file's 0o600


def test_wrap_rollout_is_refused_for_a_cacher_that_does_not_search_on_rollouts(unet, trace):
    for recipe in (cq.deepcache(interval=2), cq.quant_only("w8a8")):  # a uniform schedule; no cacher at all
        with pytest.raises(ConfigError, match="wrap_rollout= is for a cacher that searches on rollouts"):
            recipe.fit(unet, trace, progress=False, wrap_rollout=lambda rollout: rollout)

"""`cq.load` refuses every malformed file with a `CheckpointFormatError` naming what is wrong."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import cq
from cq.artifact import _checksum
from cq.errors import CheckpointFormatError


@pytest.fixture(scope="module")
def saved(unet, tmp_path_factory):
    trace = cq.trace(unet, steps=4, num_samples=2, points=[unet.default_cache_point()], progress=False)
    model = cq.naive(interval=2).fit(unet, trace, progress=False)
    return cq.save(model, tmp_path_factory.mktemp("art") / "m.cq")


def _read(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())  # noqa: SIM118


def _rewrite(path, out, *, edit_meta=None, edit_tensors=None, rechecksum=True):
    tensors, meta = _read(path)
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    if rechecksum:
        meta["checksum"] = _checksum(tensors, meta)
    save_file(tensors, str(out), metadata=meta)
    return out


def test_metadata_is_covered_by_the_checksum(saved, tmp_path):
    def flip(meta):
        model = json.loads(meta["model"])
        model["noise"]["beta_end"] = 0.021
        meta["model"] = json.dumps(model)

    bad = _rewrite(saved, tmp_path / "b.cq", edit_meta=flip, rechecksum=False)
    with pytest.raises(CheckpointFormatError, match="checksum"):
        cq.load(bad)


def test_saving_twice_writes_identical_bytes(saved, unet, tmp_path):
    loaded = cq.load(saved)
    again = cq.save(loaded, tmp_path / "again.cq")
    assert again.read_bytes() == saved.read_bytes()


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: m.update(cq_format="x1"), "cq_format must be a positive integer"),
        (lambda m: m.update(cq_format="0"), "cq_format must be a positive integer"),
        (lambda m: m.update(cq_format="99"), "this cq reads"),
        (lambda m: m.pop("num_steps"), "num_steps"),
        (lambda m: m.update(num_steps="-3"), "num_steps"),
        (lambda m: m.update(recipe="{not json"), "not valid JSON"),
        (lambda m: m.update(model="[]"), "invalid"),
        (lambda m: m.update(recipe=json.dumps({"type": "recipe"})), "invalid"),
        (lambda m: m.update(fingerprint=""), "fingerprint"),
        (lambda m: m.update(calibration_seeds='["a"]'), "calibration_seeds"),
        (lambda m: m.update(guidance_scale='"7.5"'), "guidance_scale must be a number"),
        (lambda m: m.update(model=m["model"].replace('"ch": 32', '"ch": 64')), "do not fit"),
    ],
)
def test_malformed_metadata_is_a_format_error(saved, tmp_path, edit, match):
    bad = _rewrite(saved, tmp_path / "bad.cq", edit_meta=edit)
    with pytest.raises(CheckpointFormatError, match=match):
        cq.load(bad)


def test_calibration_guidance_is_saved_and_older_files_state_none(saved, tmp_path):
    """The trace's guidance scale travels with the file (the CLI samples with it by default); a file written
    before it was saved loads with None (unknown), not a guessed 1."""
    loaded = cq.load(saved)
    assert loaded.calibration_guidance == 1.0  # the fixture's trace is unguided
    guided = _rewrite(saved, tmp_path / "g.cq", edit_meta=lambda m: m.update(guidance_scale="7.5"))
    assert cq.load(guided).calibration_guidance == 7.5
    older = _rewrite(saved, tmp_path / "old.cq", edit_meta=lambda m: m.pop("guidance_scale"))
    assert cq.load(older).calibration_guidance is None


def test_extra_tensors_are_a_format_error(saved, tmp_path):
    bad = _rewrite(saved, tmp_path / "extra.cq", edit_tensors=lambda t: t.update(extra=torch.zeros(3)))
    with pytest.raises(CheckpointFormatError, match="do not fit"):
        cq.load(bad)


def test_format_1_files_still_load(saved, tmp_path):
    """Files of the previous format (checksum over the tensors only) load unchanged."""

    def older(meta):
        meta["cq_format"] = "1"

    tensors, meta = _read(saved)
    older(meta)
    meta["checksum"] = _checksum(tensors)
    path = tmp_path / "v1.cq"
    save_file(tensors, str(path), metadata=meta)
    model = cq.load(path)
    assert model.num_steps == 4


def test_format_2_files_with_the_cache_correction_at_the_model_load(unet, tmp_path):
    """Format 2 kept the DEC cache correction under ``cache_correction.*`` (attached to the model); format 3 under
    ``cache.correction.*`` (owned by the cache). A format-2 file loads to the same model."""
    trace = cq.trace(unet, steps=4, num_samples=2, points=[unet.default_cache_point()], progress=False)
    model = cq.cachequant(interval=2).fit(unet, trace, progress=False)
    path = cq.save(model, tmp_path / "v3.cq")
    tensors, meta = _read(path)
    assert {"cache.correction.gain", "cache.correction.offset"} <= tensors.keys()
    old = {k.replace("cache.correction.", "cache_correction.", 1): v for k, v in tensors.items()}
    meta["cq_format"] = "2"
    meta["checksum"] = _checksum(old, meta)
    save_file(old, str(tmp_path / "v2.cq"), metadata=meta)
    loaded = cq.load(tmp_path / "v2.cq")
    assert torch.equal(loaded.cache.correction.gain, model.cache.correction.gain)
    noise = torch.randn(2, *unet.sample_shape, generator=torch.Generator().manual_seed(3))
    assert torch.equal(cq.sampling.ddim(loaded, noise, steps=4), cq.sampling.ddim(model, noise, steps=4))
    newer = dict(meta, cq_format="4")
    newer["checksum"] = _checksum(tensors, newer)
    save_file(tensors, str(tmp_path / "v4.cq"), metadata=newer)
    with pytest.raises(CheckpointFormatError, match="cq format 4; this cq reads <= 3"):
        cq.load(tmp_path / "v4.cq")

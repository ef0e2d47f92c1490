"""A trace kept on disk (``cq.trace(..., storage=FOLDER)``, memory-mapped ``.npy`` files) holds exactly
what the in-memory trace holds, fits exactly the same model, appears only when complete, reopens with
`Trace.open`, and refuses what it cannot store or read with `TraceStorageError`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import cq
from cq.calib.trace import Trace
from cq.errors import TraceStorageError
from cq.models import LatentDiffusion


def _same_trace(a: Trace, b: Trace) -> None:
    for name in ("timesteps", "x", "x0", "sample_ids"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert (a.cond is None) == (b.cond is None) and (a.cond is None or torch.equal(a.cond, b.cond))
    assert list(a.features) == list(b.features)
    assert all(torch.equal(a.features[p], b.features[p]) for p in a.features)
    assert (a.sampler, a.seeds, a.base_fingerprint, a.settings, a.guidance_scale) == (
        b.sampler,
        b.seeds,
        b.base_fingerprint,
        b.settings,
        b.guidance_scale,
    )


@pytest.fixture(scope="module")
def demo():
    return cq.models.load("demo")


def _demo_trace(unet, **kwargs):
    recipe = cq.cachequant(interval=5)
    return cq.trace(
        unet,
        steps=10,
        num_samples=6,
        keep=4,
        batch_size=4,
        points=recipe.points(unet),
        seed=10_000,
        progress=False,
        **kwargs,
    )


def test_a_trace_on_disk_equals_the_one_in_memory_and_fits_the_same_model(demo, tmp_path):
    in_memory = _demo_trace(demo)
    on_disk = _demo_trace(demo, storage=tmp_path / "trace")
    _same_trace(in_memory, on_disk)
    assert sorted(p.name for p in (tmp_path / "trace").iterdir()) == ["feature0.npy", "trace.json", "x.npy", "x0.npy"]
    assert isinstance(np.load(tmp_path / "trace" / "x.npy", mmap_mode="r"), np.memmap)
    recipe = cq.cachequant(interval=5)
    a, b = (
        recipe.fit(demo, in_memory, progress=False).state_dict(),
        recipe.fit(demo, on_disk, progress=False).state_dict(),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    _same_trace(on_disk, Trace.open(tmp_path / "trace"))  # one recorded trace serves many fits


def test_a_guided_latent_trace_and_half_precision_storage(tmp_path):
    pipe = LatentDiffusion.build("tiny-ldm-cin", seed=0)
    labels = torch.tensor([3, 7, 1])
    kwargs = dict(
        steps=4,
        num_samples=3,
        cond=pipe.condition(labels),
        guidance_scale=3.0,
        uncond=pipe.unconditional(1),
        spacing="ldm",
        points=cq.cachequant(interval=2).points(pipe.unet),
        progress=False,
    )
    _same_trace(cq.trace(pipe.unet, **kwargs), cq.trace(pipe.unet, storage=tmp_path / "guided", **kwargs))
    half = cq.trace(pipe.unet, dtype=torch.float16, storage=tmp_path / "half", **kwargs)
    _same_trace(cq.trace(pipe.unet, dtype=torch.float16, **kwargs), half)
    assert half.x.dtype == torch.float16 and half.cond.dtype == torch.float32


def test_the_folder_appears_only_when_the_trace_is_complete(demo, tmp_path):
    def interrupt(step, *args):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _demo_trace(demo, storage=tmp_path / "trace", observers=[interrupt])
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a temporary one is left behind


def test_opened_traces_are_copy_on_write(demo, tmp_path):
    _demo_trace(demo, storage=tmp_path / "trace")
    opened = Trace.open(tmp_path / "trace")
    before = opened.x.clone()
    opened.x.add_(1.0)
    assert torch.equal(Trace.open(tmp_path / "trace").x, before)


def test_what_cannot_be_stored_or_read_is_refused(demo, tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(TraceStorageError, match="exists already"):
        _demo_trace(demo, storage=tmp_path / "taken")
    with pytest.raises(TraceStorageError, match="float32, float16 or integer"):
        _demo_trace(demo, storage=tmp_path / "bf16", dtype=torch.bfloat16)
    assert not (tmp_path / "bf16").exists()
    with pytest.raises(TraceStorageError, match="is not a folder"):
        Trace.open(tmp_path / "missing")
    with pytest.raises(TraceStorageError, match="holds no trace.json"):
        Trace.open(tmp_path / "taken")
    _demo_trace(demo, storage=tmp_path / "trace")
    meta_file = tmp_path / "trace" / "trace.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "format": 99}))
    with pytest.raises(TraceStorageError, match="format 99"):
        Trace.open(tmp_path / "trace")
    meta_file.write_text("{not json")
    with pytest.raises(TraceStorageError, match="not a readable cq trace"):
        Trace.open(tmp_path / "trace")
    meta_file.write_text(json.dumps({**meta, "arrays": ["x", "x0", "../elsewhere"]}))
    with pytest.raises(TraceStorageError, match="are not a trace's"):
        Trace.open(tmp_path / "trace")
    meta_file.write_text(json.dumps({**meta, "timesteps": meta["timesteps"][:-1]}))
    with pytest.raises(TraceStorageError, match="do not match"):
        Trace.open(tmp_path / "trace")
    meta_file.write_text(json.dumps(meta))
    (tmp_path / "trace" / "x.npy").write_bytes(b"truncated")
    with pytest.raises(TraceStorageError, match="not a readable cq trace"):
        Trace.open(tmp_path / "trace")


def test_cq_fit_keeps_its_trace_on_disk_with_trace_dir(tmp_path, capsys):
    from cq.cli import main

    folder, out = tmp_path / "calibration-trace", tmp_path / "demo.cq"
    argv = [
        "fit",
        "--model",
        "demo",
        "--recipe",
        "cachequant",
        "--interval",
        "5",
        "--steps",
        "10",
        "--samples",
        "4",
        "--trace-dir",
        str(folder),
        "-o",
        str(out),
    ]
    assert main(argv) == 0
    assert f"on disk in {folder}" in capsys.readouterr().out
    trace = Trace.open(folder)
    assert trace.x.shape[:2] == (10, 4) and trace.seeds == (10_000, 10_001, 10_002, 10_003)
    assert cq.load(out).calibration_seeds == trace.seeds
    assert main(argv) == 2  # the folder is never overwritten: one line, before any work
    err = capsys.readouterr().err.strip()
    assert "exists already" in err and len(err.splitlines()) == 1

"""`cq sample --out DIR`: fixed shards of seeds + manifest, resumable after ``kill -9``,
byte-identical to an uninterrupted run, and split over ``torchrun`` ranks (gloo) with the same union."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_unet
from hypothesis import given
from hypothesis import strategies as st

import cq
from cq.cli import main
from cq.errors import ConfigError, SampleFolderError
from cq.sampling.ranks import Ranks
from cq.sampling.shards import (
    SampleManifest,
    ShardPlan,
    open_folder,
    read_samples,
    shard_path,
    to_uint8_nhwc,
    write_shards,
)


ROOT = Path(__file__).resolve().parents[1]
RUN = ["-n", "16", "--shard-size", "3", "--batch-size", "2"]  # 6 shards (the last holds 1); batches split shards


@pytest.fixture(scope="module")
def tiny_cq(tmp_path_factory) -> Path:
    unet = tiny_unet()
    trace = cq.trace(unet, steps=4, num_samples=2, points=[unet.default_cache_point()], progress=False)
    return cq.save(cq.deepcache(interval=2).fit(unet, trace, progress=False), tmp_path_factory.mktemp("m") / "t.cq")


@pytest.fixture(scope="module")
def reference(tiny_cq, tmp_path_factory) -> Path:
    """An uninterrupted single-process run."""
    out = tmp_path_factory.mktemp("ref") / "samples"
    assert main(["sample", str(tiny_cq), *RUN, "--out", str(out)]) == 0
    return out


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def test_shards_hold_each_seed_once_and_each_sample_depends_on_its_seed_only(tiny_cq, reference):
    images, seeds, labels = read_samples(reference)
    assert images.dtype == np.uint8 and images.shape == (16, 16, 16, 1) and labels is None
    assert seeds.tolist() == list(range(16))
    assert sorted(_files(reference)) == ["manifest.json"] + [f"shard-{i:05d}.npz" for i in range(6)]
    model = cq.load(tiny_cq)
    for seed in (0, 5, 15):  # alone in a batch of one, the same image as in its shard's batch
        noise = cq.sampling.seeded_noise(model.sample_shape, [seed])
        alone = to_uint8_nhwc(cq.sampling.ddim(model, noise, steps=4))
        assert np.abs(alone.astype(int) - images[seed].astype(int)).max() <= 1


def test_resume_after_kill_9_is_byte_identical(tiny_cq, reference, tmp_path, capsys):
    out = tmp_path / "samples"
    argv = ["sample", str(tiny_cq), *RUN, "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "cq", *argv], env=_env(), stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not shard_path(out, 0).exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(30)
    left = sorted(p.name for p in out.glob("shard-*.npz"))
    assert 1 <= len(left) < 6, left  # killed part-way: some shards done, some not
    assert main(argv) == 0  # the same command resumes
    assert f"{len(left)} done, {6 - len(left)} to sample" in capsys.readouterr().out
    assert _files(out) == _files(reference)


def test_resume_replaces_a_missing_shard_and_clears_a_dead_writers_temp(tiny_cq, reference, tmp_path):
    out = tmp_path / "samples"
    shutil.copytree(reference, out)
    shard_path(out, 5).unlink()
    shard_path(out, 2).unlink()
    stale = out / f".shard-00005.npz.{_dead_pid()}.0badc0de.tmp"
    stale.write_bytes(b"half a shard")
    assert main(["sample", str(tiny_cq), *RUN, "--out", str(out)]) == 0
    assert not stale.exists() and _files(out) == _files(reference)


def test_two_processes_union_equals_the_single_process_run(tiny_cq, reference, tmp_path):
    out = tmp_path / "samples"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += ["-m", "cq", "sample", str(tiny_cq), *RUN, "--out", str(out)]
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "over 2 process(es)" in done.stdout and "this process: 3 shards" in done.stdout  # rank 0 took half
    assert _files(out) == _files(reference)


@pytest.mark.parametrize(
    ("change", "field"),
    [(["--seed", "1"], "first_seed"), (["--batch-size", "4"], "batch_size"), (["-n", "17"], "num")],
)
def test_a_run_with_other_settings_is_refused_and_changes_nothing(tiny_cq, reference, tmp_path, capsys, change, field):
    out = tmp_path / "samples"
    shutil.copytree(reference, out)
    shard_path(out, 4).unlink()
    before = _files(out)
    assert main(["sample", str(tiny_cq), *RUN, *change, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds samples of another run" in err[0] and field in err[0], err
    assert _files(out) == before


def test_a_damaged_shard_is_named_and_an_unfinished_folder_is_not_read(tiny_cq, reference, tmp_path, capsys):
    out = tmp_path / "samples"
    shutil.copytree(reference, out)
    shard_path(out, 1).write_bytes(shard_path(out, 1).read_bytes()[:100])
    assert main(["sample", str(tiny_cq), *RUN, "--out", str(out)]) == 2
    assert "shard-00001.npz is not a readable shard" in capsys.readouterr().err
    shard_path(out, 1).unlink()
    with pytest.raises(SampleFolderError, match="unfinished: 1 of 6 shards missing"):
        read_samples(out)
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(SampleFolderError, match="manifest.json is unreadable"):
        read_samples(out)


MISUSE = [
    (["--out", "{file}"], "is a file"),
    (["--out", "{tmp}/grid.png"], "takes a folder of shards"),
    (["--out", "{tmp}/d", "--npz", "{tmp}/x.npz"], "--npz (one file)"),
    (["--out", "{tmp}/d", "-o", "{tmp}/g.png"], "-o (a PNG grid)"),
    (["--out", "{foreign}"], "not empty and holds no manifest.json"),
    (["--shard-size", "4"], "add --out DIR"),
    (["--format", "png"], "--format applies to a sample folder"),
    (["--out", "{tmp}/d", "--scale", "2"], "--scale (its upscale)"),
    (["--out", "{file}/d"], "cannot write into --out"),
]


@pytest.mark.parametrize(("extra", "message"), MISUSE, ids=[m for _, m in MISUSE])
def test_misuse_is_one_line_and_exit_2(tiny_cq, tmp_path, capsys, extra, message):
    (tmp_path / "file").write_text("x")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "holiday.jpg").write_text("x")
    names = {"tmp": tmp_path, "file": tmp_path / "file", "foreign": tmp_path / "foreign"}
    assert main(["sample", str(tiny_cq), "-n", "2", *[a.format(**names) for a in extra]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cq sample: error:") and message in err[0], err
    assert not (tmp_path / "d").exists() and sorted(p.name for p in (tmp_path / "foreign").iterdir()) == [
        "holiday.jpg"
    ]


@pytest.mark.parametrize("bad", [["-n", "0"], ["--shard-size", "0"], ["--shard-size", "x"]])
def test_counts_are_checked_by_the_parser(tiny_cq, tmp_path, capsys, bad):
    with pytest.raises(SystemExit) as exit_:
        main(["sample", str(tiny_cq), *bad, "--out", str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and ("must be >= 1" in err or "expected an integer" in err), err
    assert not (tmp_path / "d").exists()


@given(
    first=st.integers(-(2**31), 2**31),
    num=st.integers(1, 200),
    size=st.integers(1, 50),
    world=st.integers(1, 7),
)
def test_shards_partition_the_seeds_and_ranks_partition_the_shards(first, num, size, world):
    plan = ShardPlan(first, num, size)
    seeds = [s for i in range(plan.num_shards) for s in plan.seeds(i)]
    assert seeds == list(range(first, first + num))
    assert all(1 <= len(plan.rows(i)) <= size for i in range(plan.num_shards))
    assert all(len(plan.rows(i)) == size for i in range(plan.num_shards - 1))  # only the last one is short
    shares = [Ranks(r, world).share(range(plan.num_shards)) for r in range(world)]
    assert sorted(i for s in shares for i in s) == list(range(plan.num_shards))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    manifest = SampleManifest(plan, {"sampler": {"steps": 4, "spacing": ("a", "b")}})
    again = SampleManifest.from_dict(manifest.to_dict())
    assert again == manifest and again.differences(manifest) == []


@pytest.mark.parametrize(
    "args", [(0, 0, 3), (0, 5, 0), (0, 5, True), (0.5, 5, 3), (0, "5", 3)], ids=["num", "size", "bool", "float", "str"]
)
def test_a_bad_plan_is_refused(args):
    with pytest.raises(ConfigError):
        ShardPlan(*args)
    with pytest.raises(ConfigError, match="shard must be"):
        ShardPlan(0, 5, 2).rows(3)


def test_the_npz_layout_matches_the_single_file_npz(tiny_cq, reference, tmp_path):
    """Shards and ``--npz`` share the uint8 conversion (``to_uint8_nhwc``): [-1, 1] -> 0..255, NHWC."""
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0]).view(1, 1, 1, 5)
    assert to_uint8_nhwc(x).reshape(-1).tolist() == [0, 0, 128, 255, 255]
    with np.load(shard_path(reference, 0)) as data:
        assert sorted(data.files) == ["arr_0", "seeds"] and data["seeds"].dtype == np.int64


def test_png_shards_hold_the_same_pixels_and_resume_byte_identically(tiny_cq, reference, tmp_path):
    out = tmp_path / "png"
    argv = ["sample", str(tiny_cq), *RUN, "--format", "png", "--out", str(out)]
    assert main(argv) == 0
    assert sorted(p.name for p in shard_path(out, 0, "png").iterdir()) == [
        "000000.png",
        "000001.png",
        "000002.png",
        "shard.json",
    ]
    images, seeds, labels = read_samples(out)
    ref_images, ref_seeds, _ = read_samples(reference)
    assert np.array_equal(images, ref_images) and np.array_equal(seeds, ref_seeds) and labels is None
    first = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    shutil.rmtree(shard_path(out, 3, "png"))
    stale = out / f".shard-00003.{_dead_pid()}.0badc0de.tmp"  # a killed writer's half-written folder
    stale.mkdir()
    (stale / "000009.png").write_bytes(b"half")
    assert main(argv) == 0
    assert not stale.exists()
    assert {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == first
    assert main(["sample", str(tiny_cq), *RUN, "--out", str(out)]) == 2  # npz into a png folder: another run


@pytest.mark.parametrize("shard_format", ["npz", "png"])
@pytest.mark.parametrize("values", [[7, 3], ["a cat", "a dog", "a bowl of fruit"]], ids=["labels", "prompts"])
def test_labels_and_prompts_are_saved_beside_their_images_in_seed_order(tmp_path, shard_format, values):
    manifest = SampleManifest(ShardPlan(100, 7, 3), {"conditions": values}, shard_format)
    open_folder(tmp_path, manifest)

    def draw(seeds: range, rows: range) -> np.ndarray:  # each image encodes its seed and its row
        return np.stack(
            [np.full((2, 3, 3), [s % 256, r, 0], dtype=np.uint8) for s, r in zip(seeds, rows, strict=True)]
        )

    write_shards(tmp_path, manifest, [2, 0, 1], draw, batch_size=2, per_sample=lambda r: values[r % len(values)])
    images, seeds, labels = read_samples(tmp_path)
    assert seeds.tolist() == list(range(100, 107)) and images[:, 0, 0, 0].tolist() == list(range(100, 107))
    assert images[:, 0, 0, 1].tolist() == list(range(7))
    assert labels == [values[i % len(values)] for i in range(7)]


def test_eval_reads_sample_folders_of_both_formats_and_refuses_unfinished_ones(tiny_cq, reference, tmp_path):
    """`cq eval`'s reader (`cq.metrics.image_set`) takes a sample folder as `read_samples` does: every image in
    seed order, npz or PNG shards alike, and refuses a run that is not finished."""
    from cq.errors import CqError
    from cq.metrics.image_set import read_image_set

    png = tmp_path / "png"
    assert main(["sample", str(tiny_cq), *RUN, "--format", "png", "--out", str(png)]) == 0
    expected, _, _ = read_samples(reference)
    for folder in (reference, png):
        images = torch.cat(list(read_image_set(folder).batches(5)))  # uint8 NCHW
        assert np.array_equal(images.permute(0, 2, 3, 1).numpy(), expected)
    shutil.rmtree(shard_path(png, 2, "png"))
    with pytest.raises(CqError, match="unfinished: 1 of 6 shards"):
        read_image_set(png)

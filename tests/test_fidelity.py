"""FID / IS / precision-recall of image sets (cq.metrics.fidelity), the set reader, reference statistics, `cq eval`.

Feature extractors here are tiny random conv nets (and a randomly initialised torch-fidelity Inception-v3 for its
adapter): nothing is downloaded.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from torch import nn

from cq.cli import main
from cq.errors import (
    CheckpointFormatError,
    ConfigError,
    ImageSetError,
    InputShapeError,
    MetricUnavailableError,
    ReferenceStatsError,
    UnsafeCheckpointError,
)
from cq.metrics.extractors import FeatureExtractor, InceptionExtractor
from cq.metrics.fidelity import inception_score_splits, make_reference, measure, precision_recall
from cq.metrics.frechet import frechet_distance_of
from cq.metrics.image_set import read_image_set
from cq.metrics.reference_stats import ReferenceStats


class TinyExtractor(nn.Module):
    """A random conv net standing in for Inception: 16-d features, 5 logits."""

    name = "tiny-random-conv"

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.head = nn.Linear(16, 5)

    @torch.no_grad()
    def forward(self, images):
        x = images.float().expand(-1, 3, -1, -1) / 127.5 - 1
        f = self.body(x)
        return f, self.head(f)


def _images(seed: int, n: int = 64, size: int = 12, channels: int = 3) -> np.ndarray:
    """Smooth random uint8 images [N, H, W, C] (a low-resolution pattern upsampled, so noise is a change)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, channels, 3, 3, generator=g)
    x = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _noisy(images: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0, sigma, images.shape)
    return np.clip(images.astype(np.float64) + noise, 0, 255).round().astype(np.uint8)


def _set(tmp_path, images: np.ndarray, name: str = "x.npz", **extra):
    path = tmp_path / name
    np.savez(path, arr_0=images, **extra)
    return read_image_set(path)


# ---------------------------------------------------------------------------------------------------------------
# metrics


def test_extractor_protocol_is_runtime_checkable():
    assert isinstance(TinyExtractor(), FeatureExtractor)


def test_fid_of_a_set_with_itself_is_zero_and_matches_the_frechet_function(tmp_path):
    ex = TinyExtractor()
    images = _set(tmp_path, _images(0))
    ref = make_reference(images, ex, keep_features=64, progress=False)
    same = measure(images, ex, ref, metrics=("fid", "pr"), progress=False)
    assert same.fid == pytest.approx(0.0, abs=1e-6)
    assert (same.precision, same.recall) == (1.0, 1.0)  # every point is inside its own ball
    other = _set(tmp_path, _images(1), "other.npz")
    result = measure(other, ex, ref, metrics=("fid",), progress=False)
    f_ref = ex(torch.from_numpy(_images(0)).permute(0, 3, 1, 2))[0]
    f_other = ex(torch.from_numpy(_images(1)).permute(0, 3, 1, 2))[0]
    assert result.fid == pytest.approx(frechet_distance_of(f_other, f_ref), rel=1e-9)
    assert result.fid > 1e-3


def test_fid_through_the_image_path_matches_scipy(tmp_path):
    from scipy import linalg

    ex = TinyExtractor(seed=3)
    a, b = _images(2, n=80), _images(5, n=80)
    ref = make_reference(_set(tmp_path, a, "a.npz"), ex, progress=False)
    fid = measure(_set(tmp_path, b, "b.npz"), ex, ref, metrics=("fid",), progress=False).fid
    fa = ex(torch.from_numpy(a).permute(0, 3, 1, 2))[0].double().numpy()
    fb = ex(torch.from_numpy(b).permute(0, 3, 1, 2))[0].double().numpy()
    ma, mb, ca, cb = fa.mean(0), fb.mean(0), np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    root = linalg.sqrtm(ca @ cb).real
    expected = float(((ma - mb) ** 2).sum() + np.trace(ca + cb - 2 * root))
    assert fid == pytest.approx(expected, rel=1e-5, abs=1e-7)


@given(seed=st.integers(0, 1000))
def test_fid_grows_with_added_noise(tmp_path_factory, seed):
    tmp = tmp_path_factory.mktemp("noise")
    ex = TinyExtractor(seed=seed % 7)
    clean = _images(seed, n=96)
    ref = make_reference(_set(tmp, clean, "ref.npz"), ex, progress=False)
    fids = [
        measure(_set(tmp, _noisy(clean, sigma, seed), f"n{sigma}.npz"), ex, ref, metrics=("fid",), progress=False).fid
        for sigma in (0, 15, 60)
    ]
    assert fids[0] == pytest.approx(0.0, abs=1e-6)
    assert fids[0] < fids[1] < fids[2]


@given(seed=st.integers(0, 10_000), n=st.integers(10, 60), k=st.integers(2, 20), splits=st.integers(1, 5))
def test_inception_score_bounds(seed, n, k, splits):
    logits = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 5
    mean, std = inception_score_splits(logits, splits)
    assert 1.0 - 1e-9 <= mean <= k + 1e-9
    assert std >= 0
    assert std == 0 or splits > 1
    one_class = torch.zeros(n, k)
    one_class[:, 0] = 50
    assert inception_score_splits(one_class, splits)[0] == pytest.approx(1.0, abs=1e-6)


@given(seed=st.integers(0, 10_000), n=st.integers(8, 40), m=st.integers(8, 40), d=st.integers(1, 6))
def test_precision_recall_bounds_and_swap(seed, n, m, d):
    g = torch.Generator().manual_seed(seed)
    real, fake = torch.randn(n, d, generator=g), torch.randn(m, d, generator=g) + 0.5
    p, r = precision_recall(real, fake)
    assert 0 <= p <= 1 and 0 <= r <= 1
    assert precision_recall(fake, real) == pytest.approx((r, p))  # the definitions mirror each other
    far_p, far_r = precision_recall(real, fake + 1e3)
    assert far_p == 0 and far_r == 0


def test_measure_refuses_what_it_cannot_compute(tmp_path):
    ex = TinyExtractor()
    images = _set(tmp_path, _images(0))
    ref = make_reference(images, ex, progress=False)
    assert ref.spatial is None  # an extractor without spatial features gives no sFID statistics
    with pytest.raises(ConfigError, match="mu_s / sigma_s"):
        measure(images, ex, ref, metrics=("fid", "sfid"), progress=False)
    with_spatial = ReferenceStats.of(torch.randn(40, 16), ex.name, spatial=torch.randn(40, 6))
    with pytest.raises(MetricUnavailableError, match="sFID is defined on Inception-v3's spatial"):
        measure(images, ex, with_spatial, metrics=("sfid",), progress=False)
    with pytest.raises(ConfigError, match="subset of"):
        measure(images, ex, ref, metrics=("kid",), progress=False)
    with pytest.raises(ConfigError, match="need reference statistics"):
        measure(images, ex, None, metrics=("fid",), progress=False)
    with pytest.raises(ConfigError, match="--keep-features"):
        measure(images, ex, ref, metrics=("pr",), progress=False)
    with pytest.raises(ConfigError, match="CLIP model"):
        measure(images, ex, ref, metrics=("clip",), progress=False)
    wrong = ReferenceStats(stats=ref.stats, extractor="inception")
    with pytest.raises(ReferenceStatsError, match="was built with inception"):
        measure(images, ex, wrong, metrics=("fid",), progress=False)
    with pytest.raises(ReferenceStatsError, match="16-d features"):
        measure(images, ex, ReferenceStats.of(torch.randn(10, 4), ex.name), metrics=("fid",), progress=False)


# ---------------------------------------------------------------------------------------------------------------
# reading image sets


def test_three_layouts_read_the_same_images(tmp_path):
    images = _images(4, n=10, size=8)
    shards = tmp_path / "shards"
    shards.mkdir()
    np.savez(shards / "shard-00000.npz", arr_0=images[:6], arr_1=np.arange(6), seeds=np.arange(6))
    np.savez(shards / "shard-00001.npz", arr_0=images[6:], arr_1=np.arange(6, 10), seeds=np.arange(6, 10))
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    for i, im in enumerate(images):
        Image.fromarray(im).save(pngs / f"{i:03d}.png")
    single = tmp_path / "one.npz"
    np.savez(single, arr_0=images, prompts=np.asarray([f"p{i}" for i in range(10)]))
    expected = torch.from_numpy(images).permute(0, 3, 1, 2)
    for path, layout in ((shards, "shards"), (pngs, "images"), (single, "npz")):
        s = read_image_set(path)
        assert (s.layout, s.count, s.shape) == (layout, 10, (8, 8, 3))
        for batch_size in (1, 3, 4, 10, 64):
            batches = list(s.batches(batch_size))
            assert all(b.shape[0] <= batch_size for b in batches)
            assert torch.equal(torch.cat(batches), expected)
    assert read_image_set(shards).labels == tuple(range(10))
    assert read_image_set(single).prompts == tuple(f"p{i}" for i in range(10))
    assert read_image_set(pngs).prompts is None


def test_grayscale_images_read_as_one_channel(tmp_path):
    gray = _images(0, n=3, size=8, channels=1)
    for i, im in enumerate(gray):
        Image.fromarray(im[..., 0]).save(tmp_path / f"{i}.png")
    s = read_image_set(tmp_path)
    assert s.shape == (8, 8, 1)
    assert torch.equal(torch.cat(list(s.batches(2))), torch.from_numpy(gray).permute(0, 3, 1, 2))


def test_bad_image_sets_raise_image_set_errors(tmp_path):
    cases = {
        "float.npz": {"arr_0": np.zeros((2, 8, 8, 3), np.float32)},
        "nchw.npz": {"arr_0": np.zeros((2, 3, 8, 8), np.uint8)},
        "noarr.npz": {"images": np.zeros((2, 8, 8, 3), np.uint8)},
        "labels.npz": {"arr_0": np.zeros((2, 8, 8, 3), np.uint8), "arr_1": np.arange(3)},
        "empty.npz": {"arr_0": np.zeros((0, 8, 8, 3), np.uint8)},
    }
    for name, arrays in cases.items():
        np.savez(tmp_path / name, **arrays)
        with pytest.raises(ImageSetError):
            read_image_set(tmp_path / name)
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(ImageSetError, match="not a readable"):
        read_image_set(tmp_path / "broken.npz")
    with pytest.raises(ImageSetError, match="does not exist"):
        read_image_set(tmp_path / "missing")
    empty = tmp_path / "emptydir"
    empty.mkdir()
    with pytest.raises(ImageSetError, match="no shard"):
        read_image_set(empty)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.fromarray(_images(0, 1, 8)[0]).save(mixed / "a.png")
    Image.fromarray(_images(0, 1, 10)[0]).save(mixed / "b.png")
    with pytest.raises(ImageSetError, match="one size"):
        list(read_image_set(mixed).batches(4))
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.png").write_bytes(b"junk")
    with pytest.raises(ImageSetError, match="not a readable image"):
        read_image_set(junk)


# ---------------------------------------------------------------------------------------------------------------
# reference statistics


def test_reference_round_trip_and_validation(tmp_path):
    ref = ReferenceStats.of(torch.randn(50, 6, dtype=torch.float64), "tiny", keep_features=20)
    path = ref.save(tmp_path / "ref.npz")
    back = ReferenceStats.load(path)
    assert torch.equal(back.stats.mean, ref.stats.mean) and torch.equal(back.stats.cov, ref.stats.cov)
    assert (back.extractor, back.stats.count, back.features.shape) == ("tiny", 50, (20, 6))
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, no temp left
    np.savez(tmp_path / "adm.npz", mu=np.zeros(4), sigma=np.eye(4), mu_s=np.zeros(2))  # ADM layout loads
    assert ReferenceStats.load(tmp_path / "adm.npz").extractor is None
    bad = {
        "nomu.npz": {"sigma": np.eye(3)},
        "shape.npz": {"mu": np.zeros(3), "sigma": np.eye(4)},
        "nan.npz": {"mu": np.full(2, np.nan), "sigma": np.eye(2)},
        "feats.npz": {"mu": np.zeros(2), "sigma": np.eye(2), "features": np.zeros((5, 3))},
    }
    for name, arrays in bad.items():
        np.savez(tmp_path / name, **arrays)
        with pytest.raises(ReferenceStatsError):
            ReferenceStats.load(tmp_path / name)
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(ReferenceStatsError, match="not a readable"):
        ReferenceStats.load(tmp_path / "junk.npz")
    with pytest.raises(ReferenceStatsError, match="--make-ref"):
        ReferenceStats.load(tmp_path / "missing.npz")


# ---------------------------------------------------------------------------------------------------------------
# torch-fidelity's Inception-v3 behind InceptionExtractor (random weights: the adapter, not the numbers)


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory):
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    mp = pytest.MonkeyPatch()  # build the architecture with its random init: no weights, no download
    mp.setattr(tfi, "load_state_dict_from_url", lambda *a, **k: {})
    mp.setattr(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state, *a, **k: None)
    try:
        net = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    finally:
        mp.undo()
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(net.state_dict(), path)
    return path


def test_inception_adapter_on_random_weights(random_inception_weights):
    ex = InceptionExtractor.load(random_inception_weights)
    assert isinstance(ex, FeatureExtractor)
    rgb = torch.from_numpy(_images(0, n=2, size=16)).permute(0, 3, 1, 2)
    features, logits = ex(rgb)
    assert features.shape == (2, 2048) and logits.shape == (2, 1008)
    gray, _ = ex(rgb[:, :1])
    assert torch.allclose(gray, ex(rgb[:, :1].expand(-1, 3, -1, -1))[0])
    with pytest.raises(InputShapeError, match="uint8"):
        ex(rgb.float())


def test_spatial_features_are_the_first_seven_channels_of_mixed_6d_1x1_in_nhwc_order(random_inception_weights):
    from cq.metrics.extractors import SPATIAL_LAYER

    ex = InceptionExtractor.load(random_inception_weights)
    rgb = torch.from_numpy(_images(1, n=3, size=16)).permute(0, 3, 1, 2)
    layer = ex.net.get_submodule(SPATIAL_LAYER)
    raw = []
    handle = layer.register_forward_hook(lambda m, a, out: raw.append(out.clone()))
    try:
        pool, logits = ex(rgb)
    finally:
        handle.remove()
    pool_s, logits_s, spatial = ex.with_spatial(rgb)
    assert spatial.shape == (3, 17 * 17 * 7) and not layer._forward_hooks  # the call's hook is gone
    assert torch.equal(pool_s, pool) and torch.equal(logits_s, logits)
    assert raw[0].shape == (3, 192, 17, 17)
    assert torch.equal(spatial.reshape(3, 17, 17, 7).permute(0, 3, 1, 2), raw[0][:, :7])  # TF's NHWC flattening


def test_sfid_of_a_set_with_itself_is_zero_and_grows_with_noise(random_inception_weights, tmp_path):
    ex = InceptionExtractor.load(random_inception_weights)
    clean = _images(2, n=24, size=16)
    ref = make_reference(_set(tmp_path, clean, "ref.npz"), ex, progress=False)
    assert ref.spatial is not None and ref.spatial.mean.shape == (2023,)
    same = measure(_set(tmp_path, clean, "same.npz"), ex, ref, metrics=("sfid",), progress=False).sfid
    scale = float(ref.spatial.cov.diagonal().sum())
    assert abs(same) <= 1e-6 * scale
    noisy = measure(
        _set(tmp_path, _noisy(clean, 40, 3), "noisy.npz"), ex, ref, metrics=("sfid", "fid"), progress=False
    )
    assert noisy.sfid > 1e-3 * scale and noisy.fid > 0 and ["sFID", f"{noisy.sfid:.3f}"] in noisy.rows()
    ref.save(tmp_path / "ref-stats.npz")  # ADM's key names round-trip
    loaded = ReferenceStats.load(tmp_path / "ref-stats.npz")
    assert torch.equal(loaded.spatial.mean, ref.spatial.mean.double()) and loaded.spatial.cov.shape == (2023, 2023)
    with np.load(tmp_path / "ref-stats.npz") as z:
        assert {"mu", "sigma", "mu_s", "sigma_s"} <= set(z.files)
        arrays = dict(z)
    np.savez(tmp_path / "bad.npz", **{**arrays, "sigma_s": np.zeros((3, 3))})
    with pytest.raises(ReferenceStatsError, match="mu_s .* do not fit"):
        ReferenceStats.load(tmp_path / "bad.npz")


def test_cli_sfid_with_an_inception_reference(random_inception_weights, tmp_path, capsys):
    np.savez(tmp_path / "real.npz", arr_0=_images(4, n=16, size=16))
    np.savez(tmp_path / "fake.npz", arr_0=_noisy(_images(4, n=16, size=16), 30, 1))
    weights = ["--inception-weights", str(random_inception_weights)]
    ref = tmp_path / "ref.npz"
    assert main(["eval", "--make-ref", str(tmp_path / "real.npz"), "-o", str(ref), *weights]) == 0
    assert "mu_s/sigma_s (2023-d spatial, for sFID)" in capsys.readouterr().out
    assert main(["eval", str(tmp_path / "fake.npz"), "--ref", str(ref), "--metrics", "fid,sfid", *weights]) == 0
    assert "| sFID" in capsys.readouterr().out


def test_inception_weights_are_checked_and_never_downloaded(tmp_path):
    with pytest.raises(MetricUnavailableError, match="--inception-weights PATH"):
        InceptionExtractor.load(tmp_path / "missing.pth")
    torch.save({"not": "tensors"}, tmp_path / "dict.pth")
    with pytest.raises(CheckpointFormatError, match="no state dict"):
        InceptionExtractor.load(tmp_path / "dict.pth")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointFormatError, match="not the state dict of torch-fidelity"):
        InceptionExtractor.load(tmp_path / "other.pth")
    torch.save({"w": torch.zeros(1), "obj": InceptionExtractor}, tmp_path / "unsafe.pth")
    with pytest.raises(UnsafeCheckpointError):
        InceptionExtractor.load(tmp_path / "unsafe.pth")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(CheckpointFormatError):
        InceptionExtractor.load(tmp_path / "junk.pth")


# ---------------------------------------------------------------------------------------------------------------
# cq eval (digits extractor: the one that runs without any download)


def _digits_like(seed: int, n: int) -> np.ndarray:
    from cq.metrics.digits import digits_split

    x = digits_split()[0][seed : seed + n]
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_cli_eval_and_make_ref(tmp_path, capsys):
    real = _digits_like(0, 200)
    np.savez(tmp_path / "real.npz", arr_0=real)
    np.savez(tmp_path / "noisy.npz", arr_0=_noisy(real, 60, 0))
    ref = tmp_path / "ref.npz"
    assert main(["eval", "--make-ref", str(tmp_path / "real.npz"), "-o", str(ref), "--extractor", "digits"]) == 0
    assert "200 feature rows" in capsys.readouterr().out
    out_json = tmp_path / "m.json"
    args = ["eval", str(tmp_path / "noisy.npz"), "--ref", str(ref), "--extractor", "digits", "--json", str(out_json)]
    assert main(args) == 0
    noisy = json.loads(out_json.read_text())
    assert main(["eval", str(tmp_path / "real.npz"), "--ref", str(ref), "--extractor", "digits"]) == 0
    printed = capsys.readouterr().out
    assert "| FID" in printed and "precision" in printed
    assert noisy["fid"] > 1.0 and noisy["count"] == 200 and noisy["precision"] is not None
    assert main(["eval", str(tmp_path / "real.npz"), "--extractor", "digits", "--metrics", "fid"]) == 0
    assert "the extractor data statistics" in capsys.readouterr().out  # no --ref: the real digits
    assert main(["eval", str(tmp_path / "real.npz"), "--extractor", "digits", "--metrics", "sfid"]) == 2
    assert "sFID needs the reference's spatial statistics" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "real.npz"), "--inception-weights", str(tmp_path / "none.pth")]) == 2
    assert "--inception-weights PATH" in capsys.readouterr().err
    assert main(["eval", "--make-ref", str(tmp_path / "real.npz"), "--extractor", "digits"]) == 2
    assert main(["eval"]) == 2
    (tmp_path / "junk.npz").write_bytes(b"junk")
    junk_ref = ["--ref", str(tmp_path / "junk.npz")]
    assert main(["eval", str(tmp_path / "real.npz"), "--extractor", "digits", *junk_ref]) == 2
    assert "not a readable .npz" in capsys.readouterr().err
    big = np.zeros((2, 32, 32, 3), np.uint8)
    np.savez(tmp_path / "big.npz", arr_0=big)
    assert main(["eval", str(tmp_path / "big.npz"), "--extractor", "digits"]) == 2
    assert "16x16" in capsys.readouterr().err

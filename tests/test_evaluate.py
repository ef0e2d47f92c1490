"""`cq.evaluate` (held-out, per-sample quality), the Fréchet distance, and the digits scorer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import tiny_unet
from hypothesis import given
from hypothesis import strategies as st

import cq
from cq.errors import CalibrationSeedsError, ConfigError, ReferenceMismatchError, StepCountMismatchError
from cq.metrics import sample_error
from cq.metrics.digits import DigitsScorer, class_coverage, inception_score
from cq.metrics.evaluate import per_sample_psnr
from cq.metrics.frechet import frechet_distance, frechet_distance_of, gaussian_stats
from cq.sampling import plms


# ---------------------------------------------------------------------------------------------------------------
# Fréchet distance


def _random_features(seed: int, n: int, d: int, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d, d, generator=g, dtype=torch.float64)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ mixing + shift


@given(seed=st.integers(0, 10_000), d=st.integers(1, 12), n=st.integers(20, 200))
def test_frechet_matches_scipy_sqrtm(seed, d, n):
    from scipy import linalg

    a, b = _random_features(seed, n, d), _random_features(seed + 1, n, d, shift=0.3)
    mu1, mu2 = a.mean(0).numpy(), b.mean(0).numpy()
    s1, s2 = np.cov(a.numpy(), rowvar=False).reshape(d, d), np.cov(b.numpy(), rowvar=False).reshape(d, d)
    root = linalg.sqrtm(s1 @ s2).real
    expected = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(root))
    assert frechet_distance_of(a, b) == pytest.approx(expected, rel=1e-6, abs=1e-8)


@given(seed=st.integers(0, 10_000), d=st.integers(1, 8))
def test_frechet_properties(seed, d):
    a, b = _random_features(seed, 100, d), _random_features(seed + 7, 100, d, shift=0.5)
    # 0 up to the matrix square root's rounding, which scales with the covariance's trace (2e-8 at seed 204, d 5)
    assert frechet_distance_of(a, a) == pytest.approx(0.0, abs=1e-8 * (1 + float(a.var(0).sum())))
    assert frechet_distance_of(a, b) == pytest.approx(frechet_distance_of(b, a), rel=1e-6, abs=1e-9)
    assert frechet_distance_of(a, b) >= 0
    # invariant under a common translation and a common rotation of the feature space
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    moved = frechet_distance_of(a @ q + 3.0, b @ q + 3.0)
    assert moved == pytest.approx(frechet_distance_of(a, b), rel=1e-6, abs=1e-8)
    # equal covariances: the distance is the squared distance of the means
    shift = torch.linspace(-1, 1, d, dtype=torch.float64)
    assert frechet_distance_of(a, a + shift) == pytest.approx(float(shift.pow(2).sum()), rel=1e-6, abs=1e-8)


def test_frechet_grows_with_noise():
    a = _random_features(0, 400, 6)
    values = [frechet_distance_of(a, a + s * _random_features(1, 400, 6)) for s in (0.1, 0.5, 1.0, 2.0)]
    assert values == sorted(values) and values[0] > 0


def test_frechet_refuses_bad_features():
    with pytest.raises(ConfigError, match="N >= 2"):
        gaussian_stats(torch.zeros(1, 4))
    with pytest.raises(ConfigError, match="NaN"):
        gaussian_stats(torch.tensor([[0.0, 1.0], [float("nan"), 2.0], [1.0, 1.0]]))
    with pytest.raises(ConfigError, match="dimensions differ"):
        frechet_distance(gaussian_stats(torch.randn(5, 2)), gaussian_stats(torch.randn(5, 3)))


# ---------------------------------------------------------------------------------------------------------------
# Digits scorer


def test_inception_score_and_coverage_bounds():
    confident = torch.eye(10).repeat(5, 1)  # every class, fully confident
    assert inception_score(confident) == pytest.approx(10.0, rel=1e-6)
    assert class_coverage(confident) == 1.0
    assert inception_score(torch.full((50, 10), 0.1)) == pytest.approx(1.0)
    one_class = torch.zeros(50, 10)
    one_class[:, 3] = 1
    assert inception_score(one_class) == pytest.approx(1.0) and class_coverage(one_class) == pytest.approx(0.1)


def test_digits_classifier_accuracy_on_held_out_split():
    from cq.metrics.digits import digits_split

    scorer = DigitsScorer.embedded()
    _, _, test_x, test_y = digits_split(0)
    with torch.no_grad():
        accuracy = float((scorer.classifier(test_x).argmax(1) == test_y).double().mean())
    assert accuracy >= 0.97  # measured 0.989 (360 held-out digits)


def test_digits_fid_of_data_is_small_and_noise_is_large():
    from cq.models.train import digits_dataset

    scorer = DigitsScorer.embedded()
    data = digits_dataset(16)
    noisy = (data + 0.5 * torch.randn(data.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    assert scorer.fid(data) == pytest.approx(0.0, abs=1e-6)  # the stored statistics are those of the data
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    halves = scorer.fid(data[order[:900]], data[order[900:]])
    # measured: two random halves of the data 22.4, the data with noise of std 0.5 129 (feature units)
    assert scorer.fid(noisy) > 4 * halves


def test_classifier_training_is_reproducible(tmp_path):
    from cq.metrics.digits import train_digits_classifier

    a, acc_a = train_digits_classifier(tmp_path / "a.safetensors", epochs=1, progress=False)
    b, acc_b = train_digits_classifier(tmp_path / "b.safetensors", epochs=1, progress=False)
    from safetensors.torch import load_file

    ta, tb = load_file(str(a)), load_file(str(b))
    assert acc_a == acc_b and all(torch.equal(ta[k], tb[k]) for k in ta)


# ---------------------------------------------------------------------------------------------------------------
# evaluate


@pytest.fixture(scope="module")
def fitted(unet):
    trace = cq.trace(unet, steps=4, num_samples=4, seed=500, progress=False)
    return cq.quant_only("w8a8").fit(unet, trace, progress=False)


def test_per_sample_psnr_equals_sample_error():
    x, y = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    got = per_sample_psnr(x, y)
    for i in range(3):
        assert float(got[i]) == pytest.approx(sample_error(x[i : i + 1], y[i : i + 1])["psnr"], rel=1e-5)


def test_evaluate_statistics(unet, fitted):
    result = cq.evaluate(fitted, unet, seeds=range(0, 6), steps=4, batch_size=4, progress=False)
    assert result.num_samples == 6 and result.samples.shape == (6, 1, 16, 16)
    p = result.psnr_db
    assert result.min_db == float(p.min()) <= result.p5_db <= result.median_db
    assert result.fraction_below == float((p < 25).double().mean())
    assert result.max_abs_x0 == pytest.approx(float(result.samples.abs().max()))
    # per-sample: a sample depends on its seed only, not on the batch it was drawn in
    alone = cq.evaluate(fitted, unet, seeds=[3], steps=4, progress=False)

    # (up to float summation order, which batch size changes: exact to 1e-4 in full precision; in the quantized
    # model an order flip can move an activation code, measured 0.6% relative on this random-weight model)
    def rel(a, b):
        return float((a - b).norm() / b.norm())

    assert rel(alone.reference_samples[0], result.reference_samples[3]) < 1e-4
    assert rel(alone.samples[0], result.samples[3]) < 3e-2
    assert "held-out evaluation: 6 seeds" in result.summary() and "worst" in result.summary()


def test_evaluate_refuses_calibration_seeds(unet, fitted):
    assert fitted.calibration_seeds == (500, 501, 502, 503)
    with pytest.raises(CalibrationSeedsError, match="calibrate"):
        cq.evaluate(fitted, unet, seeds=[10, 502], steps=4, progress=False)


def test_evaluate_refuses_calibration_seeds_after_save_and_load(unet, fitted, tmp_path):
    loaded = cq.load(cq.save(fitted, tmp_path / "m.cq"))
    assert loaded.calibration_seeds == fitted.calibration_seeds
    with pytest.raises(CalibrationSeedsError):
        cq.evaluate(loaded, unet, seeds=[501], steps=4, progress=False)


def test_evaluate_bad_input(unet, fitted):
    with pytest.raises(ConfigError, match="at least one seed"):
        cq.evaluate(fitted, unet, seeds=[], steps=4)
    with pytest.raises(ConfigError, match="repeated"):
        cq.evaluate(fitted, unet, seeds=[1, 1], steps=4)
    with pytest.raises(ConfigError, match="batch_size"):
        cq.evaluate(fitted, unet, seeds=[1], steps=4, batch_size=0)
    with pytest.raises(StepCountMismatchError, match="fitted for 4"):
        cq.evaluate(fitted, unet, seeds=[1], steps=5)
    with pytest.raises(StepCountMismatchError, match="makes 5"):  # PLMS makes steps + 1 calls
        cq.evaluate(fitted, unet, plms, seeds=[1], steps=4)
    other_arch = tiny_unet(ch=64)
    with pytest.raises(ReferenceMismatchError, match="config"):
        cq.evaluate(fitted, other_arch, seeds=[1], steps=4)
    with pytest.raises(ReferenceMismatchError, match="other weights"):
        cq.evaluate(fitted, tiny_unet(seed=1), seeds=[1], steps=4)
    with pytest.raises(ReferenceMismatchError, match="full-precision cq UNet"):
        cq.evaluate(fitted, torch.nn.Identity(), seeds=[1], steps=4)


def test_evaluate_infers_steps_from_the_model(unet, fitted):
    result = cq.evaluate(fitted, unet, seeds=[7], progress=False)
    assert math.isfinite(result.mean_db) and result.num_samples == 1


def test_report_labels_teacher_forcing_and_prints_evaluation(unet, fitted):
    trace = cq.trace(unet, steps=4, num_samples=2, seed=900, progress=False)
    result = cq.evaluate(fitted, unet, seeds=[1, 2], steps=4, progress=False)
    text = cq.report(fitted, reference=unet, trace=trace, evaluation=result).summary()
    assert "teacher-forced per-step SQNR" in text and "held-out evaluation: 2 seeds" in text
    assert "teacher-forced" in cq.report(fitted, reference=unet, trace=trace).table()


def test_evaluate_reuses_reference_samples(unet, fitted):
    first = cq.evaluate(fitted, unet, seeds=[4, 5], steps=4, progress=False)
    again = cq.evaluate(fitted, unet, seeds=[4, 5], steps=4, reference_samples=first.reference_samples, progress=False)
    assert torch.equal(first.psnr_db, again.psnr_db) and again.reference_seconds is None
    with pytest.raises(ConfigError, match="one row per seed"):
        cq.evaluate(fitted, unet, seeds=[4, 5, 6], steps=4, reference_samples=first.reference_samples)


def test_a_trace_fits_only_the_model_it_was_recorded_from(unet):
    trace = cq.trace(unet, steps=4, num_samples=2, seed=700, progress=False)
    assert trace.base_fingerprint
    other = tiny_unet(seed=3)
    with pytest.raises(ReferenceMismatchError, match="trace was recorded from another model"):
        cq.quant_only("w8a8").fit(other, trace, progress=False)
    model = cq.quant_only("w8a8").fit(unet, trace, progress=False)
    with pytest.raises(ReferenceMismatchError, match="other weights"):
        cq.report(model, reference=other, trace=cq.trace(other, steps=4, num_samples=2, seed=701, progress=False))

"""The embedded demo model: it draws digits, compressed models hold the per-sample bounds on held-out seeds, and
CacheQuant's components rank on it as in the paper.

Quality is measured with `cq.evaluate`: end to end, per sample, on seeds the models were not calibrated on, with
the samplers' default ``clip_x0=False``. Thresholds come from runs of the committed weights (seed 0 training,
`cq train`); each assertion states the measured value it was derived from. CPU, a few minutes.
"""

from __future__ import annotations

import pytest
import torch

import cq
from cq.cache import DPS, UniformSchedule
from cq.cache.deepcache import DeepCache
from cq.calib.trace import seeded_noise
from cq.correct import CacheErrorCorrector, QuantErrorCorrector
from cq.fit.recipe import Recipe
from cq.metrics.error import per_sample_psnr
from cq.models.presets import sampling_defaults
from cq.quant import UniformQuantizer
from cq.sampling import FullPrecision, ddim


HELD_OUT = range(1000, 1064)  # evaluation seeds; calibration uses 10_000.. (cq.evaluate refuses overlaps)


@pytest.fixture(scope="module")
def demo():
    unet = cq.models.load("demo")
    steps, sampler = sampling_defaults(unet)
    assert sampler["clip_x0"] is False  # quality is measured on what the model produces, unclipped
    trace = cq.trace(
        unet, steps=steps, num_samples=32, points=[unet.default_cache_point()], seed=10_000, progress=False, **sampler
    )
    noise = seeded_noise(unet.sample_shape, range(32))
    reference = ddim(FullPrecision(unet), noise, steps=steps, **sampler)
    return unet, steps, sampler, trace, noise, reference


@pytest.fixture(scope="module")
def held_out_reference(demo):
    unet, steps, sampler, _, _, _ = demo
    return ddim(FullPrecision(unet), seeded_noise(unet.sample_shape, HELD_OUT), steps=steps, **sampler)


@pytest.fixture(scope="module")
def held_out(demo, held_out_reference):
    """``held_out(recipe or fitted model)``: fit a recipe on the demo trace; evaluate on the held-out seeds (full
    precision sampled once)."""
    unet, steps, sampler, trace, _, _ = demo

    def run(recipe_or_model):
        model = recipe_or_model
        if isinstance(recipe_or_model, Recipe):
            model = recipe_or_model.fit(unet, trace, progress=False)
        return cq.evaluate(
            model, unet, seeds=HELD_OUT, steps=steps, reference_samples=held_out_reference, progress=False, **sampler
        )

    return run


@pytest.fixture(scope="module")
def w4a8(demo):
    """W4A8 with its default GPTQ weight rounding, fitted once (GPTQ's extra replay is the slow part)."""
    unet, _, _, trace, _, _ = demo
    return cq.quant_only("w4a8").fit(unet, trace, progress=False)


def test_demo_samples_look_like_digits(demo):
    from cq.metrics.digits import DigitsScorer
    from cq.models.train import digits_dataset

    unet, steps, sampler, _, noise, samples = demo
    data = digits_dataset(unet.config.resolution).flatten(1)

    def nearest(x: torch.Tensor) -> torch.Tensor:  # MSE to the closest training digit, per sample
        return (torch.cdist(x.flatten(1), data) ** 2 / data.shape[1]).min(1).values

    untrained = ddim(FullPrecision(cq.models.build("demo", seed=1)), noise, steps=steps, **sampler)
    # measured: trained 0.038 (median), untrained model 1.32, clipped noise 0.90
    assert float(nearest(samples).median()) < 0.1
    assert float(nearest(untrained).median()) > 0.5 and float(nearest(noise.clamp(-1, 1)).median()) > 0.5
    # unclipped, the full-precision model stays near [-1, 1] here (measured max |x0| 1.16 on seeds 0..31; it
    # leaves [-1.5, 1.5] on 5 of 256 held-out seeds, README "Quality on held-out seeds")
    assert float(samples.abs().max()) <= 1.5
    _, probs = DigitsScorer.embedded().features_and_probs(samples)
    assert torch.bincount(probs.argmax(1), minlength=10).count_nonzero() >= 8  # measured: 10 of 10 classes


def test_w8a8_held_out_bounds(held_out):
    """The per-sample bounds, end to end on held-out seeds at clip_x0=False: no W8A8 sample below 25 dB."""
    result = held_out(cq.quant_only("w8a8"))
    # measured (64 seeds 1000..1063): mean 48.4, worst 28.6 dB, max |x0| 1.25 (full precision 1.26). Before the
    # fixes (quantized io layers, calibrated softmax range): 10 of 64 seeds 0..63 below 25 dB, max |x0| 49.
    # Over 1024 seeds 13 fall below 25 dB, most where full precision itself diverges (README).
    assert result.min_db >= 25.0, result.below()
    assert result.max_abs_x0 <= 1.5
    assert result.mean_db > 40


def test_cachequant_n5_held_out_bounds(held_out):
    """CacheQuant N=5 W8A8 is never more than 3 dB below the worst sample of full-precision DeepCache N=5."""
    deepcache = held_out(cq.deepcache(5))
    cachequant = held_out(cq.cachequant(5))
    # measured (64 seeds): DeepCache mean 30.8, worst 18.0; CacheQuant mean 35.2, worst 17.7; max |x0| 1.30
    assert cachequant.min_db >= deepcache.min_db - 3.0
    assert cachequant.max_abs_x0 <= 1.5
    assert cachequant.mean_db > deepcache.mean_db


def test_w4a8_gptq_held_out(held_out, w4a8):
    """W4A8 with its default GPTQ weight rounding (`cq.quant.gptq`) on held-out seeds, end to end."""
    result = held_out(w4a8)
    # measured (64 seeds 1000..1063): mean 39.6, worst 17.7 dB (seed 1016); round-to-nearest weights (CacheQuant's):
    # mean 26.4, worst 13.4. Over 256 seeds: mean 39.0 vs 26.0, 5th pct 27.7 vs 15.8, digits FID 29.0 vs 97.6.
    assert result.mean_db > 37
    assert result.min_db >= 15.0, result.below(15)  # the W4A8 bound
    assert result.max_abs_x0 <= 1.5


def test_w8a8_sqnr_and_w4a8_below_it(demo, w4a8):
    """Teacher-forced per-step SQNR (each step fed the full-precision x_t): W4A8 below W8A8, and GPTQ rounding of
    the 4-bit weights closes most of the gap that round-to-nearest leaves."""
    unet, _, _, trace, _, _ = demo
    w8 = cq.report(cq.quant_only("w8a8").fit(unet, trace, progress=False), reference=unet, trace=trace)
    w4 = cq.report(w4a8, reference=unet, trace=trace)
    nearest = Recipe(quantizer=UniformQuantizer(weight_bits=4, weight_rounding="nearest"))
    w4_nearest = cq.report(nearest.fit(unet, trace, progress=False), reference=unet, trace=trace)
    # measured: W8A8 40.3, W4A8 GPTQ 37.5, W4A8 round-to-nearest 31.0 dB
    assert w8.mean_sqnr_db > 30
    assert w4_nearest.mean_sqnr_db + 3 < w4.mean_sqnr_db < w8.mean_sqnr_db


def test_ablation_order_matches_cachequant(held_out):
    """At N=10 (5 of 50 full calls) on held-out seeds, full CacheQuant (DPS + DEC) has a lower x0 error than the
    naive combination and than DPS alone. Measured honestly the paper's middle step does not hold here: DPS
    alone *raises* the MSE over uniform (its mean PSNR rises, its worst samples fall; README ablation)."""
    quantizer = UniformQuantizer()

    def error(schedule, correctors=()) -> float:
        recipe = Recipe(cacher=DeepCache(schedule=schedule), quantizer=quantizer, correctors=correctors)
        result = held_out(recipe)
        return float((result.samples - result.reference_samples).pow(2).mean())

    naive = error(UniformSchedule(interval=10))
    dps = error(DPS(interval=10))
    cachequant = error(DPS(interval=10), (CacheErrorCorrector(), QuantErrorCorrector()))
    # measured (64 seeds): MSE naive 2.39e-2, + DPS 3.43e-2, CacheQuant 1.35e-2 (mean PSNR 23.4, 24.7, 28.1;
    # worst 13.5, 9.1, 15.1 dB)
    assert cachequant * 1.5 < naive
    assert cachequant * 1.5 < dps


def test_int8_samples_match_fake_quant(demo):
    unet, steps, sampler, trace, noise, _ = demo
    model = cq.cachequant(interval=5).fit(unet, trace, progress=False)
    fake = ddim(model, noise, steps=steps, **sampler)
    model.to_int8()
    real = ddim(model, noise, steps=steps, **sampler)
    # identical up to float summation order flipping an occasional activation code, which a sensitive seed
    # amplifies over 50 steps: measured per-sample median 52.4 dB, one of 32 seeds at 20.1 dB (AVX2, OpenVINO)
    per_sample = per_sample_psnr(real, fake)
    assert per_sample.median() > 45 and (per_sample < 35).sum() <= 2, per_sample


def test_cq_demo_times_each_row_on_the_path_it_names(tmp_path, capsys):
    """``cq demo``'s wall-clock column runs every quantized row on the fastest exact int8 path this machine has
    (the path is named in the table, and the quality beside it is measured on that same path)."""
    from cq.cli import main
    from cq.quant.int8 import int8_available
    from cq.runtime.openvino import openvino_available

    out = tmp_path / "demo.png"
    argv = ["demo", "-n", "4", "--steps", "10", "--calib", "2", "--interval", "2", "-o", str(out)]
    assert main(argv) == 0 and out.is_file()
    table = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("|")}
    assert "runs on" in rows["setting"] and "PyTorch fp32" in rows["DeepCache"]
    fast = "OpenVINO int8" if openvino_available() else "PyTorch int8" if int8_available() else "fake-quant"
    for label in ("W8A8", "DeepCache+W8A8 (naive)", "CacheQuant"):
        assert fast in rows[label], rows[label]

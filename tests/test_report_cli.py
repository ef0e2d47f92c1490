"""`report` figures and plot; the CLI's fit -> sample -> report round trip on the embedded demo model."""

from __future__ import annotations

import pytest

import cq
from cq.cli import main
from cq.metrics import predicted_speedup, unet_macs
from cq.recipe import Recipe, deepcache


STEPS = 6


@pytest.fixture(scope="module")
def trace(unet):
    return cq.trace(
        unet, steps=STEPS, num_samples=4, points=[unet.default_cache_point()], spacing="linspace", progress=False
    )


@pytest.fixture(scope="module")
def quantized(unet, trace):
    recipe = cq.naive(interval=3)
    recipe = Recipe(cacher=recipe.cacher, quantizer=cq.quant.Uniform(refresh_samples=4, cached_samples=2))
    return recipe.fit(unet, trace, progress=False)


def test_report_counts_steps_and_macs(unet, trace):
    model = deepcache(interval=3).fit(unet, trace, progress=False)
    rep = model.report()
    macs = unet_macs(unet, points=[model.cache.point])
    assert [s.refresh for s in rep.steps] == list(model.refresh_mask())
    assert all(s.macs == (macs["full"] if s.refresh else macs[model.cache.point]) for s in rep.steps)
    assert rep.mac_speedup == pytest.approx(
        predicted_speedup(macs["full"], macs[model.cache.point], model.refresh_mask())
    )
    assert all(s.sqnr_db is None for s in rep.steps) and rep.mean_sqnr_db is None


def test_report_sqnr_against_full_precision(unet, trace, quantized):
    rep = quantized.report(reference=unet, trace=trace)
    assert all(s.sqnr_db is not None for s in rep.steps)
    full_precision = deepcache(interval=1).fit(unet, trace, progress=False).report(reference=unet, trace=trace)
    assert all(s.sqnr_db == float("inf") for s in full_precision.steps)  # interval 1, FP: exact
    assert rep.quantized_layers > 0 and rep.model_bytes < rep.reference_bytes
    assert "fake quantization" in rep.summary() and "SQNR" in rep.summary()
    assert rep.table().count("\n") == STEPS + 1


def test_report_does_not_leave_a_stale_cache(unet, trace, quantized):
    quantized.report(reference=unet, trace=trace)
    assert quantized.cache._feature is None


def test_report_plot_writes_a_png(unet, trace, quantized, tmp_path):
    path = quantized.report(reference=unet, trace=trace).plot(tmp_path / "report.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_fit_sample_report(tmp_path, capsys):
    out = tmp_path / "demo.cq"
    assert (
        main(
            [
                "fit",
                "--model",
                "demo",
                "--recipe",
                "cachequant",
                "--interval",
                "2",
                "--steps",
                "10",
                "--samples",
                "4",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    assert out.exists()
    grid = tmp_path / "grid.png"
    assert main(["sample", str(out), "--num", "4", "-o", str(grid)]) == 0
    assert grid.read_bytes()[:4] == b"\x89PNG"
    assert main(["report", str(out), "--model", "demo", "--samples", "2", "--steps-table"]) == 0
    text = capsys.readouterr().out
    assert "refreshes" in text and "SQNR" in text and "| step |" in text


def test_cli_rejects_an_unknown_recipe():
    with pytest.raises(SystemExit):
        main(["fit", "--recipe", "nope", "-o", "x.cq"])

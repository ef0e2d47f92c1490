"""`report` figures and plot; the CLI's fit -> sample -> report round trip on the embedded demo model."""

from __future__ import annotations

import pytest

import cq
from cq.cli import main
from cq.fit.recipe import Recipe, deepcache
from cq.metrics import predicted_speedup, unet_macs


STEPS = 6


@pytest.fixture(scope="module")
def trace(unet):
    return cq.trace(
        unet, steps=STEPS, num_samples=4, points=[unet.default_cache_point()], spacing="linspace", progress=False
    )


@pytest.fixture(scope="module")
def quantized(unet, trace):
    recipe = cq.naive(interval=3)
    # symmetric 7-bit weights run on integer kernels on every x86 CPU (8-bit ones need VNNI on OpenVINO)
    quantizer = cq.quant.UniformQuantizer(weight_bits=7, weight_symmetric=True, refresh_samples=4, cached_samples=2)
    recipe = Recipe(cacher=recipe.cacher, quantizer=quantizer)
    return recipe.fit(unet, trace, progress=False)


def test_report_counts_steps_and_macs(unet, trace):
    model = deepcache(interval=3).fit(unet, trace, progress=False)
    rep = cq.report(model)
    macs = unet_macs(unet, points=[model.cache.point])
    assert [s.refresh for s in rep.steps] == list(model.refresh_mask())
    assert all(s.macs == (macs["full"] if s.refresh else macs[model.cache.point]) for s in rep.steps)
    assert rep.mac_speedup == pytest.approx(
        predicted_speedup(macs["full"], macs[model.cache.point], model.refresh_mask())
    )
    assert all(s.sqnr_db is None for s in rep.steps) and rep.mean_sqnr_db is None


def test_report_sqnr_against_full_precision(unet, trace, quantized):
    rep = cq.report(quantized, reference=unet, trace=trace)
    assert all(s.sqnr_db is not None for s in rep.steps)
    full_precision = cq.report(deepcache(interval=1).fit(unet, trace, progress=False), reference=unet, trace=trace)
    assert all(s.sqnr_db == float("inf") for s in full_precision.steps)  # interval 1, FP: exact
    assert rep.quantized_layers > 0 and rep.model_bytes < rep.reference_bytes
    assert "fake quantization" in rep.summary() and "SQNR" in rep.summary()
    assert rep.table().count("\n") == STEPS + 1


def test_report_does_not_leave_a_stale_cache(unet, trace, quantized):
    cq.report(quantized, reference=unet, trace=trace)
    assert quantized.cache._feature is None


def test_report_plot_writes_a_png(unet, trace, quantized, tmp_path):
    path = cq.report(quantized, reference=unet, trace=trace).plot(tmp_path / "report.png")
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
    assert main(["report", str(out), "--model", "demo", "--samples", "2", "--eval", "3", "--steps-table"]) == 0
    text = capsys.readouterr().out
    assert "refreshes" in text and "teacher-forced per-step SQNR" in text and "| step |" in text
    assert "held-out evaluation: 3 seeds (30000..30002)" in text and "worst" in text
    assert "full precision's stability" in text and "seeds unstable" in text


def test_cli_rejects_an_unknown_recipe():
    with pytest.raises(SystemExit):
        main(["fit", "--recipe", "nope", "-o", "x.cq"])


def test_cli_prints_a_cq_error_as_one_line_and_exits_2(tmp_path, capsys):
    missing = tmp_path / "missing.cq"
    assert main(["sample", str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cq sample: error:") and "no such file" in err and "Traceback" not in err
    assert len(err.splitlines()) == 1
    with pytest.raises(cq.errors.CheckpointFormatError):
        main(["--debug", "sample", str(missing)])


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--steps", "0"],
        ["demo", "--num", "0"],
        ["demo", "--num", "-3"],
        ["demo", "--scale", "0"],
        ["demo", "--threads", "-1"],
        ["fit", "--steps", "-5", "-o", "x.cq"],
        ["fit", "--samples", "0", "-o", "x.cq"],
        ["sample", "x.cq", "--num", "zero"],
        ["train", "--batch-size", "0"],
        ["train", "--steps", "-1"],
        ["train", "--lr", "0"],
        ["report", "x.cq", "--eval", "-1"],
        ["report", "x.cq", "--stability", "-0.01"],
        ["report", "x.cq", "--stability", "nan"],
    ],
)
def test_cli_refuses_bad_numbers_at_parse_time(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and ("must be" in err or "expected" in err)


def test_sampling_defaults_and_train_config_refuse_bad_values(unet):
    from cq.models.presets import sampling_defaults
    from cq.models.train import TrainConfig

    with pytest.raises(cq.errors.ConfigError, match="steps"):
        sampling_defaults(unet, 0)
    for bad in ({"steps": -1}, {"batch_size": 0}, {"lr": 0.0}, {"ema_decay": 1.0}, {"save_every": 0}):
        with pytest.raises(cq.errors.ConfigError):
            TrainConfig(**bad)


def test_cli_fit_checks_the_output_before_fitting(tmp_path, capsys):
    assert main(["fit", "--model", "demo", "--steps", "4", "-o", str(tmp_path)]) == 2  # a directory
    assert "cannot write" in capsys.readouterr().err
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    assert main(["fit", "--model", "demo", "--steps", "4", "-o", str(a_file / "m.cq")]) == 2  # under a file
    assert "cannot write" in capsys.readouterr().err


def test_report_describes_any_quantizer_subclass(unet, trace):
    """A user's Quantizer need not have weight_bits / act_bits: report() names it by class."""
    from dataclasses import dataclass

    from cq.calib.replay import every_step
    from cq.quant import Quantizer
    from cq.quant.spec import QuantSpec
    from cq.registry import QUANTIZERS

    @QUANTIZERS.register("test_eight_bit_everywhere")  # Recipe refuses unregistered strategies
    @dataclass(frozen=True, kw_only=True)
    class EightBitEverywhere(Quantizer):
        include: tuple[str, ...] = ("*",)
        skip: tuple[str, ...] = ()

        def specs(self, name, module):
            return QuantSpec(bits=8, per_channel=True), QuantSpec(bits=8, per_step=True)

        def calibration_batches(self, trace, mask, source):
            return every_step(mask, source, 2, trace.x.shape[1])

    model = Recipe(quantizer=EightBitEverywhere()).fit(unet, trace, progress=False)
    assert "EightBitEverywhere" in cq.report(model).summary()


def test_report_on_int8_models_counts_the_same_macs_and_labels_the_kernels(unet, trace, quantized):
    """Converted layers count their MACs (they counted 0: ZeroDivisionError) and the summary says
    which quantized layers run on integer kernels."""
    import copy

    before = cq.report(quantized)
    converted = copy.deepcopy(quantized)
    execution = converted.to_int8()
    after = cq.report(converted)
    assert after.total_macs == before.total_macs and after.full_macs == before.full_macs
    integer = sum(mode.startswith("int8") for mode in execution.values())
    assert after.integer_layers == integer > 0 and before.integer_layers == 0
    assert f"{integer} on integer kernels" in after.summary()


@pytest.mark.parametrize("preset", ["tiny-sd", "tiny-ldm-cin"])
def test_report_runs_on_conditional_unets_without_a_trace(preset):
    """MACs of a conditional UNet are counted with an example conditioning (they raised
    InputShapeError without one)."""
    from cq.models.loading import build

    unet = build(preset, seed=0).eval()
    model = cq.CompressedUNet(unet, num_steps=4, cacher=deepcache(interval=2).cacher.fit(unet, None))
    rep = cq.report(model)
    assert rep.full_macs > 0 and rep.mac_speedup > 1
    assert unet.example_cond(2).shape[0] == 2


def test_cli_fit_with_int8_backend_saves_samples_and_reports(tmp_path, capsys):
    """The README's `cq fit --backend int8 -o out.cq` exits 0, and the saved model samples and reports
    on integer kernels."""
    out = tmp_path / "int8.cq"
    argv = ["fit", "--model", "demo", "--recipe", "cachequant", "--steps", "4", "--interval", "2"]
    assert main([*argv, "--samples", "2", "--backend", "int8", "-o", str(out)]) == 0
    assert "on integer kernels" in capsys.readouterr().out
    assert main(["sample", str(out), "--num", "1", "-o", str(tmp_path / "g.png")]) == 0
    assert main(["report", str(out), "--eval", "0"]) == 0
    assert "on integer kernels" in capsys.readouterr().out

"""The extension story: docs/extending.md runs as written; Recipe is open to user strategies; plugins load."""

from __future__ import annotations

import re
import shlex
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest

import cq
from cq.cache import DeepCache, Schedule
from cq.cache.schedule import check_mask
from cq.cli import main
from cq.correct import Corrector, Stage
from cq.errors import ConfigError, PluginError, StrategyNotRegisteredError
from cq.models import MODEL_FAMILIES
from cq.registry import CORRECTORS, QUANTIZERS, SCHEDULES, from_dict, to_dict


DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"
FENCE = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```", re.S | re.M)


def test_extending_md_runs_as_written(tmp_path, monkeypatch, capsys):
    """Every block of docs/extending.md, in order: the module file is written and imported as a plugin, the
    Python blocks run in one namespace, each `cq ...` line of the shell block runs through the CLI (exit 0)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    namespace: dict = {"__name__": "extending_doc"}
    blocks = FENCE.findall(DOC.read_text())
    kinds = [(lang, info.strip()) for lang, info, _ in blocks]
    assert ("python", "my_strategies.py") in kinds and ("python", "my_unet.py") in kinds and ("bash", "") in kinds
    registries = [SCHEDULES, QUANTIZERS, CORRECTORS]
    before = [dict(r._classes) for r in registries]
    families = MODEL_FAMILIES.names()
    try:
        for lang, info, body in blocks:
            info = info.strip()
            if lang == "python" and info:
                (tmp_path / info).write_text(body)
            elif lang == "python":
                exec(compile(body, f"{DOC.name}:block", "exec"), namespace)  # noqa: S102 - the doc's own code
            elif lang == "bash":
                for line in body.strip().splitlines():
                    argv = shlex.split(line)
                    assert argv[0] == "cq"
                    assert main(argv[1:]) == 0, line
        out = capsys.readouterr().out
        assert "warmup (my_strategies.WarmupSchedule)" in out  # `cq strategies` lists the plugin's schedule
        assert "SCHEDULES.register('unregistered')" in out  # the refusal printed its fix
        assert (tmp_path / "cli.cq").exists() and (tmp_path / "cli2.cq").exists() and (tmp_path / "cli.png").exists()
        model = namespace["model"]
        assert model.refresh_mask() == (True, True, True, False, False, False, True, False, False, False)
        assert namespace["again"].recipe == model.recipe
        assert type(namespace["back"].unet).__qualname__ == "MyUNet" and "my-unet" in MODEL_FAMILIES
    finally:
        for module in ("my_strategies", "my_unet"):  # forget the plugins and what they registered
            sys.modules.pop(module, None)
        for registry, classes in zip(registries, before, strict=True):
            registry._classes = classes
        for name in set(MODEL_FAMILIES.names()) - set(families):
            MODEL_FAMILIES.unregister(name)


# ------------------------------------------------------------------------------------------------------------
# Recipe dispatches on declarations, never on classes

EVENTS: list[str] = []


@SCHEDULES.register("test_every_step")
@dataclass(frozen=True, kw_only=True)
class _EveryOther(Schedule):
    def refresh_mask(self, num_steps):
        return check_mask(tuple(i % 2 == 0 for i in range(num_steps)), num_steps, self)


@CORRECTORS.register("test_early_probe")
@dataclass(frozen=True, kw_only=True)
class _EarlyProbe(Corrector):
    """A user's cache corrector: must be fitted before the quantizer calibrates."""

    stage: ClassVar[Stage] = Stage.BEFORE_QUANTIZATION

    def attach(self, model):
        pass

    def fit(self, model, reference, trace, *, progress=False):
        EVENTS.append("early corrector: " + ("quantized" if cq.quant.quantized_modules(model.unet) else "float"))


@CORRECTORS.register("test_late_probe")
@dataclass(frozen=True, kw_only=True)
class _LateProbe(Corrector):
    needs_quantizer: ClassVar[bool] = True

    def attach(self, model):
        pass

    def fit(self, model, reference, trace, *, progress=False):
        EVENTS.append("late corrector: " + ("quantized" if cq.quant.quantized_modules(model.unet) else "float"))


def test_recipe_orders_user_correctors_by_their_declared_stage(unet, monkeypatch):
    recipe = cq.Recipe(
        cacher=DeepCache(schedule=_EveryOther()),
        quantizer=cq.quant.UniformQuantizer(refresh_samples=2, cached_samples=2),
        correctors=(_LateProbe(), _EarlyProbe()),  # listed late first: the stage decides, not the order
    )
    trace = cq.trace(unet, steps=4, num_samples=2, seed=900, points=recipe.points(unet), progress=False)
    original = cq.quant.UniformQuantizer.calibrate

    def calibrate(self, *args, **kwargs):
        EVENTS.append("calibrate")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cq.quant.UniformQuantizer, "calibrate", calibrate)
    EVENTS.clear()
    recipe.fit(unet, trace, progress=False)
    assert EVENTS == ["early corrector: float", "calibrate", "late corrector: quantized"]


def test_recipe_checks_declared_requirements():
    with pytest.raises(ConfigError, match="_LateProbe corrects quantization error"):
        cq.Recipe(cacher=DeepCache(schedule=_EveryOther()), correctors=(_LateProbe(),))
    with pytest.raises(ConfigError, match="_EarlyProbe corrects cached features"):
        cq.Recipe(quantizer=cq.quant.UniformQuantizer(), correctors=(_EarlyProbe(),))


def test_unregistered_strategies_are_refused_when_the_recipe_is_built():
    @dataclass(frozen=True, kw_only=True)
    class Mine(_EveryOther):  # a subclass of a registered class is not registered itself
        pass

    with pytest.raises(StrategyNotRegisteredError, match=r"@cq\.registry\.SCHEDULES\.register\('mine'\)"):
        cq.Recipe(cacher=DeepCache(schedule=Mine()))

    @dataclass(frozen=True, kw_only=True)
    class MyCorrector(_EarlyProbe):
        pass

    with pytest.raises(StrategyNotRegisteredError, match=r"CORRECTORS\.register"):
        cq.Recipe(cacher=DeepCache(schedule=_EveryOther()), correctors=(MyCorrector(),))


# ------------------------------------------------------------------------------------------------------------
# plugins

PLUGIN = textwrap.dedent(
    """
    from dataclasses import dataclass

    from cq.cache import Schedule
    from cq.registry import SCHEDULES


    @SCHEDULES.register("{name}")
    @dataclass(frozen=True, kw_only=True)
    class Plugged(Schedule):
        interval: int = 2

        def refresh_mask(self, num_steps):
            return tuple(i % self.interval == 0 for i in range(num_steps))
    """
)


@pytest.fixture
def isolated_schedules(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(tmp_path))
    before = dict(SCHEDULES._classes)
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("cq_test_plugin_")]:
        del sys.modules[name]
    SCHEDULES._classes = before


def test_unknown_schedule_error_names_the_plugin_options():
    with pytest.raises(StrategyNotRegisteredError) as info:
        from_dict({"kind": "schedule", "type": "no_such_schedule", "version": 1})
    message = str(info.value)
    assert "--plugin" in message and "cq.strategies" in message and "SCHEDULES.register('no_such_schedule')" in message


def test_cli_plugin_option_registers_the_module(isolated_schedules, capsys):
    (isolated_schedules / "cq_test_plugin_a.py").write_text(PLUGIN.format(name="plugged_a"))
    assert "plugged_a" not in SCHEDULES
    assert main(["--plugin", "cq_test_plugin_a", "strategies"]) == 0
    assert "plugged_a (cq_test_plugin_a.Plugged)" in capsys.readouterr().out
    assert main(["--plugin", "cq_test_no_such_module", "strategies"]) == 2
    assert "cannot import plugin module 'cq_test_no_such_module'" in capsys.readouterr().err


def test_entry_point_plugins_load_when_a_saved_name_is_unknown(isolated_schedules):
    """A package publishing `cq.strategies` entry points is imported when a recipe names what nobody registered."""
    root = isolated_schedules
    (root / "cq_test_plugin_b.py").write_text(PLUGIN.format(name="plugged_b"))
    dist = root / "cq_test_plugin_b-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: cq-test-plugin-b\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[cq.strategies]\nplugged_b = cq_test_plugin_b\n")
    assert "plugged_b" not in SCHEDULES._classes
    schedule = from_dict({"kind": "schedule", "type": "plugged_b", "version": 1, "interval": 3})
    assert type(schedule).__module__ == "cq_test_plugin_b" and schedule.refresh_mask(4) == (True, False, False, True)
    assert to_dict(schedule)["type"] == "plugged_b"


def test_broken_entry_point_is_a_plugin_error(isolated_schedules):
    dist = isolated_schedules / "cq_test_broken-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: cq-test-broken\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[cq.strategies]\nbroken = cq_test_missing_module_xyz\n")
    with pytest.raises(PluginError, match="'broken'"):
        from_dict({"kind": "schedule", "type": "still_unknown", "version": 1})


# ------------------------------------------------------------------------------------------------------------
# public names


def test_the_two_uniforms_have_distinct_names_and_old_names_warn():
    from cq.cache import UniformSchedule
    from cq.quant import UniformQuantizer

    assert UniformSchedule.registry_name == UniformQuantizer.registry_name == "uniform"  # saved files unchanged
    with pytest.warns(DeprecationWarning, match="cq.cache.UniformSchedule"):
        assert cq.cache.Uniform is UniformSchedule
    with pytest.warns(DeprecationWarning, match="cq.quant.UniformQuantizer"):
        assert cq.quant.Uniform is UniformQuantizer
    with pytest.raises(AttributeError):
        cq.cache.NoSuchName  # noqa: B018


@pytest.mark.parametrize(
    ("package", "names"),
    [
        ("cq", ["save", "load", "report", "evaluate", "trace", "Recipe", "CompressedUNet"]),
        ("cq.cache", ["Cacher", "DeepCache", "FeatureCache", "Schedule", "UniformSchedule", "Power", "DPS"]),
        ("cq.quant", ["Quantizer", "UniformQuantizer", "PTQ4DM", "QuantSpec", "qparams", "fake_quantize", "Backend"]),
        ("cq.correct", ["Corrector", "Stage", "CacheErrorCorrector", "QuantErrorCorrector", "ChannelAffine"]),
        ("cq.sampling", ["ddim", "plms", "seeded_noise", "SamplerModel", "FullPrecision", "SamplerSettings"]),
        ("cq.models", ["CacheableUNet", "check_cacheable", "LatentDiffusion", "ClassifierFreeGuidance"]),
        ("cq.registry", ["SCHEDULES", "CACHERS", "QUANTIZERS", "CORRECTORS", "check_registered"]),
    ],
)
def test_public_pieces_are_importable_from_their_package(package, names):
    import importlib

    module = importlib.import_module(package)
    missing = [n for n in names if n not in getattr(module, "__all__", ())]
    assert not missing, f"{package}.__all__ lacks {missing}"
    for name in names:
        assert getattr(module, name) is not None


@pytest.mark.parametrize(
    "data",
    [
        [],
        {"kind": "recipe"},
        {"type": "uniform"},
        {"kind": 1, "type": "uniform"},
        {"kind": "schedule", "type": "uniform", "version": "1"},
    ],
)
def test_malformed_strategy_json_is_a_config_error(data):
    with pytest.raises(ConfigError, match="kind|version"):
        from_dict(data)

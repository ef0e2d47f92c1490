"""The package layout: the module paths of the previous release are the modules they name now (with a
`FutureWarning` naming the path to use), cq's root holds few modules, no module is over 600 lines, and the
imports that run when cq is imported make no circle between its subpackages and root modules."""

from __future__ import annotations

import ast
import graphlib
import importlib
import sys
import types
from pathlib import Path

import pytest

import cq
from cq._moved import MOVED


PACKAGE = Path(cq.__file__).parent
MAX_ROOT_MODULES = 10
MAX_LINES = 600


@pytest.mark.parametrize("old", sorted(MOVED))
def test_a_former_path_is_the_module_it_names_now_and_warns(old):
    new = importlib.import_module(MOVED[old])
    sys.modules.pop(old, None)
    with pytest.warns(FutureWarning, match=rf"{old} is now {MOVED[old]}"):
        module = importlib.import_module(old)
    assert module is new
    assert sys.modules[old] is new


def test_importing_a_former_path_keeps_the_functions_of_its_name():
    for old in ("cq.trace", "cq.choose_point"):
        sys.modules.pop(old, None)
        with pytest.warns(FutureWarning):
            importlib.import_module(old)
    assert isinstance(cq.trace, types.FunctionType) and cq.trace.__module__ == "cq.calib.trace"
    assert isinstance(cq.choose_point, types.FunctionType) and cq.choose_point.__module__ == "cq.fit.choose_point"


def test_names_from_former_paths(monkeypatch):
    monkeypatch.delitem(sys.modules, "cq.rollout", raising=False)
    monkeypatch.delattr(cq, "rollout", raising=False)
    sys.modules.pop("cq.recipe", None)
    with pytest.warns(FutureWarning, match="cq.fit.recipe"):
        from cq.recipe import Recipe
    assert Recipe is cq.Recipe
    with pytest.warns(FutureWarning, match="cq.fit.rollout"):
        rollout = cq.rollout  # a former submodule as an attribute, without an import
    assert rollout is cq.fit.rollout
    with pytest.warns(FutureWarning, match="cq.fit.BudgetCache"):
        from cq.cache import BudgetCache
    assert BudgetCache is cq.fit.BudgetCache
    with pytest.raises(AttributeError):
        cq.no_such_module  # noqa: B018


def test_paths_that_became_packages_keep_their_names():
    from cq.cli import build_parser, build_report, main
    from cq.diffusers import (
        DiffusersUNet2DAdapter,
        DiffusersUNetAdapter,
        compress,
        convert_unet,
        denoise,
        load,
        restore,
        save,
        scheduler_settings,
    )
    from cq.report import Report, StepReport, print_table, report, tensor_bytes

    assert callable(main) and callable(build_parser) and callable(build_report)
    assert report is cq.report and Report is cq.Report and callable(print_table) and callable(tensor_bytes)
    assert StepReport.__module__ == "cq.report.summary"
    for obj in (DiffusersUNetAdapter, DiffusersUNet2DAdapter, compress, convert_unet, denoise, load, restore, save):
        assert obj.__module__.startswith("cq.diffusers.")
    assert callable(scheduler_settings)


def test_the_root_holds_few_modules():
    root = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(root) <= MAX_ROOT_MODULES, root


def test_no_module_is_over_600_lines():
    long = {
        str(p.relative_to(PACKAGE.parent)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not long, long


def _unit(module: str) -> str:
    """``cq.fit.recipe`` -> ``fit``: the subpackage or root module an import lands in."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "cq"


def test_import_time_imports_make_no_circle_between_subpackages():
    """Module-level imports only: those inside functions or under ``TYPE_CHECKING`` do not run at import time."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        package = parts[:-1]
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if not isinstance(node, ast.ImportFrom) or not node.level:
                continue
            base = package[: len(package) - (node.level - 1)]
            if node.module:
                targets = [".".join([*base, node.module])]
            else:
                targets = [".".join([*base, alias.name]) for alias in node.names]
            for target in targets:
                if _unit(target) not in (_unit(module), "cq"):
                    graph.setdefault(_unit(module), set()).add(_unit(target))
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as e:
        pytest.fail(f"import-time circle between cq's parts: {' -> '.join(e.args[1])}")


def test_warnings_name_the_line_that_uses_the_former_name():
    with pytest.warns(FutureWarning) as moved:
        cq.cache.BudgetCache  # noqa: B018
    with pytest.warns(DeprecationWarning) as renamed:
        cq.cache.Uniform  # noqa: B018
    assert moved[0].filename == renamed[0].filename == __file__

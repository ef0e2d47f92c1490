"""Module paths of the previous release, importable for one more: ``import cq.trace`` gives `cq.calib.trace` (the
same module object) with a `FutureWarning` that names the path to use.

A meta-path finder answers only for the paths in `MOVED`, ahead of the others (a stale file at a former path, left
by an older install, is never imported), and imports the module a path names only when that path is imported;
``import cq`` installs it and imports nothing more.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings
from collections.abc import Callable
from typing import Any


__all__ = ["MOVED", "install", "package_getattr"]

MOVED: dict[str, str] = {
    "cq.models.unet": "cq.core.unet",
    "cq.cache.view": "cq.core.view",
    "cq.step": "cq.core.step",
    "cq.trace": "cq.calib.trace",
    "cq.replay": "cq.calib.replay",
    "cq.recipe": "cq.fit.recipe",
    "cq.rollout": "cq.fit.rollout",
    "cq.choose_point": "cq.fit.choose_point",
    "cq.budget": "cq.fit.budget",
    "cq.cache.budget_cache": "cq.fit.budget_cache",
    "cq.viz": "cq.report.viz",
    "cq.cli_eval": "cq.cli.eval",
    "cq.cli_models": "cq.cli.models",
    "cq.reproduce": "cq.cli.reproduce",
    "cq.train": "cq.models.train",
}


def _warn(old: str, new: str, what: str = "module") -> None:
    # stacklevel 3: past this function and its caller; the import machinery's own frames are skipped by `warnings`
    warnings.warn(
        f"the {what} {old} is now {new}: import it from there ({old} is removed in the next release)",
        FutureWarning,
        stacklevel=3,
    )


class _Alias(importlib.abc.Loader):
    """Loads a former path as the module it names now: the module object itself, under both names."""

    def __init__(self, new: str) -> None:
        self.new = new

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        _warn(spec.name, self.new)
        return importlib.import_module(self.new)

    def exec_module(self, module: types.ModuleType) -> None:
        """Nothing to run: the module ran under its own name."""


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        new = MOVED.get(fullname)
        return None if new is None else importlib.util.spec_from_loader(fullname, _Alias(new))


class _Package(types.ModuleType):
    """A package whose public functions share a former submodule's name (``cq.trace``, the function, and the
    module path ``cq.trace``): importing the path does not rebind the function to the module."""

    def __setattr__(self, name: str, value: Any) -> None:
        if (
            isinstance(value, types.ModuleType)
            and MOVED.get(f"{self.__name__}.{name}") == value.__name__
            and not isinstance(self.__dict__.get(name, value), types.ModuleType)
        ):
            return
        super().__setattr__(name, value)


def install(package: str) -> None:
    """Make the former paths importable (once per process) and keep ``package``'s own names bound."""
    if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
    sys.modules[package].__class__ = _Package


def package_getattr(
    package: str, names: dict[str, str] | None = None, fallback: Callable[[str], Any] | None = None
) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``: a former submodule as an attribute (``cq.recipe``: the module
    it names now, with the warning of its import), and ``names`` that are defined elsewhere now
    (``{"BudgetCache": "cq.fit"}``, with a `FutureWarning` naming that module); any other name goes to
    ``fallback``, or is an `AttributeError`."""
    names = names or {}

    def __getattr__(name: str) -> Any:
        old = f"{package}.{name}"
        if old in MOVED:
            if old not in sys.modules:
                _warn(old, MOVED[old])
                sys.modules[old] = importlib.import_module(MOVED[old])
            return sys.modules[old]
        if name in names:
            _warn(f"{package}.{name}", f"{names[name]}.{name}", "name")
            return getattr(importlib.import_module(names[name]), name)
        if fallback is not None:
            return fallback(name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__

"""Strategies defined outside cq: plugin modules and the ``cq.strategies`` entry-point group.

A plugin is any importable module whose import registers strategies (``@cq.registry.SCHEDULES.register(...)``
and the other registries). Two ways to make cq import it:

* explicitly: ``cq --plugin my_package.strategies fit ...`` / `load_plugin` from Python;
* installed: a package declares it in ``pyproject.toml``::

      [project.entry-points."cq.strategies"]
      my_strategies = "my_package.strategies"

  and cq imports every such module when a saved recipe or the command line names a strategy it does not know
  (`load_entry_points`; `cq.registry.Registry.get` calls it before giving up), and before ``cq strategies``.

Nothing is imported when cq itself is imported.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from .errors import PluginError


__all__ = ["ENTRY_POINT_GROUP", "load_plugin", "load_entry_points"]

ENTRY_POINT_GROUP = "cq.strategies"


def load_plugin(module: str) -> None:
    """Import ``module`` (a dotted name on ``sys.path``) so that the strategies it registers are known."""
    try:
        importlib.import_module(module)
    except ImportError as e:
        raise PluginError(
            f"cannot import plugin module {module!r} ({e}); it must be importable from the current "
            "environment (pip install it, or put its folder on PYTHONPATH)"
        ) from None


def load_entry_points() -> list[str]:
    """Import every module published under the ``cq.strategies`` entry-point group; returns their names."""
    names = []
    for point in entry_points(group=ENTRY_POINT_GROUP):
        try:
            point.load()
        except Exception as e:  # a broken third-party package: say which one
            raise PluginError(
                f"the {ENTRY_POINT_GROUP!r} entry point {point.name!r} ({point.value}) failed to import: "
                f"{type(e).__name__}: {e}"
            ) from None
        names.append(point.name)
    return names

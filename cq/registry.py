"""Per-kind registries of strategies, used for `to_dict` / `from_dict`, the CLI and test sweeps.

Python users never need a registry: they construct strategies directly (``UniformSchedule(interval=5)``). A
registry maps the names found in saved recipes and on the command line back to classes. Registration is
explicit and greppable::

    @SCHEDULES.register("uniform")
    @dataclass(frozen=True, kw_only=True)
    class UniformSchedule(Schedule): ...

Serialised form: ``{"kind": "schedule", "type": "uniform", "version": 1, **fields}``; nested strategies are
serialised recursively, tuples become lists and come back as tuples.
"""

from __future__ import annotations

import dataclasses
import enum
import typing
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

from .errors import ConfigError, StrategyNotRegisteredError


__all__ = [
    "Registry",
    "to_dict",
    "from_dict",
    "registry",
    "SCHEDULES",
    "CACHERS",
    "QUANTIZERS",
    "CORRECTORS",
    "RECIPES",
    "check_registered",
    "deprecated_names",
]

T = TypeVar("T", bound=type)


class Registry:
    """A name -> class table for one kind of strategy (schedule, cacher, quantizer, corrector, ...).

    ``variable`` is the name users import it by (``SCHEDULES``); errors name it in the fix they suggest."""

    def __init__(self, kind: str, variable: str | None = None):
        self.kind = kind
        self.variable = variable or f"{kind.upper()}S"
        self._classes: dict[str, type] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Class decorator adding ``cls`` under ``name``; a duplicate name raises."""

        def add(cls: T) -> T:
            if name in self._classes and self._classes[name] is not cls:
                raise ConfigError(
                    f"{self.kind} name {name!r} is already registered by {self._classes[name].__qualname__}"
                )
            if not dataclasses.is_dataclass(cls):
                raise ConfigError(f"{cls.__qualname__} must be a dataclass to be registered as a {self.kind}")
            self._classes[name] = cls
            cls.registry_kind = self.kind
            cls.registry_name = name
            return cls

        return add

    def get(self, name: str) -> type:
        """The class registered as ``name``; installed plugins (`cq.plugins`) are imported before giving up."""
        if name not in self._classes:
            from .plugins import load_entry_points

            load_entry_points()
        try:
            return self._classes[name]
        except KeyError:
            raise StrategyNotRegisteredError(
                f"unknown {self.kind} {name!r}; registered: {sorted(self._classes)}. A {self.kind} defined outside "
                f"cq is registered with @cq.registry.{self.variable}.register({name!r}) in a module that cq imports: "
                "pass it as --plugin MODULE on the command line, or publish it under the 'cq.strategies' "
                "entry-point group"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._classes)

    def classes(self) -> list[type]:
        return [self._classes[n] for n in self.names()]

    def __contains__(self, name: str) -> bool:
        return name in self._classes


SCHEDULES = Registry("schedule")
CACHERS = Registry("cacher")
QUANTIZERS = Registry("quantizer")
CORRECTORS = Registry("corrector")
RECIPES = Registry("recipe")
_BY_KIND = {r.kind: r for r in (SCHEDULES, CACHERS, QUANTIZERS, CORRECTORS, RECIPES)}


def registry(kind: str) -> Registry:
    """The registry of one kind ("schedule", "cacher", "quantizer", "corrector", "recipe")."""
    try:
        return _BY_KIND[kind]
    except KeyError:
        raise StrategyNotRegisteredError(f"unknown strategy kind {kind!r}; known: {sorted(_BY_KIND)}") from None


def check_registered(obj: Any) -> None:
    """Raise `StrategyNotRegisteredError` unless ``obj`` and every strategy nested in its fields are registered
    (an unregistered one could be fitted but never saved or reloaded)."""
    cls = type(obj)
    if "registry_name" not in cls.__dict__:
        kind = getattr(cls, "registry_kind", None)  # declared by each strategy base class (Schedule, ...)
        fix = (
            f"register it: @cq.registry.{_BY_KIND[kind].variable}.register('{cls.__name__.lower()}') above "
            f"its @dataclass"
            if kind in _BY_KIND
            else "strategies are dataclasses registered with @cq.registry.<KIND>.register(name)"
        )
        raise StrategyNotRegisteredError(
            f"{cls.__qualname__} is not a registered {kind or 'strategy'} (a subclass of a registered class is not "
            f"registered itself); {fix}, so that fitted models using it can be saved and loaded"
        )
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        for item in value if isinstance(value, tuple | list) else (value,):
            if dataclasses.is_dataclass(item) and not isinstance(item, type) and hasattr(item, "registry_kind"):
                check_registered(item)


def to_dict(obj: Any) -> dict[str, Any]:
    """Serialise a registered strategy (recursively) to plain JSON-able data."""
    cls = type(obj)
    if "registry_name" not in cls.__dict__:  # a subclass of a registered class is not registered itself
        raise ConfigError(f"{cls.__qualname__} is not a registered strategy; register it to serialise it")
    out: dict[str, Any] = {"kind": cls.registry_kind, "type": cls.registry_name, "version": getattr(cls, "VERSION", 1)}
    for f in dataclasses.fields(obj):
        if f.init:
            out[f.name] = _encode(getattr(obj, f.name))
    return out


def from_dict(data: dict[str, Any]) -> Any:
    """Inverse of `to_dict`. Unknown names raise `StrategyNotRegisteredError`, unknown fields `ConfigError`."""
    if not isinstance(data, dict) or not isinstance(data.get("kind"), str) or not isinstance(data.get("type"), str):
        raise ConfigError(
            'a serialised strategy is a JSON object with string "kind" and "type" fields (cq.registry.to_dict), '
            f"got {data!r:.200}"
        )
    data = dict(data)
    kind, name, version = data.pop("kind"), data.pop("type"), data.pop("version", 1)
    if isinstance(version, bool) or not isinstance(version, int):
        raise ConfigError(f"{kind} {name!r}: version must be an integer, got {version!r}")
    cls = registry(kind).get(name)
    if version > getattr(cls, "VERSION", 1):
        raise ConfigError(
            f"{kind} {name!r} was saved by a newer cq (version {version} > {getattr(cls, 'VERSION', 1)})"
        )
    if version < getattr(cls, "VERSION", 1) and hasattr(cls, "upgrade"):
        data = cls.upgrade(data, version)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{kind} {name!r} has no field(s) {unknown}; known fields: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _decode(v, hints.get(k)) for k, v in data.items()})


def _encode(value: Any) -> Any:
    if "registry_name" in type(value).__dict__ and dataclasses.is_dataclass(value):
        return to_dict(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple | list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    return value


def _decode(value: Any, hint: Any) -> Any:
    if isinstance(value, dict) and "kind" in value and "type" in value:
        return from_dict(value)
    if isinstance(value, list):
        items = [_decode(v, _item_hint(hint)) for v in value]
        return tuple(items) if _wants_tuple(hint) else items
    enum_type = _enum_in(hint)
    if enum_type is not None and not isinstance(value, enum.Enum):
        return enum_type(value)
    return value


def _enum_in(hint: Any) -> type[enum.Enum] | None:
    """The Enum class in ``hint`` (``Mode`` or ``Mode | None``), if any."""
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return hint
    for arg in typing.get_args(hint):
        if isinstance(arg, type) and issubclass(arg, enum.Enum):
            return arg
    return None


def _wants_tuple(hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin is tuple:
        return True
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_wants_tuple(a) for a in typing.get_args(hint))
    return hint is tuple or origin is None and hint is not list


def _item_hint(hint: Any) -> Any:
    args = typing.get_args(hint)
    return args[0] if args else None


def deprecated_names(module: str, renamed: dict[str, type], *, stacklevel: int = 2) -> Callable[[str], type]:
    """A module ``__getattr__`` resolving former public names (``{"Uniform": UniformSchedule}``) with a
    `DeprecationWarning`, for one release after a rename; any other name is an `AttributeError`. ``stacklevel``:
    the frame the warning names, 2 for the attribute access itself (one more when another ``__getattr__`` calls
    this one)."""

    def __getattr__(name: str) -> type:
        if name not in renamed:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        cls = renamed[name]
        warnings.warn(
            f"{module.split('.')[0]}.{module.split('.')[1]}.{name} is deprecated and will be removed in the next "
            f"release: use {cls.__module__.rsplit('.', 1)[0]}.{cls.__name__} (the same class; saved files are "
            "unaffected)",
            DeprecationWarning,
            stacklevel=stacklevel,
        )
        return cls

    return __getattr__

"""Model families: the UNet classes that saved models name, so that `cq.save` / `cq.load` rebuild them.

A family is a name (what a saved model stores), a `CacheableUNet` subclass, its config dataclass and, optionally,
a hook converting checkpoint keys for `cq.models.load_weights`. `DDPMUNet` and `LDMUNet` register where they are
defined; a UNet of your own registers the same way::

    @cq.models.register_family("my-unet", config=MyConfig)
    class MyUNet(CacheableUNet):
        def __init__(self, config: MyConfig, *, noise_schedule=None, preset=None): ...

The class is constructed as ``cls(config, noise_schedule=..., preset=...)`` and keeps ``config`` as
``self.config``; the config is a dataclass of JSON-able fields (tuples are saved as lists and come back as tuples).

This is not a `cq.registry.Registry`: a strategy registry maps a name to one dataclass that ``from_dict``
constructs, a family is a record looked up by its name, by its UNet class and by its config class.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from torch import Tensor

from ..core.unet import CacheableUNet
from ..errors import ConfigError, ModelFamilyNotRegisteredError


__all__ = [
    "KeyFormat",
    "KeyConverter",
    "ModelFamily",
    "FamilyRegistry",
    "MODEL_FAMILIES",
    "register_family",
    "family_of",
]

KeyFormat = Literal["auto", "original", "diffusers"]
#: ``convert_keys(state, config, *, format, ema) -> state``: a checkpoint's state dict under the UNet's own keys
#: (``format``: the key layout asked for, ``"auto"`` to detect it; ``ema``: prefer EMA weights of a full checkpoint)
KeyConverter = Callable[..., dict[str, Tensor]]
U = TypeVar("U", bound=type)


@dataclass(frozen=True)
class ModelFamily:
    """One registered family: ``name`` (what saved models store), ``unet`` (the class), ``config`` (its config
    dataclass) and ``convert_keys`` (None: checkpoints already carry the UNet's own keys)."""

    name: str
    unet: type[CacheableUNet]
    config: type
    convert_keys: KeyConverter | None = None

    def checkpoint_state(
        self, state: dict[str, Tensor], config: Any, *, format: KeyFormat = "auto", ema: bool = False
    ) -> dict[str, Tensor]:
        """``state`` under this family's keys; ``format="diffusers"`` needs a ``convert_keys`` hook."""
        if self.convert_keys is not None:
            return self.convert_keys(state, config, format=format, ema=ema)
        if format == "diffusers":
            raise ConfigError(
                f"model family {self.name!r} ({self.unet.__qualname__}) converts no checkpoint keys, so "
                "format='diffusers' cannot be read; load a state dict with the UNet's own keys (format='auto' or "
                f"'original'), or register the family with register_family({self.name!r}, config=..., "
                "convert_keys=fn)"
            )
        return state


class FamilyRegistry:
    """The registered model families (one instance: `MODEL_FAMILIES`); families are added by `register_family`."""

    def __init__(self) -> None:
        self._families: dict[str, ModelFamily] = {}

    def _add(self, family: ModelFamily) -> None:
        name, unet, config = family.name, family.unet, family.config
        if not isinstance(name, str) or not name:
            raise ConfigError(f"a model family name is a non-empty string, got {name!r}")
        if not (isinstance(unet, type) and issubclass(unet, CacheableUNet)) or inspect.isabstract(unet):
            raise ConfigError(
                f"model family {name!r}: register a concrete cq.models.CacheableUNet subclass, got {unet!r}"
            )
        if not (isinstance(config, type) and dataclasses.is_dataclass(config)):
            raise ConfigError(f"model family {name!r}: config must be a dataclass class, got {config!r}")
        if self._families.get(name) == family:
            return
        for other in self._families.values():
            clash = {
                "name": other.name == name,
                "UNet class": other.unet is unet,
                "config class": other.config is config,
            }
            taken = [what for what, same in clash.items() if same]
            if taken:
                raise ConfigError(
                    f"cannot register model family {name!r} ({unet.__qualname__}, {config.__qualname__}): its "
                    f"{taken[0]} is already registered by family {other.name!r} ({other.unet.__qualname__}, "
                    f"{other.config.__qualname__}); pick another name, or cq.models.MODEL_FAMILIES.unregister"
                    f"({other.name!r}) first (a re-run notebook cell defines a new class)"
                )
        self._families[name] = family

    def unregister(self, name: str) -> None:
        """Forget family ``name``: models saved with it no longer load until it is registered again."""
        self.get(name, plugins=False)
        del self._families[name]

    def get(self, name: str, *, plugins: bool = True) -> ModelFamily:
        """The family registered as ``name``; installed plugins (`cq.plugins`) are imported before giving up."""
        if isinstance(name, str) and name not in self._families and plugins:
            from ..plugins import load_entry_points

            load_entry_points()
        if isinstance(name, str) and name in self._families:
            return self._families[name]
        raise ModelFamilyNotRegisteredError(
            f"unknown model family {name!r}; registered: {self.names()}. A UNet defined outside cq is registered "
            f"with @cq.models.register_family({name!r}, config=...) above its class: import the module that "
            f"registers {name!r} first, or pass --plugin MODULE on the command line, or publish that module under "
            "the 'cq.strategies' entry-point group"
        )

    def find(self, unet: object) -> ModelFamily | None:
        """The family whose UNet class is exactly ``type(unet)``, or None."""
        return next((f for f in self._families.values() if f.unet is type(unet)), None)

    def of_unet(self, unet: object) -> ModelFamily:
        """`find`, raising for an unregistered class: a subclass of a registered class is not registered itself
        (it would be rebuilt as its parent)."""
        family = self.find(unet)
        if family is not None:
            return family
        kind = type(unet)
        parent = next((f for f in self._families.values() if isinstance(unet, f.unet)), None)
        why = f" (a subclass of {parent.unet.__qualname__} is not registered itself)" if parent else ""
        raise ModelFamilyNotRegisteredError(
            f"{kind.__qualname__} is not a registered model family{why}, so it cannot be saved and rebuilt; "
            "register it: @cq.models.register_family('<name>', config=<its config dataclass>) above its class"
        )

    def of_config(self, config: object) -> ModelFamily:
        """The family whose config class is exactly ``type(config)``."""
        kind = type(config)
        family = next((f for f in self._families.values() if f.config is kind), None)
        if family is not None:
            return family
        raise ModelFamilyNotRegisteredError(
            f"no model family for config {kind.__qualname__}; expected the config of one of {self.names()}, or "
            "register the UNet built from it: @cq.models.register_family('<name>', config=<this class>)"
        )

    def names(self) -> list[str]:
        return sorted(self._families)

    def __contains__(self, name: object) -> bool:
        return name in self._families


MODEL_FAMILIES = FamilyRegistry()


def register_family(name: str, *, config: type, convert_keys: KeyConverter | None = None) -> Callable[[U], U]:
    """Class decorator registering a `CacheableUNet` subclass as model family ``name``, built from instances of
    the dataclass ``config``; ``convert_keys`` (`KeyConverter`) maps foreign checkpoint keys for
    `cq.models.load_weights`. Registering the same family again is a no-op; a name, UNet class or config class
    that another family holds raises `ConfigError`. Without a decorator: ``register_family(name, config=C)(cls)``.
    """

    def add(unet: U) -> U:
        MODEL_FAMILIES._add(ModelFamily(name=name, unet=unet, config=config, convert_keys=convert_keys))
        return unet

    return add


def family_of(config: object) -> str:
    """The name of the family of a UNet config (``"ddpm"``, ``"ldm"``, or a registered one), by its type."""
    return MODEL_FAMILIES.of_config(config).name

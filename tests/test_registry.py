"""Registries and `to_dict` / `from_dict`: registration rules, lookups, and round trips of nested strategies.

`from_dict` finds a registry by kind through `cq.registry.registry(kind)`, which only knows the global kinds, so a
fresh `Registry` cannot round-trip. The round-trip tests register throwaway classes into `RECIPES` under test-only
names and remove them afterwards (fixture `registered`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st

import cq.registry
from cq.errors import ConfigError, StrategyNotRegisteredError
from cq.registry import RECIPES, Registry, from_dict, to_dict


class Mode(enum.Enum):
    FAST = "fast"
    SLOW = "slow"


@dataclass(frozen=True, kw_only=True)
class Leaf:
    interval: int = 5
    mode: Mode = Mode.FAST


@dataclass(frozen=True, kw_only=True)
class Tree:
    name: str = "tree"
    steps: tuple[int, ...] = (1, 2)
    leaf: Leaf = field(default_factory=Leaf)
    leaves: tuple[Leaf, ...] = ()
    modes: tuple[Mode, ...] = ()
    grid: tuple[tuple[int, ...], ...] = ()
    weights: list[float] = field(default_factory=list)
    options: dict[str, int] = field(default_factory=dict)
    maybe_leaf: Leaf | None = None
    maybe_steps: tuple[int, ...] | None = None


@dataclass(frozen=True, kw_only=True)
class Versioned:
    VERSION = 3  # a class attribute, not a field
    x: int = 0


@dataclass(frozen=True, kw_only=True)
class OptionalMode:
    mode: Mode | None = None


NAMES = {
    Leaf: "_test_registry_leaf",
    Tree: "_test_registry_tree",
    Versioned: "_test_registry_versioned",
    OptionalMode: "_test_registry_optional_mode",
}


@contextlib.contextmanager
def _in_recipes():
    """The classes above registered in the global RECIPES registry, removed afterwards (with their tags)."""
    before = RECIPES.names()
    assert not set(NAMES.values()) & set(before)
    try:
        for cls, name in NAMES.items():
            RECIPES.register(name)(cls)
        yield
    finally:
        for cls, name in NAMES.items():
            RECIPES._classes.pop(name, None)
            for attr in ("registry_kind", "registry_name"):
                if attr in vars(cls):
                    delattr(cls, attr)
    assert RECIPES.names() == before


@pytest.fixture
def registered():
    with _in_recipes():
        yield


# ----------------------------------------------------------------------------------------------------------------
# Registry


def test_register_and_get():
    reg = Registry("test")
    global_names = {kind: cq.registry.registry(kind).names() for kind in ("schedule", "cacher", "recipe")}

    @reg.register("b")
    @dataclass(frozen=True)
    class B:
        x: int = 1

    @reg.register("a")
    @dataclass(frozen=True)
    class A:
        y: str = ""

    assert reg.get("a") is A and reg.get("b") is B
    assert reg.names() == ["a", "b"]
    assert reg.classes() == [A, B]
    assert "a" in reg and "c" not in reg
    assert (A.registry_kind, A.registry_name) == ("test", "a")
    assert reg.register("a")(A) is A  # registering the same class again is harmless
    assert {kind: cq.registry.registry(kind).names() for kind in global_names} == global_names


def test_duplicate_name_raises():
    reg = Registry("test")

    @reg.register("x")
    @dataclass(frozen=True)
    class First:
        pass

    @dataclass(frozen=True)
    class Second:
        pass

    with pytest.raises(ConfigError, match="'x'.*First"):
        reg.register("x")(Second)
    assert reg.get("x") is First
    assert not hasattr(Second, "registry_name")


def test_unknown_name_lists_the_registered_ones():
    reg = Registry("test")
    for name in ("one", "two"):
        reg.register(name)(dataclasses.make_dataclass(name.title(), [], frozen=True))
    with pytest.raises(StrategyNotRegisteredError) as info:
        reg.get("three")
    message = str(info.value)
    assert "three" in message and "one" in message and "two" in message
    assert isinstance(info.value, KeyError)


def test_non_dataclass_raises():
    reg = Registry("test")

    class Plain:
        pass

    with pytest.raises(ConfigError, match="dataclass"):
        reg.register("plain")(Plain)
    assert "plain" not in reg
    assert not hasattr(Plain, "registry_name")


def test_unknown_kind():
    with pytest.raises(StrategyNotRegisteredError, match="recipe"):  # lists the known kinds
        cq.registry.registry("nonsense")


def test_fresh_registry_cannot_round_trip():
    """Documents the limitation: from_dict only resolves the global kinds."""
    reg = Registry("test")

    @reg.register("thing")
    @dataclass(frozen=True)
    class Thing:
        x: int = 1

    data = to_dict(Thing(x=2))
    assert data == {"kind": "test", "type": "thing", "version": 1, "x": 2}
    with pytest.raises(StrategyNotRegisteredError, match="test"):
        from_dict(data)


# ----------------------------------------------------------------------------------------------------------------
# to_dict / from_dict


def test_to_dict_layout(registered):
    tree = Tree(steps=(3, 4), leaf=Leaf(interval=2, mode=Mode.SLOW), modes=(Mode.SLOW, Mode.FAST), grid=((1,), (2, 3)))
    data = to_dict(tree)
    assert data["kind"] == "recipe" and data["type"] == NAMES[Tree] and data["version"] == 1
    assert data["steps"] == [3, 4]
    assert data["leaf"] == {"kind": "recipe", "type": NAMES[Leaf], "version": 1, "interval": 2, "mode": "slow"}
    assert data["modes"] == ["slow", "fast"]
    assert data["grid"] == [[1], [2, 3]]
    assert json.loads(json.dumps(data)) == data  # plain JSON


def test_round_trip_types(registered):
    tree = Tree(
        name="t",
        steps=(3, 4),
        leaf=Leaf(interval=2, mode=Mode.SLOW),
        leaves=(Leaf(), Leaf(interval=9)),
        modes=(Mode.SLOW,),
        grid=((1, 2), ()),
        weights=[0.5, 1.5],
        options={"a": 1},
        maybe_leaf=Leaf(mode=Mode.SLOW),
        maybe_steps=(7,),
    )
    back = from_dict(json.loads(json.dumps(to_dict(tree))))
    assert back == tree
    assert type(back.steps) is tuple and type(back.grid) is tuple and all(type(g) is tuple for g in back.grid)
    assert type(back.maybe_steps) is tuple
    assert type(back.weights) is list
    assert type(back.leaf) is Leaf and type(back.maybe_leaf) is Leaf and all(type(x) is Leaf for x in back.leaves)
    assert back.leaf.mode is Mode.SLOW and back.modes == (Mode.SLOW,)


leaves = st.builds(Leaf, interval=st.integers(0, 100), mode=st.sampled_from(Mode))
trees = st.builds(
    Tree,
    name=st.text(max_size=5),
    steps=st.lists(st.integers(0, 999), max_size=4).map(tuple),
    leaf=leaves,
    leaves=st.lists(leaves, max_size=3).map(tuple),
    modes=st.lists(st.sampled_from(Mode), max_size=3).map(tuple),
    grid=st.lists(st.lists(st.integers(), max_size=3).map(tuple), max_size=3).map(tuple),
    weights=st.lists(st.floats(allow_nan=False), max_size=3),
    options=st.dictionaries(st.text(max_size=3), st.integers(), max_size=3),
    maybe_leaf=st.none() | leaves,
    maybe_steps=st.none() | st.lists(st.integers(), max_size=3).map(tuple),
)


@given(tree=trees)
def test_round_trip_property(tree):
    with _in_recipes():  # not the function-scoped fixture: hypothesis runs many examples per test call
        assert from_dict(json.loads(json.dumps(to_dict(tree)))) == tree


def test_from_dict_unknown_field(registered):
    data = {**to_dict(Leaf()), "intervall": 3}
    with pytest.raises(ConfigError, match="intervall"):
        from_dict(data)


def test_from_dict_unknown_type(registered):
    data = {**to_dict(Leaf()), "type": "_test_registry_nothing"}
    with pytest.raises(StrategyNotRegisteredError) as info:
        from_dict(data)
    assert "_test_registry_nothing" in str(info.value) and NAMES[Leaf] in str(info.value)


def test_from_dict_unknown_nested_type(registered):
    data = to_dict(Tree())
    data["leaf"]["type"] = "_test_registry_nothing"
    with pytest.raises(StrategyNotRegisteredError, match="_test_registry_nothing"):
        from_dict(data)


def test_versions(registered):
    data = to_dict(Versioned(x=4))
    assert data["version"] == 3 and "VERSION" not in data
    assert from_dict(data) == Versioned(x=4)
    assert from_dict({**data, "version": 2}) == Versioned(x=4)  # older files still load
    with pytest.raises(ConfigError, match="newer"):
        from_dict({**data, "version": 4})
    assert from_dict({k: v for k, v in to_dict(Leaf(interval=1)).items() if k != "version"}) == Leaf(interval=1)


def test_from_dict_does_not_mutate_its_input(registered):
    data = to_dict(Tree(leaf=Leaf(interval=3)))
    snapshot = json.loads(json.dumps(data))
    from_dict(data)
    assert data == snapshot


def test_to_dict_of_unregistered_class():
    with pytest.raises(ConfigError, match="register"):
        to_dict(Leaf())


def test_round_trip_optional_enum(registered):
    assert from_dict(to_dict(OptionalMode(mode=Mode.SLOW))).mode is Mode.SLOW


def test_to_dict_of_unregistered_subclass(registered):
    @dataclass(frozen=True, kw_only=True)
    class FastLeaf(Leaf):
        speed: int = 2

    with pytest.raises(ConfigError, match="register"):
        to_dict(FastLeaf())

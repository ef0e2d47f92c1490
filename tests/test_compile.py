"""`CompressedUNet.compile`: the UNet compiles to two graphs (full and shallow call) with no graph break, and the
per-step tables are indexed by a tensor step, so sampling every step recompiles nothing."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo as dynamo
from torch._dynamo.utils import counters

import cq
from cq.metrics.error import sqnr
from cq.sampling import ddim, seeded_noise


STEPS = 5


@pytest.fixture(scope="module")
def fitted(unet):
    recipe = cq.cachequant(interval=3)
    trace = cq.trace(unet, steps=STEPS, num_samples=4, seed=10_000, points=recipe.points(unet), progress=False)
    return recipe.fit(unet, trace, progress=False), trace


def test_compiled_sampling_is_two_graphs_for_all_steps_and_equals_eager(fitted, tmp_path):
    model = copy.deepcopy(fitted[0])
    noise = seeded_noise(model.sample_shape, range(2000, 2003))
    eager = ddim(model, noise, steps=STEPS)
    dynamo.reset()
    counters.clear()
    # fullgraph: any graph break in the full or the shallow call raises, naming its reason; aot_eager: the graphs
    # Inductor would get, without its numerics
    model.compile(backend="aot_eager", fullgraph=True)
    assert torch.equal(ddim(model, noise, steps=STEPS), eager)
    assert counters["stats"]["unique_graphs"] == 2  # one full, one shallow call, whatever the step
    ddim(model, noise, steps=STEPS)
    assert counters["stats"]["unique_graphs"] == 2  # a second run compiles nothing
    assert model.state_dict().keys() == fitted[0].state_dict().keys()  # saves as before
    assert torch.equal(ddim(cq.load(cq.save(model, tmp_path / "m.cq")), noise, steps=STEPS), eager)


@pytest.mark.parametrize("kernels", ["int_mm", "onednn"])
def test_int8_kernels_compile_without_graph_breaks_and_equal_eager(fitted, kernels, monkeypatch):
    """The integer modules read the step's scale and zero point as tensors while tracing (the kernels' tensor
    overloads): no ``.item()`` graph break, one graph for every step, and the compiled model equals eager int8.
    oneDNN is forced on CPUs where it is inexact (no VNNI): both runs take the same kernels. With `_int_mm` the
    compiled samples are bit-identical; with oneDNN a split conv's fused-sum kernel becomes two kernels and an add
    (float rounding of the sum differs), so the samples agree to the int8 tolerance of tests/test_int8.py."""
    import cq.quant.int8 as int8

    if kernels == "onednn":
        if not int8._onednn_present():
            pytest.skip("no oneDNN int8 kernels in this torch build")
        monkeypatch.setattr(int8, "onednn_exact", lambda: True)
    model = copy.deepcopy(fitted[0])
    model.to_int8(kernels)
    assert any(v.startswith("int8") for v in model.execution.values())
    noise = seeded_noise(model.sample_shape, range(2000, 2002))
    eager = ddim(model, noise, steps=STEPS)
    dynamo.reset()
    counters.clear()
    model.compile(backend="aot_eager", fullgraph=True)  # fullgraph: a graph break would raise
    compiled = ddim(model, noise, steps=STEPS)
    if kernels == "int_mm":
        assert torch.equal(compiled, eager)
    else:
        assert sqnr(compiled, eager) > 40, sqnr(compiled, eager)
    assert counters["stats"]["unique_graphs"] == 2


def test_onednn_int8_is_refused_by_inductor_with_the_ways_that_work(fitted, monkeypatch):
    """Inductor's oneDNN lowerings want the prepacked weight as a graph constant (torch 2.14): compile() refuses
    before anything is traced, naming to_int8('int_mm') and backend='aot_eager'; those stay allowed."""
    import cq.quant.int8 as int8

    if not int8._onednn_present():
        pytest.skip("no oneDNN int8 kernels in this torch build")
    monkeypatch.setattr(int8, "onednn_exact", lambda: True)
    model = copy.deepcopy(fitted[0])
    model.to_int8("onednn")
    with pytest.raises(cq.errors.ConfigError, match=r"to_int8\('int_mm'\).*aot_eager"):
        model.compile()
    with pytest.raises(cq.errors.ConfigError, match="oneDNN int8"):
        model.compile(backend="inductor", fullgraph=True)
    model.compile(backend="aot_eager")  # allowed: no Inductor lowering
    int_mm = copy.deepcopy(fitted[0])
    int_mm.to_int8("int_mm")
    int_mm.compile()  # lazily compiled at the first call; nothing refused

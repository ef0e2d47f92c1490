"""The SD 2.x (v-prediction, linear projections, fp32 attention) and SDXL (vector
conditioning packed into cond, depth per level) UNets expose cache points and compress: DeepCache and W8A8 on
integer kernels fit on a trace and sample held-out conditioning close to the full-precision model.

Measured (6 DDIM steps, 3 held-out samples, relative L2 error of x0 against full precision): tiny-sd-v2 DeepCache
N=2 0.021, W8A8 int8 0.017; tiny-sdxl 0.026, 0.0074. The bound 0.1 leaves a 4x margin."""

from __future__ import annotations

import pytest
import torch

import cq
from cq.core.view import CacheView
from cq.models import build
from cq.quant.int8 import int8_available
from cq.sampling import FullPrecision, ddim


STEPS = 6
BOUND = 0.1


def _cond(unet, n: int, seed: int) -> torch.Tensor:
    c = unet.config
    g = torch.Generator().manual_seed(seed)
    context = torch.randn(n, 5, c.context_dim, generator=g)
    if c.adm_in_channels is None:
        return context
    return unet.pack_cond(context, torch.randn(n, c.adm_in_channels, generator=g))


@pytest.fixture(scope="module", params=["tiny-sd-v2", "tiny-sdxl"])
def case(request):
    unet = build(request.param, seed=0)
    noise = torch.randn(3, *unet.sample_shape, generator=torch.Generator().manual_seed(9))
    held_out = _cond(unet, 3, seed=100)
    reference = ddim(FullPrecision(unet), noise, steps=STEPS, cond=held_out, spacing="linspace")
    return unet, noise, held_out, reference


def _fit_and_sample(case, recipe, num_samples):
    unet, noise, held_out, reference = case
    trace = cq.trace(
        unet,
        ddim,
        steps=STEPS,
        num_samples=num_samples,
        cond=_cond(unet, num_samples, seed=1),
        points=recipe.points(unet),
        spacing="linspace",
        progress=False,
    )
    model = recipe.fit(unet, trace, progress=False)
    out = ddim(model, noise, steps=STEPS, cond=held_out, spacing="linspace")
    return out, ((out - reference).norm() / reference.norm()).item()


def test_cache_points_are_named(case):
    unet = case[0]
    points = unet.cache_points()
    assert points == tuple(f"output_blocks.{j}" for j in range(len(unet.output_blocks)))
    assert unet.default_cache_point() == points[-1]
    for point in points:  # a shallow call at every point runs and has the recorded feature's shape
        x, t, cond = case[1][:1], torch.tensor([400]), case[2][:1]
        view = CacheView.full(record=[point])
        with torch.no_grad():
            full = unet(x, t, cond, cache=view)
            shallow = unet(x, t, cond, cache=CacheView.shallow(point, view.features[point]))
        assert view.features[point].shape[1] == unet.cache_channels(point)
        assert torch.allclose(shallow, full, atol=1e-5)  # the same feature gives the same output


def test_deepcache_fits_and_samples_close(case):
    out, error = _fit_and_sample(case, cq.deepcache(interval=2), num_samples=4)
    assert torch.isfinite(out).all() and 0 < error <= BOUND


def test_w8a8_on_integer_kernels_fits_and_samples_close(case):
    # conditional UNets run PyTorch's kernels: oneDNN where it is exact (VNNI / AMX), else torch._int_mm
    backend = "int8" if int8_available() else "int_mm"
    out, error = _fit_and_sample(case, cq.quant_only("w8a8", backend=backend), num_samples=2)
    assert torch.isfinite(out).all() and 0 < error <= BOUND

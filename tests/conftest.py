"""Shared test configuration: hypothesis profiles, seeding, offline hub, small thread count."""

from __future__ import annotations

import os
import sys
import types

import pytest
import torch
from hypothesis import HealthCheck, settings


os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub
# The test models are tiny: one thread avoids OpenMP spin contention on a 2-core machine (measured ~9x faster).
torch.set_num_threads(1)
settings.register_profile(
    "ci", deadline=None, derandomize=True, max_examples=25, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def tiny_unet(seed: int = 0, ch: int = 32):
    """A 16x16x1 DDPM UNet (two levels, attention at 8x8) with random weights, in eval mode."""
    from cq.models import DDPMConfig, DDPMUNet
    from cq.sampling import NoiseSchedule

    torch.manual_seed(seed)
    config = DDPMConfig(resolution=16, in_channels=1, out_ch=1, ch=ch, ch_mult=(1, 2), attn_resolutions=(8,))
    return DDPMUNet(config, noise_schedule=NoiseSchedule()).eval()


@pytest.fixture(scope="module")
def unet():
    """`tiny_unet()`, one per test module (modules that need another model define their own ``unet``)."""
    return tiny_unet()


def save_lightning_ckpt(path, checkpoint: dict, monkeypatch) -> list:
    """``torch.save(checkpoint)`` plus a pickled ``pytorch_lightning`` ``ModelCheckpoint`` callback under
    ``"callbacks"``, as old LDM/SD ``.ckpt`` files have (the module is faked for the save, then removed).

    Returns a list the callback's ``__setstate__`` appends to if loading ever runs it (it must stay empty).
    """
    ran: list = []

    class ModelCheckpoint:
        def __setstate__(self, state):
            ran.append(state)

    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    if any(n in sys.modules for n in names):
        pytest.skip("pytorch_lightning is importable here; this test fakes it")
    fake = types.ModuleType(names[-1])
    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = names[-1], "ModelCheckpoint"
    fake.ModelCheckpoint = ModelCheckpoint
    for name in names:
        monkeypatch.setitem(sys.modules, name, fake if name == names[-1] else types.ModuleType(name))
    callback = ModelCheckpoint()
    callback.best_model_path = "x"
    torch.save({**checkpoint, "callbacks": {"ModelCheckpoint": callback}}, path)
    for name in names:
        monkeypatch.delitem(sys.modules, name)
    return ran

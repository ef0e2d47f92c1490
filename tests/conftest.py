"""Shared test configuration: hypothesis profiles, seeding, offline hub, small thread count."""

from __future__ import annotations

import os

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
    model = DDPMUNet(DDPMConfig(resolution=16, in_channels=1, out_ch=1, ch=ch, ch_mult=(1, 2), attn_resolutions=(8,)))
    model.noise_schedule = NoiseSchedule()
    return model.eval()


@pytest.fixture(scope="module")
def unet():
    """`tiny_unet()`, one per test module (modules that need another model define their own ``unet``)."""
    return tiny_unet()

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

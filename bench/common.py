"""Helpers shared by the benchmark scripts: interleaved timing, medians, table printing, machine info."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable

import torch

from cq.report import print_table  # noqa: F401 - re-exported for the bench scripts


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    return (
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, {cpu}"
    )


def interleaved_medians(runs: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median wall-clock seconds of each callable, running them round-robin so drift hits all alike."""
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(repeats):
        order = list(runs) if r % 2 == 0 else list(reversed(runs))  # alternate the order too
        for name in order:
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}

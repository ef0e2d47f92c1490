"""DPS: CacheQuant's dynamic-programming cache schedule (Liu et al., CVPR 2025, Sec. 3.2).

Split the T sampling steps into K contiguous groups; each group's first step refreshes the cache and the other
steps reuse it. Choose the split minimising the caching error

    sum_groups sum_{i in group} dist(F_i, F_start(group))

where F_i is the full-precision, no-cache feature at the cache point at step i. Group lengths lie in
``[min_len, max_len]`` (CacheQuant: ``[ceil(N/2), 2N]``) with ``K = ceil(T/N)``.

Differences from the reference (``quant/utils.py Fisher.feature_to_interval_seq_optimal``), on purpose:

* the distance table ``dist[s, r] = ||F_{s+r} - F_s||`` is computed once (``r < max_len``) and group costs come
  from its prefix sums, so planning is ``O(T * max_len)`` distance evaluations plus a vectorised
  ``O(K * (max_len - min_len + 1))`` DP, instead of recomputing distances inside an ``O(K T N)`` loop;
* the *last* group may be as short as the uniform schedule's remainder ``T - (K-1)N``, so the uniform schedule
  with the same K is always feasible and DPS never costs more than it;
* infeasible bounds (e.g. T < K*min_len) are relaxed deterministically with a warning instead of crashing, so
  every T >= 1 plans.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor

from ..errors import ConfigError, ScheduleInvalidError
from ..registry import SCHEDULES
from .schedule import Schedule, check_budget_fields, fitted_mask, positive_int


__all__ = ["DPS", "dp_partition", "distance_table", "partition_cost", "group_bounds"]

Distance = Literal["l1", "l2", "mse"]


def distance_table(features: Tensor, max_len: int, distance: Distance = "l1") -> Tensor:
    """``dist[s, r]`` = distance between step ``s+r`` and step ``s`` (``inf`` past the end), shape ``[T, max_len]``.

    ``l1``: sum of absolute differences (CacheQuant's ``get_class_diameter``); ``l2``: Euclidean norm;
    ``mse``: mean squared difference. Computed in blocks of steps x feature chunks that stay in cache (the
    naive per-lag difference streams ``max_len`` copies of the whole trace through memory, ~9x slower); only one
    feature chunk is converted to fp32 at a time, so a memory-mapped trace is never copied whole.
    """
    if distance not in ("l1", "l2", "mse"):
        raise ConfigError(f"distance must be 'l1', 'l2' or 'mse', got {distance!r}")
    T = features.shape[0]
    flat = features.reshape(T, -1)  # a view: a trace kept on disk is read one feature chunk at a time
    D = flat.shape[1]
    acc = torch.zeros((T, max_len), dtype=torch.float64)
    rows, chunk = 32, 2048
    for c in range(0, D, chunk):
        part = flat[:, c : c + chunk].float().contiguous()  # fp32 differences, fp64 accumulation across chunks
        for b in range(0, T, rows):
            e = min(b + rows, T)
            block = part[b : min(e + max_len - 1, T)]
            for r in range(1, max_len):
                m = min(e, T - r) - b
                if m <= 0:
                    break
                diff = block[r : r + m] - block[:m]
                d = diff.abs().sum(1) if distance == "l1" else diff.square().sum(1)
                acc[b : b + m, r] += d.double()
    if distance == "l2":
        acc = acc.sqrt()
    elif distance == "mse":
        acc = acc / D
    valid = torch.arange(T)[:, None] + torch.arange(max_len)[None, :] < T
    return torch.where(valid, acc, torch.tensor(math.inf, dtype=torch.float64))


def partition_cost(dist: Tensor, starts: tuple[int, ...]) -> float:
    """Caching error of the groups beginning at ``starts`` (sorted, starting with 0) under ``dist``."""
    T = dist.shape[0]
    bounds = [*starts, T]
    total = 0.0
    for s, e in zip(bounds[:-1], bounds[1:], strict=True):
        total += float(dist[s, : e - s].sum()) if e - s <= dist.shape[1] else math.inf
    return total


def dp_partition(
    dist: Tensor, groups: int, min_len: int, max_len: int, last_min_len: int | None = None
) -> tuple[int, ...]:
    """Exact minimum-cost split of ``T = dist.shape[0]`` steps into ``groups`` contiguous groups.

    Group lengths lie in ``[min_len, max_len]``; the last group's lower bound is ``last_min_len`` (default
    ``min_len``). Returns the sorted group starts (the refresh steps), beginning with 0. Ties go to the
    earliest split. Raises `ScheduleInvalidError` when no split satisfies the bounds.
    """
    T = dist.shape[0]
    last_min_len = min_len if last_min_len is None else last_min_len
    if max_len > dist.shape[1]:
        raise ScheduleInvalidError(f"distance table covers lengths < {dist.shape[1]}, max_len={max_len}")
    # cost[s, L-1] = error of a group starting at s with length L (inf where it runs past T)
    cost = torch.cumsum(dist, dim=1)
    inf = torch.tensor(math.inf, dtype=torch.float64)
    best = torch.full((T + 1,), math.inf, dtype=torch.float64)  # best[e]: k groups covering [0, e)
    best[0] = 0.0
    choice = torch.zeros((groups, T + 1), dtype=torch.long)  # length of the last group in the best split
    ends = torch.arange(T + 1)
    for k in range(groups):
        lo = last_min_len if k == groups - 1 else min_len
        new = torch.full((T + 1,), math.inf, dtype=torch.float64)
        new_len = torch.zeros(T + 1, dtype=torch.long)
        for L in range(lo, max_len + 1):
            starts = ends - L
            valid = starts >= 0
            s = starts.clamp(min=0)
            cand = torch.where(valid, best[s] + cost[s.clamp(max=T - 1), L - 1], inf)
            better = cand < new  # strict: keep the shortest length (earliest-appearing L) on ties
            new = torch.where(better, cand, new)
            new_len = torch.where(better, torch.full_like(new_len, L), new_len)
        best, choice[k] = new, new_len
    if not math.isfinite(float(best[T])):
        raise ScheduleInvalidError(
            f"no split of {T} steps into {groups} groups with lengths in [{min_len}, {max_len}] "
            f"(last >= {last_min_len})"
        )
    starts, e = [], T
    for k in reversed(range(groups)):
        e -= int(choice[k, e])
        starts.append(e)
    return tuple(reversed(starts))


def group_bounds(
    num_steps: int,
    interval: int | None,
    refreshes: int | None,
    min_len: int | None,
    max_len: int | None,
    sampler_steps: int | None = None,
) -> tuple[int, int, int, int]:
    """``(K, min_len, max_len, last_min_len)`` for a DPS of these settings, relaxed to be feasible.

    ``sampler_steps``: the sampler steps behind the ``num_steps`` model calls when they differ (PLMS: 50 steps make
    51 calls); the reference plans ``K = ceil(sampler_steps / N)`` groups over all calls
    (``sample_cachequant_stable_cali.py``: hooked calls ``ddim_steps + 1``, groups ``ddim_steps / N``)."""
    T = num_steps
    N = interval if interval is not None else math.ceil(T / refreshes)
    planned = sampler_steps if sampler_steps is not None else T
    K = min(refreshes if refreshes is not None else math.ceil(planned / N), T)
    lo = min_len if min_len is not None else math.ceil(N / 2)
    hi = max_len if max_len is not None else 2 * N
    last_lo = min(lo, max(1, T - (K - 1) * N)) if min_len is None else lo
    relaxed_lo, relaxed_hi = min(lo, T // K), max(hi, math.ceil(T / K))
    relaxed_last = min(last_lo, relaxed_lo)
    if (relaxed_lo, relaxed_hi) != (lo, hi) and K > 1:  # one group of length T is the only split: no news
        warnings.warn(
            f"DPS: group lengths [{lo}, {hi}] cannot split {T} steps into {K} groups; relaxed to "
            f"[{relaxed_lo}, {relaxed_hi}]",
            stacklevel=3,
        )
    return K, relaxed_lo, relaxed_hi, relaxed_last


@SCHEDULES.register("dps")
@dataclass(frozen=True, kw_only=True)
class DPS(Schedule):
    """CacheQuant's DP-optimal schedule; `fit` on the per-step cache-point features of a full-precision trace.

    Give either ``interval`` (N; K = ceil(T/N) refreshes) or ``refreshes`` (the compute budget K).

    Args:
        interval: N; group lengths default to ``[ceil(N/2), 2N]``.
        refreshes: K, the number of full forwards, instead of ``interval``.
        min_len, max_len: override the group-length bounds.
        distance: feature distance, ``"l1"`` (CacheQuant), ``"l2"`` or ``"mse"``.
        steps: the fitted refresh steps (set by `fit`; empty before).
        num_steps: the step count the schedule was fitted for (0 before `fit`).
    """

    interval: int | None = None
    refreshes: int | None = None
    min_len: int | None = None
    max_len: int | None = None
    distance: Distance = "l1"
    steps: tuple[int, ...] = ()
    num_steps: int = 0

    def __post_init__(self) -> None:
        check_budget_fields(self, "min_len", "max_len")
        if self.distance not in ("l1", "l2", "mse"):
            raise ConfigError(f"DPS.distance must be 'l1', 'l2' or 'mse', got {self.distance!r}")

    @property
    def needs_fit(self) -> bool:
        return not self.steps

    def plan(self, num_steps: int, sampler_steps: int | None = None) -> tuple[int, int, int, int]:
        """``(K, min_len, max_len, last_min_len)`` the DP uses for ``num_steps`` model calls (`group_bounds`)."""
        return group_bounds(num_steps, self.interval, self.refreshes, self.min_len, self.max_len, sampler_steps)

    def fit(self, features: Tensor, *, sampler_steps: int | None = None) -> DPS:
        """Plan on ``features`` ``[T, ...]`` (step-major; the batch may be flattened into the rest), one row per
        model call. ``sampler_steps``: the sampler steps behind them when not T (PLMS: T - 1); with ``interval``
        N the plan has ``ceil(sampler_steps / N)`` groups, as CacheQuant's SD runs (10 over 51 calls at N=5)."""
        T = features.shape[0]
        positive_int("DPS.fit", "number of steps", T)
        K, lo, hi, last_lo = self.plan(T, sampler_steps)
        dist = distance_table(features, hi, self.distance)
        return replace(self, steps=dp_partition(dist, K, lo, hi, last_lo), num_steps=T)

    def refresh_mask(self, num_steps: int) -> tuple[bool, ...]:
        unfitted = "call fit(features) (Recipe.fit does it on a trace)"
        return fitted_mask(self, self.steps, self.num_steps, num_steps, unfitted)

"""`sample_folder`: the seeds of a saved model sampled into a folder of shards (`cq.sampling.shards`), resumable
(finished shards are kept) and split over the ranks of a ``torchrun`` launch (`cq.sampling.ranks`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .draw import draw
from .resolve import fitted_sampler
from .seeded import seeded_noise


if TYPE_CHECKING:
    from ..models.base import Base
    from ..models.conditioning import Conditions

__all__ = ["FolderRun", "sample_folder"]


@dataclass(frozen=True)
class FolderRun:
    """What `sample_folder` did in this process: ``shards`` sampled here in ``seconds``; ``finished`` of
    ``num_shards`` are in the folder (counted on rank 0, after every rank is done)."""

    rank: int
    shards: int
    seconds: float
    finished: int
    num_shards: int


def sample_folder(
    model,
    model_file: str | Path,
    out: str | Path,
    *,
    num: int,
    seed: int = 0,
    base: Base | None = None,
    conditions: Conditions | None = None,
    guidance: float | None = None,
    int8: bool = False,
    spacing: str | None = None,
    shard_size: int = 256,
    shard_format: str = "npz",
    batch_size: int | None = None,
    device: torch.device | str = "cpu",
    log: Callable[[str], None] | None = None,
) -> FolderRun:
    """Sample seeds ``seed..seed + num - 1`` of the `CompressedUNet` ``model`` (loaded from ``model_file``, whose
    hash the manifest records) into ``out``. ``base`` conditions on ``conditions`` (cycled over the seeds; guidance
    default: the calibration scale) and decodes latents. ``log`` gets, on rank 0, the plan before sampling."""
    from ..io import checksum, file_sha256
    from ..models.base import default_batch
    from ..models.conditioning import Conditioning, conditioning, fitted_guidance
    from .ranks import process_group
    from .shards import (
        SampleManifest,
        ShardPlan,
        existing_shards,
        open_folder,
        read_shard,
        to_uint8_nhwc,
        write_shards,
    )

    device = torch.device(device)
    plan = ShardPlan(seed, num, shard_size)
    values = list(conditions.prompts or conditions.labels) if conditions else []
    k = max(len(values), 1)
    guidance = fitted_guidance(model, guidance)
    # one row per distinct position of the cycle, indexed per sample: memory does not grow with num
    cond = conditioning(base, conditions, k, guidance) if base is not None else Conditioning(None, 1.0, None)
    sampler = fitted_sampler(model, spacing)
    sample_fn, steps, kwargs = sampler
    pipe = base.pipe if base is not None else None
    batch = batch_size or default_batch(model.unet)
    manifest = SampleManifest(
        plan,
        {
            "model_sha256": file_sha256(model_file),
            "model_file": Path(model_file).name,
            "pipeline_fingerprint": None if pipe is None else _pipeline_fingerprint(pipe, checksum),
            "int8": bool(int8),
            "sampler": {"name": sample_fn.__name__, "steps": steps, **kwargs},
            "conditions": {"prompts": conditions.prompts, "labels": conditions.labels} if conditions else None,
            "guidance": cond.scale,
            # floating-point results depend on the batch a sample runs in and on the device kind
            "batch_size": batch,
            "device": device.type,
        },
        shard_format=shard_format,
    )
    with process_group(device) as ranks, torch.no_grad():
        device = ranks.device(device)
        model.to(device)
        if pipe is not None:  # to decode; conditions were encoded, the float UNet is idle
            pipe.first_stage.to(device)

        def sample(seeds: range, rows: range):
            noise = seeded_noise(model.sample_shape, seeds).to(device)
            return to_uint8_nhwc(draw(model, sampler, noise, cond, torch.tensor([r % k for r in rows]), pipe=pipe))

        def prepare() -> list[int]:  # rank 0 writes or checks the manifest; every rank learns the finished shards
            open_folder(out, manifest)
            return existing_shards(out, manifest)

        done = ranks.rank_zero_first(prepare)
        pending = [i for i in range(plan.num_shards) if i not in set(done)]
        for i in ranks.share(done):  # complete by construction (atomic writes); checked, a cheap read
            read_shard(out, manifest, i)
        if ranks.rank == 0 and log is not None:
            log(
                f"{num} samples (seeds {seed}..{seed + num - 1}) into {out}, "
                f"{plan.num_shards} shards of {plan.shard_size}: {len(done)} done, {len(pending)} to sample over "
                f"{ranks.world_size} process(es); {cond.describe() if conditions else 'unconditional'}, "
                f"device {device}"
            )
        start = time.perf_counter()
        mine = ranks.share(pending)
        write_shards(
            out,
            manifest,
            mine,
            sample,
            batch_size=batch,
            per_sample=(lambda row: values[row % k]) if values else (lambda row: None),
            desc=f"rank {ranks.rank}" if ranks.distributed else "samples",
            position=ranks.rank,
        )
        seconds = time.perf_counter() - start
        ranks.barrier()
        finished = len(existing_shards(out, manifest)) if ranks.rank == 0 else 0
    return FolderRun(ranks.rank, len(mine), seconds, finished, plan.num_shards)


def _pipeline_fingerprint(pipe, checksum) -> str:
    """SHA-256 of the first stage and conditioner weights (the UNet's is in the .cq file): decoding and
    conditioning change the images too."""
    parts = {"first_stage": pipe.first_stage, "conditioner": pipe.conditioner}
    return checksum(
        {f"{name}.{k}": v for name, m in parts.items() if m is not None for k, v in m.state_dict().items()}
    )

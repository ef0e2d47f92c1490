"""``cq sample``: sample a saved model into a grid, or into a resumable folder of shards (``--out``; split
over ranks under torchrun)."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from .args import (
    _check_writable,
)
from .models import _base_for, _default_batch, _fitted_sampler, _guidance, _refuse_conditions


def _sample(args: argparse.Namespace) -> int:
    from ..artifact import load
    from ..errors import ConfigError
    from ..models.openai_unet import LDMUNet
    from ..report.viz import save_grid
    from ..sampling.guidance import guided
    from ..sampling.seeded import seeded_noise
    from .models import Conditioning, conditioning, device_of, read_conditions

    if args.out is not None:
        _check_folder_args(args)
    else:
        if args.shard_size is not None:
            raise ConfigError("--shard-size applies to a sample folder: add --out DIR")
        if args.format != "npz":
            raise ConfigError("--format applies to a sample folder: add --out DIR (-o writes a PNG grid)")
        args.grid = args.grid or "cq_samples.png"
        _check_writable(args.grid)
        if args.npz:
            _check_writable(args.npz)
    device = device_of(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    conditions = read_conditions(args.prompt, args.prompts, args.class_labels)
    model = load(args.path, int8=args.int8)
    latent = isinstance(model.unet, LDMUNet)
    if not latent:
        _refuse_conditions(args, conditions)
    base = _base_for(model, args, required=latent)
    if latent and base.pipe is None:
        from ..errors import ConfigError

        raise ConfigError(
            f"{args.path} is a latent-diffusion model, but only a UNet was loaded: pass the checkpoint or diffusers "
            "pipeline folder with its first stage as --weights, to decode the latents"
        )
    num = args.num or (len(conditions.prompts or conditions.labels) if conditions else 64)
    guidance = _guidance(args, model)
    if args.out is not None:
        return _sample_folder(args, model, base, conditions, num, guidance, device)
    cond = conditioning(base, conditions, num, guidance) if base is not None else Conditioning(None, 1.0, None)
    sample_fn, steps, sampler = _fitted_sampler(model, args.spacing)
    model.to(device)
    if base is not None and base.pipe is not None:  # to decode; conditions were encoded, the float UNet is idle
        base.pipe.first_stage.to(device)
    batch = args.batch_size or _default_batch(model.unet)
    print(f"cq sample: {num} samples (seeds {args.seed}..{args.seed + num - 1}), {cond.describe()}, device {device}")
    images, start = [], time.perf_counter()
    with torch.no_grad():
        for first in range(0, num, batch):
            rows = slice(first, min(first + batch, num))
            noise = seeded_noise(model.sample_shape, range(args.seed + rows.start, args.seed + rows.stop)).to(device)
            c = cond.cond[rows].to(device) if cond.cond is not None else None
            denoiser = guided(model, cond.scale, cond.uncond, rows)
            x0 = sample_fn(denoiser, noise, steps=steps, cond=c, progress=True, **sampler)
            images.append((base.pipe.decode(x0) if latent else x0).float().cpu())
    seconds = time.perf_counter() - start
    x = torch.cat(images)
    scale = args.scale or (3 if max(x.shape[-2:]) <= 64 else 1)
    out = save_grid(x, args.grid, nrow=math.ceil(num**0.5), scale=scale)
    print(f"{num} samples, {model.num_steps} model calls: {seconds:.2f} s ({1000 * seconds / num:.1f} ms/image)")
    print(f"wrote {out}")
    if args.npz:
        print(f"wrote {_save_npz(args.npz, x, cond.per_sample)}")
    return 0


_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".npz", ".npy")


def _check_folder_args(args: argparse.Namespace) -> None:
    """``--out DIR`` misuse, refused before the model loads: a file, a file name, the single-file outputs."""
    from ..errors import ConfigError, SampleFolderError

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SampleFolderError(f"--out {out} is a file; give a folder (new, or one this run wrote before)")
    if out.suffix.lower() in _IMAGE_SUFFIXES:
        raise ConfigError(f"--out takes a folder of shards, got the file name {out}; -o FILE.png writes a grid")
    if args.grid is not None or args.npz is not None or args.scale is not None:
        raise ConfigError(
            "--out writes shards (npz); -o (a PNG grid), --scale (its upscale) and --npz (one file) are for runs "
            "without --out"
        )


def _sample_folder(args: argparse.Namespace, model, base, conditions, num: int, guidance, device) -> int:
    """``cq sample --out DIR``: the seeds in shards of ``--shard-size`` (`cq.sampling.shards`), resumable, split
    over the ranks of a ``torchrun`` launch (`cq.sampling.ranks`)."""
    from ..io import checksum, file_sha256
    from ..sampling.guidance import guided
    from ..sampling.ranks import process_group
    from ..sampling.seeded import seeded_noise
    from ..sampling.shards import (
        SampleManifest,
        ShardPlan,
        existing_shards,
        open_folder,
        read_shard,
        to_uint8_nhwc,
        write_shards,
    )
    from .models import Conditioning, conditioning

    plan = ShardPlan(args.seed, num, args.shard_size or 256)
    values = list(conditions.prompts or conditions.labels) if conditions else []
    k = max(len(values), 1)
    # one row per distinct position of the cycle, indexed per sample: memory does not grow with --num
    cond = conditioning(base, conditions, k, guidance) if base is not None else Conditioning(None, 1.0, None)
    sample_fn, steps, sampler = _fitted_sampler(model, args.spacing)
    pipe = base.pipe if base is not None else None
    batch = args.batch_size or _default_batch(model.unet)
    manifest = SampleManifest(
        plan,
        {
            "model_sha256": file_sha256(args.path),
            "model_file": Path(args.path).name,
            "pipeline_fingerprint": None if pipe is None else _pipeline_fingerprint(pipe, checksum),
            "int8": bool(args.int8),
            "sampler": {"name": sample_fn.__name__, "steps": steps, **sampler},
            "conditions": {"prompts": conditions.prompts, "labels": conditions.labels} if conditions else None,
            "guidance": cond.scale,
            # floating-point results depend on the batch a sample runs in and on the device kind
            "batch_size": batch,
            "device": device.type,
        },
        shard_format=args.format,
    )
    with process_group(device) as ranks, torch.no_grad():
        device = ranks.device(device)
        model.to(device)
        if pipe is not None:  # to decode; conditions were encoded, the float UNet is idle
            pipe.first_stage.to(device)

        def draw(seeds: range, rows: range):
            noise = seeded_noise(model.sample_shape, seeds).to(device)
            index = torch.tensor([r % k for r in rows])
            c = cond.cond[index].to(device) if cond.cond is not None else None
            x0 = sample_fn(guided(model, cond.scale, cond.uncond, index), noise, steps=steps, cond=c, **sampler)
            return to_uint8_nhwc((pipe.decode(x0) if pipe is not None else x0).float().cpu())

        def prepare() -> list[int]:  # rank 0 writes or checks the manifest; every rank learns the finished shards
            open_folder(args.out, manifest)
            return existing_shards(args.out, manifest)

        done = ranks.rank_zero_first(prepare)
        pending = [i for i in range(plan.num_shards) if i not in set(done)]
        for i in ranks.share(done):  # complete by construction (atomic writes); checked, a cheap read
            read_shard(args.out, manifest, i)
        if ranks.rank == 0:
            print(
                f"cq sample: {num} samples (seeds {args.seed}..{args.seed + num - 1}) into {args.out}, "
                f"{plan.num_shards} shards of {plan.shard_size}: {len(done)} done, {len(pending)} to sample over "
                f"{ranks.world_size} process(es); {cond.describe() if conditions else 'unconditional'}, "
                f"device {device}"
            )
        start = time.perf_counter()
        mine = ranks.share(pending)
        write_shards(
            args.out,
            manifest,
            mine,
            draw,
            batch_size=batch,
            per_sample=(lambda row: values[row % k]) if values else (lambda row: None),
            desc=f"rank {ranks.rank}" if ranks.distributed else "samples",
            position=ranks.rank,
        )
        seconds = time.perf_counter() - start
        ranks.barrier()
        if ranks.rank == 0:
            finished = len(existing_shards(args.out, manifest))
            print(
                f"this process: {len(mine)} shards in {seconds:.1f} s; {args.out}: {finished} of "
                f"{plan.num_shards} shards (read them with cq.sampling.shards.read_samples)"
            )
            print(f"wrote {args.out}")
    return 0


def _pipeline_fingerprint(pipe, checksum) -> str:
    """SHA-256 of the first stage and conditioner weights (the UNet's is in the .cq file): decoding and
    conditioning change the images too."""
    parts = {"first_stage": pipe.first_stage, "conditioner": pipe.conditioner}
    return checksum(
        {f"{name}.{k}": v for name, m in parts.items() if m is not None for k, v in m.state_dict().items()}
    )


def _save_npz(path: str, images: torch.Tensor, per_sample: list) -> Path:
    """Images as uint8 ``[N, H, W, C]`` under ``arr_0`` (the layout of the ADM/torch-fidelity evaluation
    batches), class labels under ``arr_1`` or prompts under ``prompts``."""
    import numpy as np

    from ..io import atomic_path
    from ..sampling.shards import to_uint8_nhwc

    arrays = {"arr_0": to_uint8_nhwc(images)}
    if per_sample and isinstance(per_sample[0], int):
        arrays["arr_1"] = np.asarray(per_sample, dtype=np.int64)
    elif per_sample and isinstance(per_sample[0], str):
        arrays["prompts"] = np.asarray(per_sample, dtype=str)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    return Path(path)

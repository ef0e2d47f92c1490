"""``cq sample``: sample a saved model into a grid, or into a resumable folder of shards (``--out``; split
over ranks under torchrun); the work is `cq.sampling.draw.sample_images` and `cq.sampling.folder.sample_folder`."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from .args import _check_writable
from .models import _base_for, _note_guidance, _refuse_conditions


def _sample(args: argparse.Namespace) -> int:
    from ..artifact import load
    from ..errors import ConfigError
    from ..models.conditioning import fitted_guidance
    from ..models.openai_unet import LDMUNet
    from ..report.viz import save_grid, save_npz
    from ..sampling.draw import sample_images
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
        raise ConfigError(
            f"{args.path} is a latent-diffusion model, but only a UNet was loaded: pass the checkpoint or diffusers "
            "pipeline folder with its first stage as --weights, to decode the latents"
        )
    num = args.num or (len(conditions.prompts or conditions.labels) if conditions else 64)
    _note_guidance(args, model)
    if args.out is not None:
        return _sample_folder(args, model, base, conditions, num, device)
    guidance = fitted_guidance(model, args.guidance)
    cond = conditioning(base, conditions, num, guidance) if base is not None else Conditioning(None, 1.0, None)
    print(f"cq sample: {num} samples (seeds {args.seed}..{args.seed + num - 1}), {cond.describe()}, device {device}")
    start = time.perf_counter()
    x = sample_images(
        model,
        range(args.seed, args.seed + num),
        conditioning=cond,
        pipe=base.pipe if latent else None,
        spacing=args.spacing,
        batch_size=args.batch_size,
        device=device,
    )
    seconds = time.perf_counter() - start
    scale = args.scale or (3 if max(x.shape[-2:]) <= 64 else 1)
    out = save_grid(x, args.grid, nrow=math.ceil(num**0.5), scale=scale)
    print(f"{num} samples, {model.num_steps} model calls: {seconds:.2f} s ({1000 * seconds / num:.1f} ms/image)")
    print(f"wrote {out}")
    if args.npz:
        print(f"wrote {save_npz(args.npz, x, cond.per_sample)}")
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


def _sample_folder(args: argparse.Namespace, model, base, conditions, num: int, device) -> int:
    """``cq sample --out DIR``: `cq.sampling.folder.sample_folder`, and what it did."""
    from ..sampling.folder import sample_folder

    run = sample_folder(
        model,
        args.path,
        args.out,
        num=num,
        seed=args.seed,
        base=base,
        conditions=conditions,
        guidance=args.guidance,
        int8=args.int8,
        spacing=args.spacing,
        shard_size=args.shard_size or 256,
        shard_format=args.format,
        batch_size=args.batch_size,
        device=device,
        log=lambda line: print(f"cq sample: {line}"),
    )
    if run.rank == 0:
        print(
            f"this process: {run.shards} shards in {run.seconds:.1f} s; {args.out}: {run.finished} of "
            f"{run.num_shards} shards (read them with cq.sampling.shards.read_samples)"
        )
        print(f"wrote {args.out}")
    return 0

"""The ``cq`` command: ``demo``, ``fit``, ``sample``, ``report``, ``eval``, ``reproduce``, ``train``,
``train-classifier``."""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from .models.presets import sampling_defaults
from .quant.backend import Backend
from .report import print_table, tensor_bytes
from .sampling.samplers import SAMPLERS


__all__ = ["main", "build_parser", "build_report"]


def _load_base(name: str, path: str | None):
    from .models import load

    return load(name, path=path)


def _trace_for(unet, recipe, steps: int, samples: int, seed: int, sampler: dict, progress: bool = True):
    from .trace import trace

    return trace(
        unet,
        steps=steps,
        num_samples=samples,
        points=recipe.points(unet),
        seed=seed,
        **sampler,
        batch_size=min(samples, 64),
        progress=progress,
    )


# ----------------------------------------------------------------------------------------------------------------
# cq demo


def _demo(args: argparse.Namespace) -> int:
    from .metrics import predicted_speedup, unet_macs
    from .metrics.digits import DigitsScorer
    from .metrics.evaluate import evaluate
    from .recipe import cachequant, deepcache, naive, quant_only
    from .sampling import FullPrecision, ddim
    from .sampling.seeded import seeded_noise
    from .viz import save_grid

    if args.threads:
        torch.set_num_threads(args.threads)
    unet = _load_base(args.model, None)
    steps, sampler = sampling_defaults(unet, args.steps, args.spacing)
    n = args.interval
    seeds = range(args.seed, args.seed + args.num)
    print(
        f"cq demo: model={args.model} ({sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M params), "
        f"DDIM {steps} steps {sampler}, {args.num} held-out samples (seeds {seeds.start}..{seeds.stop - 1}), "
        f"interval {n}, {torch.get_num_threads()} threads"
    )
    recipes = {
        "DeepCache": deepcache(n),
        "W8A8": quant_only("w8a8"),
        "DeepCache+W8A8 (naive)": naive(n, "w8a8"),
        "CacheQuant": cachequant(n, "w8a8"),
    }
    if args.fp_only:
        recipes = {}
    scorer = DigitsScorer.embedded() if args.model == "demo" else None

    start = time.perf_counter()
    reference = ddim(FullPrecision(unet), seeded_noise(unet.sample_shape, seeds), steps=steps, **sampler)
    fp_seconds = time.perf_counter() - start
    print(f"full precision: {fp_seconds:.2f} s, {1000 * fp_seconds / args.num:.1f} ms per image")

    trace = None
    if recipes:
        fit_start = time.perf_counter()
        calib_seed = 10_000
        trace = _trace_for(unet, cachequant(n), steps, args.calib, seed=calib_seed, sampler=sampler, progress=False)
        print(
            f"trace: {args.calib} full-precision trajectories (seeds {calib_seed}..{calib_seed + args.calib - 1}, "
            f"not the evaluated ones), {time.perf_counter() - fit_start:.1f} s"
        )
    macs = unet_macs(unet)
    fid_fp = f"{scorer.fid(reference):.2f}" if scorer else "-"
    fp_mib = f"{tensor_bytes(unet) / 2**20:.2f}"
    rows = [["full precision", steps, "1.00x", "1.00x", "-", "-", "-", f"{reference.abs().max():.2f}", fid_fp, fp_mib]]
    panels, labels = [reference], ["full precision"]
    for label, recipe in recipes.items():
        model = recipe.fit(unet, trace, progress=False)
        result = evaluate(
            model, unet, seeds=seeds, steps=steps, reference_samples=reference, progress=False, **sampler
        )
        point = model.cache.point if model.cache is not None else None
        mask = model.refresh_mask()
        mac = predicted_speedup(macs["full"], macs[point], mask) if point else 1.0
        rows.append(
            [
                label,
                sum(mask),
                f"{mac:.2f}x",
                f"{fp_seconds / result.seconds:.2f}x",
                f"{result.mean_db:.1f}",
                f"{result.min_db:.1f}",
                f"{len(result.below())}",
                f"{result.max_abs_x0:.2f}",
                f"{scorer.fid(result.samples):.2f}" if scorer else "-",
                f"{tensor_bytes(model) / 2**20:.2f}",
            ]
        )
        panels.append(result.samples)
        labels.append(label)
    print_table(
        [
            "setting",
            "full calls",
            "MAC speedup",
            "wall-clock",
            "mean PSNR dB",
            "worst PSNR dB",
            "< 25 dB",
            "max |x0|",
            "digits FID",
            "MiB",
        ],
        rows,
    )
    if recipes:
        print(
            f"PSNR: x0 of each held-out sample vs full precision from the same seed, end to end ({args.num} samples; "
            "`cq.evaluate`). digits FID: vs the 1797 real digits (the embedded classifier's features; noisy at "
            "small --num). wall-clock: quantized rows run fake quantization (float kernels), so they are not "
            "faster; MiB counts tensors as stored (uint8 weights + fp32 scales)."
        )
    out = save_grid(panels, args.out, nrow=int(args.num**0.5 + 0.999), scale=args.scale, labels=labels)
    print(f"wrote {out}")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# cq fit / sample / report


def _check_writable(out: str) -> None:
    """Refuse an output path that cannot be written before hours of fitting, not after."""
    import os

    from .errors import ConfigError

    path = Path(out)
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    blocked = path.is_dir() or not parent.is_dir() or not os.access(parent, os.W_OK)
    if blocked or (path.exists() and not os.access(path, os.W_OK)):
        raise ConfigError(f"cannot write {out}: choose an output file in a writable directory (-o)")


def _fit(args: argparse.Namespace) -> int:
    from .artifact import save
    from .cli_models import conditioning, device_of, load_base, read_conditions
    from .report import report
    from .trace import trace as record

    _check_writable(args.out)
    if args.trace_dir is not None and Path(args.trace_dir).exists():
        from .errors import TraceStorageError

        raise TraceStorageError(f"--trace-dir {args.trace_dir} exists already: the trace is written to a new folder")
    device = device_of(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    conditions = read_conditions(args.prompt, args.prompts, args.class_labels)
    recipe, described = _recipe_of(args)
    budget = None
    if args.budget is not None:
        from .cache.budget_cache import parse_budget_spec
        from .errors import ConfigError
        from .recipe import cachequant

        budget, measure = parse_budget_spec(args.budget)
        if args.recipe != "cachequant" or args.schedule is not None:
            raise ConfigError("--budget picks the schedule and cache point of --recipe cachequant; drop --schedule")
        described = f"cachequant bits={args.bits} backend={args.backend}, {measure} budget {budget:g}x"
        if measure == "wall":  # timed on this machine inside Recipe.fit (BudgetCache); MAC budgets: fit_to_budget
            recipe, budget = cachequant(bits=args.bits, backend=args.backend, budget=args.budget), None
    base = load_base(args.model, args.weights, tokenizer=args.tokenizer).to(device)
    unet = base.unet
    steps, sampler = sampling_defaults(unet, args.steps, args.spacing)
    sample_fn, sampler = _sampler_named(args.sampler or base.default_sampler, sampler)
    calibration = conditioning(base, conditions, args.samples, args.guidance)
    print(
        f"cq fit: {described} on {args.model}, {sample_fn.__name__} {steps} steps {sampler}, {args.samples} "
        f"calibration trajectories (seeds {args.seed}..{args.seed + args.samples - 1}), {calibration.describe()}, "
        f"device {device}"
    )
    trace = record(
        unet,
        sample_fn,
        steps=steps,
        num_samples=args.samples,
        points=unet.cache_points() if budget is not None else recipe.points(unet),
        keep=args.keep,
        seed=args.seed,
        cond=calibration.cond,
        guidance_scale=calibration.scale,
        uncond=calibration.uncond,
        batch_size=min(args.samples, args.batch_size or _default_batch(unet)),
        storage=args.trace_dir,
        **sampler,
    )
    where = f" on disk in {args.trace_dir}" if args.trace_dir else ""
    print(
        f"trace: {trace.nbytes / 2**20:.1f} MiB stored{where} ({trace.x.shape[1]} rows per call, {trace.steps} calls)"
    )
    if budget is not None:
        from .budget import fit_to_budget
        from .recipe import cachequant

        model, choice = fit_to_budget(
            unet,
            trace,
            budget,
            recipe_for=lambda p, k: cachequant(bits=args.bits, backend=args.backend, point=p, refreshes=k),
        )
        print(f"cache points measured on calibration trajectories (* chosen):\n{choice.table()}")
    else:
        model = recipe.fit(unet, trace)
    path = save(model, args.out)
    print(report(model, reference=unet, trace=trace).summary())
    if base.pipe is not None:
        print(_LATENT_NOTE)
    print(f"wrote {path}")
    return 0


_LATENT_NOTE = "latent model: SQNR and PSNR are over the latents x0, before the first stage decodes them"


def _default_batch(unet) -> int:
    """Trajectories sampled together by default: 8 for latent UNets (SD's attention at 64x64 is large), else 64."""
    from .models.openai_unet import LDMUNet

    return 8 if isinstance(unet, LDMUNet) else 64


def _sampler_named(name: str, kwargs: dict) -> tuple:
    """``(sampler function, kwargs it takes)`` for ``--sampler NAME``; preset kwargs it lacks (DDIM's ``clip_x0``
    under PLMS) are dropped only when they hold their default."""
    import inspect

    from .errors import ConfigError

    if name not in SAMPLERS:
        raise ConfigError(f"--sampler {name!r}: expected one of {', '.join(sorted(SAMPLERS))}")
    fn = SAMPLERS[name]
    params = inspect.signature(fn).parameters
    extra = {k: v for k, v in kwargs.items() if k not in params}
    if any(v for v in extra.values()):
        raise ConfigError(f"--sampler {name} does not take the preset's {extra}; use --sampler ddim")
    return fn, {k: v for k, v in kwargs.items() if k in params}


def _recipe_of(args: argparse.Namespace):
    """The `Recipe` ``cq fit`` asks for: a preset (with ``--interval`` / ``--bits`` / ``--backend``), or a recipe
    JSON file (`cq.registry.to_dict` of a `Recipe`); ``--schedule NAME`` swaps the cacher's schedule for a
    registered one (plugins included)."""
    import dataclasses
    import json

    from .errors import ConfigError
    from .recipe import PRESET_RECIPES, Recipe
    from .registry import SCHEDULES, from_dict

    if args.recipe in PRESET_RECIPES:
        kwargs = {}
        if args.recipe != "quant_only":
            kwargs["interval"] = args.interval
        if args.recipe != "deepcache":
            kwargs["bits"] = args.bits
            kwargs["backend"] = args.backend
        recipe, described = PRESET_RECIPES[args.recipe](**kwargs), f"{args.recipe} {kwargs}"
    else:  # a .json file (`_recipe_arg` admits nothing else)
        try:
            data = json.loads(Path(args.recipe).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"--recipe {args.recipe}: not a readable recipe JSON file ({e})") from None
        if not isinstance(data, dict) or data.get("kind") != "recipe":
            raise ConfigError(
                f"--recipe {args.recipe}: expected the JSON of a Recipe (cq.registry.to_dict(recipe), "
                '{"kind": "recipe", ...})'
            )
        recipe, described = from_dict(data), args.recipe
    if not isinstance(recipe, Recipe):
        raise ConfigError(f"--recipe {args.recipe} describes a {type(recipe).__name__}, not a Recipe")
    if args.schedule is not None:
        if recipe.cacher is None:
            raise ConfigError(f"--schedule needs a recipe that caches; {args.recipe} does not")
        cls = SCHEDULES.get(args.schedule)
        fields = {f.name for f in dataclasses.fields(cls)}
        schedule = cls(interval=args.interval) if "interval" in fields else cls()
        recipe = dataclasses.replace(recipe, cacher=dataclasses.replace(recipe.cacher, schedule=schedule))
        described += f" with schedule {schedule}"
    return recipe, described


def _strategies(args: argparse.Namespace) -> int:
    from .plugins import load_entry_points
    from .registry import CACHERS, CORRECTORS, QUANTIZERS, RECIPES, SCHEDULES

    installed = load_entry_points()
    for reg in (SCHEDULES, CACHERS, QUANTIZERS, CORRECTORS, RECIPES):
        print(
            f"{reg.kind}s: "
            + ", ".join(
                f"{n} ({c.__module__}.{c.__qualname__})" for n, c in zip(reg.names(), reg.classes(), strict=True)
            )
        )
    print("plugins from entry points: " + (", ".join(installed) or "none"))
    return 0


def _sample(args: argparse.Namespace) -> int:
    from .artifact import load
    from .cli_models import Conditioning, conditioning, device_of, read_conditions
    from .errors import ConfigError
    from .models.openai_unet import LDMUNet
    from .sampling.guidance import guided
    from .sampling.seeded import seeded_noise
    from .viz import save_grid

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
        from .errors import ConfigError

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
    from .errors import ConfigError, SampleFolderError

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
    from .cli_models import Conditioning, conditioning
    from .io import checksum, file_sha256
    from .sampling.guidance import guided
    from .sampling.ranks import process_group
    from .sampling.seeded import seeded_noise
    from .sampling.shards import (
        SampleManifest,
        ShardPlan,
        existing_shards,
        open_folder,
        read_shard,
        to_uint8_nhwc,
        write_shards,
    )

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


def _base_for(model, args: argparse.Namespace, *, required: bool):
    """The full-precision base of a loaded model from ``--model`` / ``--weights`` (checked against the weights
    fingerprint the model was fitted on), or None when neither is given and ``required`` is False."""
    from .cli_models import base_of_artifact
    from .errors import ConfigError
    from .io import fingerprint

    base = None
    if required or args.model or args.weights:
        base = base_of_artifact(model.unet, args.path, args.model, args.weights, args.tokenizer)
    if base is None:
        if required:
            raise ConfigError(
                f"{args.path} needs its base model here (to condition and decode): pass --weights, the checkpoint "
                "file or diffusers folder it was fitted from (and --model PRESET for a checkpoint file)"
            )
        return None
    if model.base_fingerprint and fingerprint(base.unet) != model.base_fingerprint:
        raise ConfigError(
            f"{args.path} was fitted on other weights than {args.weights or args.model} (weights fingerprint "
            "differs); pass the checkpoint it was fitted from"
        )
    return base


def _refuse_conditions(args: argparse.Namespace, conditions) -> None:
    """A pixel-space (DDPM) model is unconditional: prompts, labels and guidance are misuse."""
    from .errors import ConfigError

    if conditions:
        raise ConfigError(f"{args.path} is an unconditional model: drop {conditions.options()}")
    if args.guidance is not None and args.guidance != 1.0:
        raise ConfigError(f"{args.path} is an unconditional model: --guidance does not apply, drop it")


def _guidance(args: argparse.Namespace, model) -> float | None:
    """``--guidance``, else the scale the model was calibrated with (None: the preset's)."""
    if args.guidance is None:
        return model.calibration_guidance
    fitted = model.calibration_guidance
    if fitted is not None and fitted != args.guidance:
        print(f"note: {args.path} was calibrated with guidance {fitted:g}; sampling with {args.guidance:g}")
    return args.guidance


def _save_npz(path: str, images: torch.Tensor, per_sample: list) -> Path:
    """Images as uint8 ``[N, H, W, C]`` under ``arr_0`` (the layout of the ADM/torch-fidelity evaluation
    batches), class labels under ``arr_1`` or prompts under ``prompts``."""
    import numpy as np

    from .io import atomic_path
    from .sampling.shards import to_uint8_nhwc

    arrays = {"arr_0": to_uint8_nhwc(images)}
    if per_sample and isinstance(per_sample[0], int):
        arrays["arr_1"] = np.asarray(per_sample, dtype=np.int64)
    elif per_sample and isinstance(per_sample[0], str):
        arrays["prompts"] = np.asarray(per_sample, dtype=str)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    return Path(path)


def _fitted_sampler(model, spacing: str | None):
    """``(sampler, steps, kwargs)`` a loaded model must be sampled with: its recorded `SamplerSettings`
    (``--spacing`` other than the fitted one is refused by the sampler), else, for files written before those
    were recorded, DDIM with the preset's defaults."""
    from .sampling import ddim, sampler_of

    settings = model.sampler_settings
    if settings is None:
        steps, kwargs = sampling_defaults(model.unet, model.num_steps, spacing)
        return ddim, steps, kwargs
    kwargs = settings.call_kwargs()
    if spacing is not None:
        kwargs["spacing"] = spacing
    return sampler_of(settings), kwargs.pop("steps"), kwargs


class _InProcess:
    """`cq.reproduce.Commands`: ``cq`` sub-commands run in this process (their `CqError`s propagate)."""

    def run(self, argv: list[str]) -> int:
        args = build_parser().parse_args(argv)
        return args.func(args)

    def report(self, argv: list[str]):
        return build_report(build_parser().parse_args(argv))[0]


def _reproduce(args: argparse.Namespace) -> int:
    from .reproduce import run_reproduce

    return run_reproduce(args, _InProcess())


def _report(args: argparse.Namespace) -> int:
    rep, base = build_report(args)
    print(rep.summary())
    if base is not None and base.pipe is not None:
        print(_LATENT_NOTE)
    if args.steps_table:
        print(rep.table())
    if args.plot:
        print(f"wrote {rep.plot(args.plot)}")
    return 0


def build_report(args: argparse.Namespace):
    """``(Report, base or None)`` of ``cq report``'s arguments (``cq reproduce`` reads its figures)."""
    from .artifact import load
    from .cli_models import conditioning, device_of, read_conditions
    from .errors import ConfigError
    from .models.openai_unet import LDMUNet
    from .report import report

    device = device_of(args.device)
    conditions = read_conditions(args.prompt, args.prompts, args.class_labels)
    model = load(args.path)
    if not isinstance(model.unet, LDMUNet):
        _refuse_conditions(args, conditions)
    base = _base_for(model, args, required=False)
    if base is None and (conditions or args.guidance is not None):
        raise ConfigError(
            "--prompt / --class-labels / --guidance condition the comparison with the base model: pass --weights "
            "(and --model PRESET for a checkpoint file)"
        )
    reference = trace = evaluation = None
    if base is not None:
        from .trace import trace as record

        reference = base.unet
        guidance = _guidance(args, model)
        calibration = conditioning(base, conditions, args.samples, guidance)
        model.to(device)
        base.to(device)
        sample_fn, steps, sampler = _fitted_sampler(model, None)
        batch = args.batch_size or _default_batch(reference)
        trace = record(
            reference,
            sample_fn,
            steps=steps,
            num_samples=args.samples,
            seed=20_000,
            **sampler,
            cond=calibration.cond,
            guidance_scale=calibration.scale,
            uncond=calibration.uncond,
            batch_size=min(batch, args.samples),
            points=[model.cache.point] if model.cache is not None else [],
            progress=False,
        )
        if args.eval > 0:
            from .metrics.evaluate import evaluate

            held_out = conditioning(base, conditions, args.eval, guidance)
            seeds = range(args.eval_seed, args.eval_seed + args.eval)
            evaluation = evaluate(
                model,
                reference,
                sample_fn,
                seeds=seeds,
                steps=steps,
                cond=held_out.cond,
                guidance_scale=held_out.scale,
                uncond=held_out.uncond,
                batch_size=batch,
                progress=True,
                stability=args.stability or None,
                **sampler,
            )
        print(f"compared with {base.name}: {calibration.describe()}")
    return report(model, reference=reference, trace=trace, evaluation=evaluation), base


def _train_classifier(args: argparse.Namespace) -> int:
    from .metrics.digits import train_digits_classifier

    out, accuracy = train_digits_classifier(args.out, seed=args.seed, epochs=args.epochs)
    print(f"test accuracy {accuracy:.4f} on the held-out 20% of the digits; wrote {out}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, train

    config = TrainConfig(
        preset=args.preset,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        warmup=args.warmup,
        x0_weight_cap=args.x0_weight_cap,
        init=args.init,
    )
    out = train(config, args.out)
    print(f"wrote {out} (resumable state: {Path(args.out).with_suffix('.state.pt')})")
    return 0


# ----------------------------------------------------------------------------------------------------------------


def _count(minimum: int):
    """argparse type: an int >= ``minimum`` (a clear usage error otherwise, never a silent default)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = f"int>={minimum}"
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _stability_eps(text: str) -> float:
    """``--stability``: a nudge > 0, or 0 to skip."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number (e.g. 0.01; 0 skips), got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0 (e.g. 0.01), or 0 to skip; got {text}")
    return value


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _add_model_args(parser: argparse.ArgumentParser, *, fit: bool) -> None:
    """The options every command that runs the base model shares: weights, conditioning, guidance, device."""
    if not fit:
        parser.add_argument(
            "--model",
            default=None,
            help="base model preset or diffusers folder (default: the preset the file names, or --weights' folder)",
        )
    parser.add_argument(
        "--weights",
        default=None,
        help="checkpoint file (.ckpt / .safetensors) or diffusers folder of the preset; latent presets load whole "
        "(UNet, first stage, text encoder or class embedder)",
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="CLIP tokenizer for a CompVis SD checkpoint (a folder with vocab.json + merges.txt, or "
        "bpe_simple_vocab_16e6.txt.gz); diffusers folders carry theirs",
    )
    parser.add_argument(
        "--prompt", action="append", default=[], metavar="TEXT", help="text models: a prompt (repeatable)"
    )
    parser.add_argument("--prompts", default=None, metavar="FILE", help="text models: a file, one prompt per line")
    parser.add_argument(
        "--class-labels",
        default=None,
        metavar="LABELS",
        help="class-conditional models (ldm-cin256-v2): labels 1,2,3 or a file of labels",
    )
    parser.add_argument(
        "--guidance",
        type=_finite_float,
        default=None,
        help="classifier-free guidance scale (1: none; default: "
        + ("the preset's, e.g. 7.5 for SD, 1.5 for LDM-ImageNet)" if fit else "the scale the model was fitted with)"),
    )
    parser.add_argument(
        "--batch-size", type=POSITIVE, default=None, help="samples run together (default: 8 latent, 64 pixel models)"
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps (default: cpu)")


def _recipe_arg(text: str) -> str:
    """``--recipe``: a preset name or a ``.json`` file (read later, so its errors name the file)."""
    from .recipe import PRESET_RECIPES

    if text in PRESET_RECIPES or text.endswith(".json"):
        return text
    raise argparse.ArgumentTypeError(
        f"expected one of {', '.join(PRESET_RECIPES)} or a recipe .json file, got {text!r}"
    )


POSITIVE, NON_NEGATIVE = _count(1), _count(0)
SPACINGS = ("uniform", "quad", "ldm", "linspace")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cq", description="Cache + quantize diffusion UNets (CacheQuant).")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE first: the strategies it registers can be fitted, saved, loaded (repeatable)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="compress the embedded demo model with each recipe; table + grid")
    demo.add_argument("--model", default="demo", help="preset with embedded weights (default: demo)")
    demo.add_argument("--num", type=POSITIVE, default=64, help="number of samples")
    demo.add_argument("--steps", type=POSITIVE, default=None, help="DDIM steps (default: the preset's)")
    demo.add_argument("--spacing", choices=SPACINGS, default=None, help="timestep spacing (default: the preset's)")
    demo.add_argument("--interval", type=POSITIVE, default=5, help="cache interval N")
    demo.add_argument("--calib", type=POSITIVE, default=32, help="calibration trajectories")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--scale", type=POSITIVE, default=3, help="upscale factor of the PNG")
    demo.add_argument("--threads", type=POSITIVE, default=None)
    demo.add_argument("--fp-only", action="store_true", help="only sample the full-precision model")
    demo.add_argument("-o", "--out", default="cq_demo.png")
    demo.set_defaults(func=_demo)

    fit = sub.add_parser("fit", help="fit a recipe on a model and save it")
    fit.add_argument("--model", default="demo", help="model preset or diffusers folder")
    _add_model_args(fit, fit=True)
    fit.add_argument(
        "--recipe",
        default="cachequant",
        type=_recipe_arg,
        help="cachequant, deepcache, quant_only, naive, or a recipe .json file (cq.registry.to_dict of a Recipe)",
    )
    fit.add_argument(
        "--schedule", default=None, help="registered schedule name replacing the recipe's (plugins included)"
    )
    fit.add_argument("--interval", type=POSITIVE, default=5)
    fit.add_argument(
        "--budget",
        default=None,
        help="speedup to meet, e.g. 5x (MACs) or '2.5x wall' (seconds measured on this machine): picks the "
        "refreshes, DPS schedule and cache point with the least calibration error (cachequant only; replaces "
        "--interval)",
    )
    fit.add_argument("--bits", default="w8a8")
    fit.add_argument(
        "--backend",
        default="fake",
        choices=[b.value for b in Backend],
        help="fake quantization, or integer kernels (saved with the recipe: `cq sample` runs them)",
    )
    fit.add_argument("--steps", type=POSITIVE, default=None)
    fit.add_argument("--spacing", choices=SPACINGS, default=None, help="timestep spacing (default: the preset's)")
    fit.add_argument(
        "--sampler", choices=sorted(SAMPLERS), default=None, help="default: the preset's (SD: plms, else ddim)"
    )
    fit.add_argument("--samples", type=POSITIVE, default=32, help="calibration trajectories")
    fit.add_argument(
        "--keep", type=POSITIVE, default=None, help="trajectories stored at every step (default: all; bounds memory)"
    )
    fit.add_argument(
        "--trace-dir",
        default=None,
        help="keep the calibration trace in this new folder, memory-mapped, instead of memory (every trajectory "
        "can then be kept: the fit's memory does not grow with --keep or the steps); it is left there for reuse",
    )
    fit.add_argument("--seed", type=int, default=10_000)
    fit.add_argument("--threads", type=POSITIVE, default=None)
    fit.add_argument("-o", "--out", required=True, help="output file (.cq)")
    fit.set_defaults(func=_fit)

    sample = sub.add_parser("sample", help="sample a saved model into a grid, or into a resumable folder of shards")
    sample.add_argument("path")
    sample.add_argument(
        "-n",
        "--num",
        type=POSITIVE,
        default=None,
        help="samples (default: one per prompt / label, 64 unconditional); under torchrun write -n N (torchrun's "
        "own parser reads --num as an abbreviation of its --numa-binding)",
    )
    _add_model_args(sample, fit=False)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument(
        "--spacing", choices=SPACINGS, default=None, help="must be the spacing the model was fitted with"
    )
    sample.add_argument("--int8", action="store_true", help="run quantized layers on int8 kernels")
    sample.add_argument(
        "--scale", type=POSITIVE, default=None, help="upscale factor of the PNG (default: 3 up to 64 px, else 1)"
    )
    sample.add_argument("--threads", type=POSITIVE, default=None)
    sample.add_argument(
        "-o",
        "--grid",
        dest="grid",
        default=None,
        help="PNG grid of the samples (default cq_samples.png; not with --out)",
    )
    sample.add_argument("--npz", default=None, help="also write the images (uint8 NHWC arr_0; labels arr_1) here")
    sample.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="write the samples into this folder in npz shards + manifest.json instead of a grid; resumable (the "
        "same command continues a killed run); torchrun --nproc-per-node K -m cq sample splits the shards",
    )
    sample.add_argument("--shard-size", type=POSITIVE, default=None, help="samples per shard with --out (default 256)")
    sample.add_argument(
        "--format",
        choices=("npz", "png"),
        default="npz",
        help="--out shards: shard-00000.npz (uint8 NHWC arr_0, seeds, labels arr_1 / prompts), or folders "
        "shard-00000/ of one PNG per seed + shard.json",
    )
    sample.set_defaults(func=_sample)

    rep = sub.add_parser(
        "report",
        help="per-step schedule, MACs, size; given the base model (--model / --weights): teacher-forced SQNR and "
        "held-out quality",
    )
    rep.add_argument("path")
    _add_model_args(rep, fit=False)
    rep.add_argument("--samples", type=POSITIVE, default=8, help="trajectories of the teacher-forced per-step SQNR")
    rep.add_argument(
        "--eval",
        type=NON_NEGATIVE,
        default=64,
        help="held-out samples of the end-to-end evaluation (0: skip; needs the base: --model / --weights)",
    )
    rep.add_argument("--eval-seed", type=int, default=30_000, help="first held-out seed of the evaluation")
    rep.add_argument(
        "--stability",
        type=_stability_eps,
        default=1e-2,
        metavar="EPS",
        help="also sample full precision from each seed's noise nudged by EPS x N(0, 1): seeds where that moves "
        "its sample below 35 dB are unstable, and the evaluation is stated on all and on the stable seeds "
        "(0: skip; one more full-precision sampling)",
    )
    rep.add_argument("--steps-table", action="store_true")
    rep.add_argument("--plot", default=None, help="write the schedule / error plot here (PNG)")
    rep.set_defaults(func=_report)

    from .train import TrainConfig

    d = TrainConfig()
    tr = sub.add_parser("train", help="train the demo model on scikit-learn digits (resumable)")
    tr.add_argument("--preset", default=d.preset)
    tr.add_argument("--steps", type=POSITIVE, default=d.steps)
    tr.add_argument("--batch-size", type=POSITIVE, default=d.batch_size)
    tr.add_argument("--lr", type=_positive_float, default=d.lr)
    tr.add_argument("--seed", type=int, default=d.seed)
    tr.add_argument("--warmup", type=NON_NEGATIVE, default=d.warmup)
    tr.add_argument("--x0-weight-cap", type=_positive_float, default=d.x0_weight_cap, help="1: plain eps loss")
    tr.add_argument("--init", default=d.init, help="weights to fine-tune from (default: random init)")
    tr.add_argument("-o", "--out", default="demo.safetensors")
    tr.set_defaults(func=_train)

    tc = sub.add_parser("train-classifier", help="train the digits classifier behind the demo's digits FID")
    tc.add_argument("--seed", type=int, default=0)
    tc.add_argument("--epochs", type=POSITIVE, default=30)
    tc.add_argument("-o", "--out", default="digits_classifier.safetensors")
    tc.set_defaults(func=_train_classifier)

    from .cli_eval import add_eval_parser

    add_eval_parser(sub, POSITIVE, NON_NEGATIVE)
    from .reproduce import add_reproduce_parser

    add_reproduce_parser(sub, POSITIVE).set_defaults(func=_reproduce)

    st = sub.add_parser("strategies", help="list the registered strategies (plugins and entry points included)")
    st.set_defaults(func=_strategies)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``cq`` command. A `CqError` is printed as one line (``cq <command>: error: ...``) and exits 2;
    ``--debug`` shows the traceback instead."""
    from .errors import CqError

    args = build_parser().parse_args(argv)
    try:
        from .plugins import load_plugin

        for module in args.plugin:
            load_plugin(module)
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except CqError as e:
        if args.debug:
            raise
        print(f"cq {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

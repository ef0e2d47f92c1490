"""``cq fit``: fit a recipe on a model (a preset, a checkpoint or a diffusers folder) and save it."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..models.presets import sampling_defaults
from ..sampling.samplers import SAMPLERS
from .args import (
    _check_writable,
)
from .models import _LATENT_NOTE, _default_batch


def _fit(args: argparse.Namespace) -> int:
    from ..artifact import save
    from ..calib.trace import trace as record
    from ..report.summary import report
    from .models import conditioning, device_of, load_base, read_conditions

    _check_writable(args.out)
    if args.trace_dir is not None and Path(args.trace_dir).exists():
        from ..errors import TraceStorageError

        raise TraceStorageError(f"--trace-dir {args.trace_dir} exists already: the trace is written to a new folder")
    device = device_of(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    conditions = read_conditions(args.prompt, args.prompts, args.class_labels)
    recipe, described = _recipe_of(args)
    budget = None
    if args.budget is not None:
        from ..errors import ConfigError
        from ..fit.budget_cache import parse_budget_spec
        from ..fit.recipe import cachequant

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
        from ..fit.budget import fit_to_budget
        from ..fit.recipe import cachequant

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


def _sampler_named(name: str, kwargs: dict) -> tuple:
    """``(sampler function, kwargs it takes)`` for ``--sampler NAME``; preset kwargs it lacks (DDIM's ``clip_x0``
    under PLMS) are dropped only when they hold their default."""
    import inspect

    from ..errors import ConfigError

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

    from ..errors import ConfigError
    from ..fit.recipe import PRESET_RECIPES, Recipe
    from ..registry import SCHEDULES, from_dict

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

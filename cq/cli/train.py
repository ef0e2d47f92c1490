"""``cq train`` and ``cq train-classifier``: the demo model and the digits classifier behind its FID."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path


def _train_classifier(args: argparse.Namespace) -> int:
    from ..metrics.digits import train_digits_classifier

    out, accuracy = train_digits_classifier(args.out, seed=args.seed, epochs=args.epochs)
    print(f"test accuracy {accuracy:.4f} on the held-out 20% of the digits; wrote {out}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from ..models.train import TrainConfig, train

    # the options of cq train are named as TrainConfig's fields (those not offered keep their defaults)
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)})
    out = train(config, args.out)
    print(f"wrote {out} (resumable state: {Path(args.out).with_suffix('.state.pt')})")
    return 0

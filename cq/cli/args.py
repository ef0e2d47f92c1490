"""The ``cq`` commands' argument types (a clear usage error, never a silent default), the options shared by the
commands that run a base model, and the check of an output path before the work that writes it."""

from __future__ import annotations

import argparse
import math
from pathlib import Path


__all__ = ["POSITIVE", "NON_NEGATIVE", "SPACINGS"]


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


def _float(text: str, ok, must: str, expected: str = "a number") -> float:
    """``float(text)`` when ``ok`` of it, else a usage error: ``expected ..., got TEXT`` / ``{must} TEXT``."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"{must} {text}")
    return value


def _positive_float(text: str) -> float:
    return _float(text, lambda v: v > 0 and math.isfinite(v), "must be a finite number > 0, got")


def _stability_eps(text: str) -> float:
    """``--stability``: a nudge > 0, or 0 to skip."""
    must = "must be a finite number > 0 (e.g. 0.01), or 0 to skip; got"
    return _float(text, lambda v: math.isfinite(v) and v >= 0, must, "a number (e.g. 0.01; 0 skips)")


def _finite_float(text: str) -> float:
    return _float(text, math.isfinite, "must be a finite number, got")


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
    from ..fit.recipe import PRESET_RECIPES

    if text in PRESET_RECIPES or text.endswith(".json"):
        return text
    raise argparse.ArgumentTypeError(
        f"expected one of {', '.join(PRESET_RECIPES)} or a recipe .json file, got {text!r}"
    )


POSITIVE, NON_NEGATIVE = _count(1), _count(0)
SPACINGS = ("uniform", "quad", "ldm", "linspace")


# cq fit / sample / report


def _check_writable(out: str) -> None:
    """Refuse an output path that cannot be written before hours of fitting, not after."""
    import os

    from ..errors import ConfigError

    path = Path(out)
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    blocked = path.is_dir() or not parent.is_dir() or not os.access(parent, os.W_OK)
    if blocked or (path.exists() and not os.access(path, os.W_OK)):
        raise ConfigError(f"cannot write {out}: choose an output file in a writable directory (-o)")


def add_num_samples(parser: argparse.ArgumentParser, *, dest: str, former: str, **kwargs) -> None:
    """``-n/--num-samples``, the one spelling of a sample count across the commands; ``former`` (``--num``,
    ``--samples``) still parses, unlisted, for one release."""
    parser.add_argument("-n", "--num-samples", dest=dest, **kwargs)
    parser.add_argument(former, dest=dest, type=kwargs.get("type"), default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def example(*lines: str) -> dict:
    """``add_parser`` keywords that end a command's ``--help`` with an example."""
    return {
        "epilog": "example:\n" + "\n".join(f"  {line}" for line in lines),
        "formatter_class": argparse.RawDescriptionHelpFormatter,
    }

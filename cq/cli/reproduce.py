"""``cq reproduce``: ``--list`` prints the CacheQuant paper's rows (`cq.report.paper_rows`); ``cq reproduce ROW``
runs one through `cq.report.reproduce.run_row` (fit -> sample -> eval -> report) and prints measured vs paper."""

from __future__ import annotations

import argparse

from ..errors import ConfigError
from ..report.paper_rows import LIST_HEADERS, ROWS, PaperNumbers, PaperRow, list_rows, row_named
from ..report.reproduce import run_row
from .args import add_num_samples, example
from .models import device_of


__all__ = ["PaperNumbers", "PaperRow", "ROWS", "row_named", "run_row", "list_rows", "run_reproduce"]


def run_reproduce(args: argparse.Namespace) -> int:
    """``cq reproduce`` (registered by `add_reproduce_parser`)."""
    from ..report import paper_rows
    from ..report.summary import print_table

    if args.list:
        if args.row is not None:
            raise ConfigError("cq reproduce --list lists the rows; run one with cq reproduce ROW (without --list)")
        print_table(LIST_HEADERS, list_rows(), title="CacheQuant paper rows (cq reproduce ROW)")
        for r in paper_rows.ROWS:
            print(f"- {r.name}: {r.title}. Paper numbers: {r.paper.source}." + (f" {r.note}." if r.note else ""))
        return 0
    if args.row is None:
        raise ConfigError("cq reproduce needs a ROW (see cq reproduce --list)")
    row = row_named(args.row)
    table = run_row(
        row,
        out=args.out or f"reproduce-{row.name}",
        weights=args.weights,
        num=args.num,
        calibration=args.calib,
        psnr_samples=args.psnr_samples or min(args.num or row.num_samples or 256, 256),
        ref=args.ref,
        inception_weights=args.inception_weights,
        clip_weights=args.clip_weights,
        clip_arch=args.clip_arch,
        prompts=args.prompts,
        device=device_of(args.device),
        batch_size=args.batch_size,
    )
    print_table(["quantity", "measured", "paper"], table, title=f"{row.name}: {row.title}")
    print(f"paper numbers: {row.paper.source}")
    return 0


def add_reproduce_parser(sub, positive) -> argparse.ArgumentParser:
    """Register ``cq reproduce`` on the subparsers ``sub`` (``positive``: the CLI's int type)."""
    rp = sub.add_parser(
        "reproduce",
        help="the CacheQuant paper's rows: --list shows them with their settings; ROW runs fit -> sample -> eval",
        **example("cq reproduce --list", "cq reproduce demo --out reproduce-demo"),
    )
    rp.add_argument("row", nargs="?", help="a row name from --list")
    rp.add_argument("--list", action="store_true", help="list the rows, their settings and the paper's numbers")
    rp.add_argument("--weights", default=None, help="checkpoint of the row's preset (not needed for demo)")
    add_num_samples(
        rp, dest="num", former="--num", type=positive, default=None, help="samples (default: the paper's count)"
    )
    rp.add_argument("--calib", type=positive, default=None, help="calibration trajectories (default: the paper's)")
    rp.add_argument(
        "--psnr-samples",
        type=positive,
        default=None,
        help="held-out samples of the PSNR vs full precision (default: the sample count, at most 256)",
    )
    rp.add_argument("--out", default=None, help="working folder (default reproduce-ROW); finished steps are reused")
    rp.add_argument("--ref", default=None, help="FID reference: statistics .npz (cq eval --make-ref) or real images")
    rp.add_argument("--inception-weights", default=None, metavar="PATH", help="as in cq eval")
    rp.add_argument("--clip-weights", default=None, metavar="PATH|TAG", help="as in cq eval")
    rp.add_argument("--clip-arch", default="ViT-L-14")
    rp.add_argument("--prompts", default=None, metavar="FILE", help="prompts of text rows, one per line")
    rp.add_argument("--batch-size", type=positive, default=None)
    rp.add_argument("--device", default="cpu")
    rp.set_defaults(func=run_reproduce)
    return rp

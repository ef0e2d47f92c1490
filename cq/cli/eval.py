"""``cq eval``: FID / IS / precision-recall / CLIP score of a sample set; ``cq eval --make-ref`` for the reference.

The library side is `cq.metrics.fidelity` and `cq.metrics.reference`; this module parses options and prints.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import ConfigError
from ..metrics.reference import EXTRACTORS, extractor_named, read_reference
from .args import example


__all__ = ["add_eval_parser", "run_eval", "extractor_named", "read_reference"]


def run_eval(args: argparse.Namespace) -> int:
    from ..io import atomic_path
    from ..metrics.clip_score import ClipScorer
    from ..metrics.extractors import has_spatial
    from ..metrics.fidelity import check_metrics, make_reference, measure
    from ..metrics.image_set import read_image_set
    from ..report.summary import print_table

    if args.make_ref is not None:
        if args.path is not None or args.ref is not None:
            raise ConfigError("--make-ref IMAGES -o REF.npz builds a reference; do not pass samples or --ref with it")
        if args.out is None:
            raise ConfigError("--make-ref needs -o REF.npz, the file to write")
        images = read_image_set(args.make_ref)
        extractor = extractor_named(args.extractor, args.inception_weights, args.device)
        ref = make_reference(images, extractor, keep_features=args.keep_features, batch_size=args.batch_size)
        out = ref.save(args.out)
        kept = 0 if ref.features is None else ref.features.shape[0]
        spatial = "" if ref.spatial is None else f", mu_s/sigma_s ({ref.spatial.mean.shape[0]}-d spatial, for sFID)"
        print(
            f"wrote {out}: mu/sigma of {images.count} images ({extractor.name}, {ref.dim}-d){spatial}, "
            f"{kept} feature rows"
        )
        return 0
    if args.path is None:
        raise ConfigError("cq eval needs the samples (a folder of shards, a .npz or an image folder) or --make-ref")
    if args.out is not None:
        raise ConfigError("-o is the output of --make-ref; write the metrics of an evaluation with --json PATH")
    if args.metrics is not None:
        check_metrics(args.metrics)  # before loading Inception / CLIP
    images = read_image_set(args.path)
    extractor = extractor_named(args.extractor, args.inception_weights, args.device)
    reference = read_reference(
        args.ref, extractor, batch_size=args.batch_size, keep_features=args.keep_features, log=print
    )
    clip = None
    if args.clip_weights is not None:
        clip = ClipScorer.from_open_clip(args.clip_arch, args.clip_weights, device=args.device)
    metrics = args.metrics
    if metrics is None:
        metrics = ["fid", "is"] if reference is not None else ["is"]
        if reference is not None and reference.spatial is not None and has_spatial(extractor):
            metrics.append("sfid")
        if reference is not None and reference.features is not None:
            metrics.append("pr")
        if clip is not None:
            metrics.append("clip")
    result = measure(images, extractor, reference, metrics=metrics, clip=clip, batch_size=args.batch_size)
    ref_note = f", reference {args.ref or 'the extractor data statistics'}" if reference is not None else ""
    print(f"cq eval: {images.count} images ({images.layout}) from {args.path}, {extractor.name}{ref_note}")
    print_table(["metric", "value"], result.rows())
    if args.json:
        with atomic_path(args.json) as tmp:
            Path(tmp).write_text(json.dumps(result.as_dict(), indent=2))
        print(f"wrote {args.json}")
    return 0


def _metrics_arg(text: str) -> list[str]:
    from ..metrics.fidelity import METRICS

    names = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in names if m not in METRICS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {', '.join(METRICS)}, got {text!r}")
    return names


def add_eval_parser(sub, positive, non_negative) -> None:
    """Register ``cq eval`` on the subparsers ``sub`` (``positive`` / ``non_negative``: the CLI's int types)."""
    ev = sub.add_parser(
        "eval",
        help="FID / IS / precision-recall / CLIP score of samples against reference statistics "
        "(torch-fidelity, open_clip: pip install 'cq[eval]')",
        description="Weights of the feature extractors come from --inception-weights / --clip-weights. Without a "
        "path, torch-fidelity (open_clip: a pretrained tag) fetches them into the library's own cache when absent.",
        **example("cq eval samples/ --ref ref_stats.npz"),
    )
    ev.add_argument("path", nargs="?", help="samples: a folder of shard-*.npz, a .npz (arr_0 uint8 NHWC), or images")
    ev.add_argument(
        "--ref",
        default=None,
        help="reference: statistics .npz (mu, sigma; ADM / clean-fid layout) or real images "
        "(default with --extractor digits: the real digits)",
    )
    ev.add_argument("--make-ref", default=None, metavar="IMAGES", help="build reference statistics of IMAGES (-o)")
    ev.add_argument("-o", "--out", default=None, help="output .npz of --make-ref")
    ev.add_argument(
        "--keep-features",
        type=non_negative,
        default=10_000,
        help="real feature rows stored in the reference for precision / recall (0: none; default 10000)",
    )
    ev.add_argument("--extractor", choices=EXTRACTORS, default="inception", help="feature space (default inception)")
    ev.add_argument(
        "--inception-weights",
        default=None,
        metavar="PATH",
        help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth (default: torch-fidelity's cache, which it "
        "downloads into when empty)",
    )
    ev.add_argument(
        "--metrics",
        type=_metrics_arg,
        default=None,
        help="comma-separated: fid,sfid,is,pr,clip (sfid: Inception's spatial features against the reference's "
        "mu_s / sigma_s); default: fid,is (+sfid when the reference has spatial statistics, +pr when it has "
        "features, +clip with --clip-weights)",
    )
    ev.add_argument("--clip-arch", default="ViT-L-14", help="open_clip architecture (default ViT-L-14)")
    ev.add_argument(
        "--clip-weights",
        default=None,
        metavar="PATH|TAG",
        help="open_clip checkpoint file, or a pretrained tag such as 'openai' (fetched into open_clip's cache)",
    )
    ev.add_argument("--batch-size", type=positive, default=64)
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--json", default=None, help="also write the metrics here (JSON)")
    ev.set_defaults(func=run_eval)

"""The ``cq`` command (``cq = "cq.cli:main"``): `build_parser` and `main` in `cq.cli.parser`, each sub-command in
its own module (`cq.cli.demo`, `cq.cli.fit`, `cq.cli.sample`, `cq.cli.report`, `cq.cli.train`, `cq.cli.eval`,
`cq.cli.reproduce`), the options they share in `cq.cli.args`, the base models they load in `cq.cli.models`. Each
parses its options, calls the library (`cq.models.base`, `cq.fit.plan`, `cq.sampling.folder`, `cq.report.build`,
`cq.report.reproduce`, ...) and prints."""

from .parser import build_parser, main
from .report import build_report


__all__ = ["main", "build_parser", "build_report"]

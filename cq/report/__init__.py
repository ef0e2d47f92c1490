"""What a compressed model does and costs: the per-step `Report` and its tables (`cq.report.summary`), built from a
saved model and its base (`cq.report.build`); image grids and arrays of samples (`cq.report.viz`); the CacheQuant
paper's rows (`cq.report.paper_rows`) and their reproduction, measured against the paper (`cq.report.reproduce`)."""

from .build import build_report
from .summary import Report, StepReport, print_table, report, tensor_bytes
from .viz import save_grid, save_npz, to_uint8_grid


__all__ = [
    "Report",
    "StepReport",
    "report",
    "build_report",
    "print_table",
    "tensor_bytes",
    "save_grid",
    "save_npz",
    "to_uint8_grid",
]

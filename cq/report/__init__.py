"""What a compressed model does and costs: the per-step `Report` and its tables (`cq.report.summary`), and image
grids of samples (`cq.report.viz`)."""

from .summary import Report, StepReport, print_table, report, tensor_bytes
from .viz import save_grid, to_uint8_grid


__all__ = ["Report", "StepReport", "report", "print_table", "tensor_bytes", "save_grid", "to_uint8_grid"]

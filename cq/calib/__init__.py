"""Calibration data: `cq.calib.trace` records one full-precision sampling run (`Trace`; the function is
``cq.trace``), `cq.calib.replay` runs recorded inputs through a compressed UNet the way its cache would."""

from .replay import CalibrationBatch, every_step
from .trace import Trace


__all__ = ["Trace", "CalibrationBatch", "every_step"]

"""Peak memory of fitting a recipe on a full-size architecture with random weights.

    python bench/fit_memory.py [--preset ldm-cin256-v2] [--steps 20] [--samples 2] [--keep 2] [--guidance 3]
    python bench/fit_memory.py --samples 4 --keep 4 --storage /scratch/trace   # the trace on disk

One fit per process (peak RSS is per process): trace ``--samples`` guided trajectories of ``--steps`` DDIM calls,
keep ``--keep`` of them, fit CacheQuant N=5 W8A8; prints the model's, the trace's and the fit's peak RSS and the
stored trace bytes, from which a longer sampler or more kept trajectories extrapolate (README, "LDM-ImageNet from
the command line"). Conditioning is a random context of the preset's shape (the class embedder's output): memory
does not depend on its values.

With ``--storage`` the trace is memory-mapped from that folder (``cq.trace(storage=)``; removed at the end). Its
pages count in RSS while they are resident but are file-backed page cache the kernel drops or writes back under
memory pressure, so the column that says what the fit needs is the peak *anonymous* memory (``RssAnon`` of
/proc/self/status, sampled every 20 ms).
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import threading
import time
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_line, print_table  # noqa: E402

import cq  # noqa: E402


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


class AnonPeak:
    """Peak ``RssAnon`` (memory not backed by a file) of this process, sampled in a thread; ``take()`` returns the
    peak since the last call and starts a new interval."""

    def __init__(self, every: float = 0.02):
        self.peak, self.every, self.stop = 0, every, threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    @staticmethod
    def now() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))  # KiB

    def _run(self) -> None:
        while not self.stop.wait(self.every):
            self.peak = max(self.peak, self.now())

    def take(self) -> float:
        peak, self.peak = max(self.peak, self.now()), 0
        return peak / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="ldm-cin256-v2")
    ap.add_argument("--steps", type=int, default=20, help="DDIM calls (uniform spacing: a divisor of 1000)")
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--keep", type=int, default=2)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--storage", default=None, help="keep the trace in this (new) folder, memory-mapped")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_line())
    anon = AnonPeak()
    unet = cq.models.build(args.preset, seed=0)
    rows = [["model built", "-", f"{peak_gib():.2f}", f"{anon.take():.2f}", "-"]]
    context = getattr(unet.config, "context_dim", None)
    cond = uncond = None
    if context:
        cond, uncond = torch.randn(args.samples, 1, context), torch.randn(1, 1, context)
    recipe = cq.cachequant(interval=5)
    start = time.perf_counter()
    trace = cq.trace(
        unet,
        steps=args.steps,
        num_samples=args.samples,
        keep=args.keep,
        batch_size=args.samples,
        points=recipe.points(unet),
        cond=cond,
        guidance_scale=args.guidance if context else 1.0,
        uncond=uncond,
        storage=args.storage,
        progress=False,
    )
    stored = f"{trace.nbytes / 2**30:.3f}" + (" (disk)" if args.storage else "")
    rows.append(["trace", f"{time.perf_counter() - start:.0f}", f"{peak_gib():.2f}", f"{anon.take():.2f}", stored])
    start = time.perf_counter()
    try:
        recipe.fit(unet, trace, progress=False)
    finally:
        if args.storage:
            shutil.rmtree(args.storage, ignore_errors=True)
    rows.append(
        [
            "fit (CacheQuant N=5 W8A8)",
            f"{time.perf_counter() - start:.0f}",
            f"{peak_gib():.2f}",
            f"{anon.take():.2f}",
            "-",
        ]
    )
    params = sum(p.numel() for p in unet.parameters()) / 1e6
    title = f"{args.preset} ({params:.0f} M params), {args.steps} calls, {args.samples} samples, keep {args.keep}" + (
        ", trace on disk" if args.storage else ""
    )
    print_table(["phase", "s", "peak RSS GiB", "peak anonymous GiB", "trace stored GiB"], rows, title=title)


if __name__ == "__main__":
    main()

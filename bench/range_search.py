"""How well calibration's sampled activation-range search matches the search on the whole tensor.

    python bench/range_search.py [--seeds 6] [--elements 262144]

Calibration cannot afford the 40-candidate L_p search over every element of a large activation, so it searches
a sample (`cq.quant.calibrate._weighted_sample`: the 256 largest and smallest values exactly, plus strided middle
values standing for the rest). For Gaussian, Laplace and Student-t(4) tensors this prints, per bit width, the
whole-tensor L_p error of the range each estimate picks divided by the optimum (the full search's), and how often
it kept plain min-max. "strided + extremes" weights the extremes like any strided value.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_line, print_table  # noqa: E402

from cq.quant.affine import lp_error, search_range  # noqa: E402
from cq.quant.calibrate import SEARCH_ELEMENTS, _weighted_sample  # noqa: E402
from cq.quant.spec import QuantSpec  # noqa: E402


DISTRIBUTIONS = {
    "normal": lambda n: torch.randn(n),
    "laplace": lambda n: torch.distributions.Laplace(0.0, 1.0).sample((n,)),
    "student-t(4)": lambda n: torch.distributions.StudentT(4.0).sample((n,)),
}


def strided_plus_extremes(x: torch.Tensor) -> torch.Tensor:
    step = -(-x.numel() // SEARCH_ELEMENTS)
    return torch.cat([x[::step], x.min()[None], x.max()[None]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--elements", type=int, default=SEARCH_ELEMENTS * 32)
    args = parser.parse_args()
    print(machine_line())
    rows = []
    for name, draw in DISTRIBUTIONS.items():
        for bits in (4, 8):
            spec = QuantSpec(bits=bits, per_step=True)
            ratios = {"strided + extremes": [], "weighted sample": []}
            minmax = dict.fromkeys(ratios, 0)
            for seed in range(args.seeds):
                torch.manual_seed(seed)
                x = draw(args.elements)
                best = float(lp_error(x, *search_range(x, spec), spec))
                values, weights = _weighted_sample(x)
                picks = {
                    "strided + extremes": search_range(strided_plus_extremes(x), spec),
                    "weighted sample": search_range(values, spec, weights=weights),
                }
                for label, (lo, hi) in picks.items():
                    ratios[label].append(float(lp_error(x, lo, hi, spec)) / best)
                    minmax[label] += int(bool(hi == x.max()) and bool(lo == x.min()))
            for label, r in ratios.items():
                rows.append(
                    [name, bits, label, f"{sum(r) / len(r):.3f}", f"{max(r):.3f}", f"{minmax[label]}/{len(r)}"]
                )
    print_table(["distribution", "bits", "estimate", "mean error / optimum", "worst", "kept min-max"], rows)
    print(f"{args.elements} elements per tensor, {args.seeds} seeds; sample budget {SEARCH_ELEMENTS} + 2 x 256 tails")


if __name__ == "__main__":
    main()

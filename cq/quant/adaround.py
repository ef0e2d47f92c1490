"""AdaRound weight rounding (Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training Quantization"),
per layer, for the weights of cq's fake-quant layers (``weight_rounding="adaround"``).

Each weight may only round down or up: its code is ``floor(w / s) + z + h(V)`` with ``h`` the rectified sigmoid
``clip(sigmoid(V) (ζ - γ) + γ, 0, 1)`` (ζ = 1.1, γ = -0.1), ``V`` learned by Adam to minimise the layer's output
error on the calibration inputs plus the regulariser ``λ mean(1 - |2 h(V) - 1|^β)`` that pushes every ``h`` to 0
or 1, with ``β`` annealed from 20 to 2 after a warm-up without it (the paper's schedule). The output error is in
units of round-to-nearest's, so that one λ (`REGULARISATION`) serves every layer. Measured (scratch, 500 steps):
with the paper's unnormalised sum and λ = 0.01, a random 3-bit layer with large correlated inputs came out no
better than nearest (1000 steps); on two 4-bit layers of the demo model (``down.1.downsample.conv``,
``up.2.block.1.nin_shortcut``) λ = 100 reached 10x / 5x below nearest's output error, where λ = 0.3-3 ended
1.2-6x above λ = 100 (GPTQ on the same layers: 30x / 5x below nearest). The learned code is then
``floor + z + [V >= 0]``, clamped to the grid. The output error of a linear layer (a conv's unfolded patches) on
fixed inputs ``x`` is ``Σ_o e_oᵀ H e_o`` with ``e`` the weight error and ``H = E[x xᵀ]`` -- the same input second
moment GPTQ uses (`cq.quant.gptq.record_hessians`, recorded on the cached model's calibration calls, cached calls
included, with weights rounded to nearest and activations not yet quantized), so one replay serves every layer.
Layers are rounded one at a time, in model order; if the learned codes' output error is above round-to-nearest's,
nearest is kept (the result is never worse than nearest on the calibration inputs).

This is the per-layer objective of AdaRound, not BRECQ's per-block one: the inputs are full precision ones
(not those of the already rounded layers before it), and a block's layers are not reconstructed jointly.

Cost: `ITERATIONS` Adam steps per layer, each a product ``[out, d] x [d, r]`` and its gradient (d = a conv's
``C kh kw``; the loss uses the ``r`` leading eigen-directions of ``H`` holding `ENERGY` of its trace, the final
choice against nearest the whole ``H``). Progress per layer (tqdm); an interruption (Ctrl-C) stops
the reconstruction, keeps the layers finished, leaves the others at nearest rounding and warns.
"""

from __future__ import annotations

import torch
from torch import Tensor


__all__ = ["adaround_round", "rectified_sigmoid", "ITERATIONS", "REGULARISATION"]

ITERATIONS = 500  # Adam steps per layer: bounds the CPU time (each: an [out, d] x [d, r] product and its gradient)
LEARNING_RATE = 3e-2  # Adam on V (1e-2 left a 4-bit layer 2-3x further from GPTQ's output error in as many steps)
REGULARISATION = 100.0  # λ: the regulariser (a mean over weights) in units of nearest's output error
WARMUP = 0.2  # fraction of the iterations without the regulariser
BETA = (20.0, 2.0)  # the regulariser's exponent, annealed linearly from the first to the second after warm-up
ZETA, GAMMA = 1.1, -0.1  # stretch of the rectified sigmoid
ENERGY = 0.9999  # the optimised loss keeps H's leading eigen-directions holding this share of its trace


def input_factor(hessian: Tensor, energy: float = ENERGY) -> Tensor:
    """``F`` ``[d, r]`` with ``F Fᵀ`` the best rank-r approximation of the PSD ``hessian`` (its leading
    eigen-directions, scaled by the square roots of their eigenvalues), r the fewest holding ``energy`` of its
    trace: ``|e F|²`` is the output error ``e H eᵀ`` up to a share ``1 - energy`` of the input energy, at
    ``r / d`` of the cost (conv patch inputs are strongly correlated: r is a fraction of d)."""
    values, vectors = torch.linalg.eigh(hessian.double())
    values = values.clamp(min=0).flip(0)
    vectors = vectors.flip(1)
    total = float(values.sum())
    if total <= 0:
        return torch.zeros(hessian.shape[0], 1, dtype=torch.float32, device=hessian.device)
    kept = int(torch.searchsorted(values.cumsum(0) / total, torch.tensor(energy, dtype=values.dtype))) + 1
    kept = min(kept, values.shape[0])
    return (vectors[:, :kept] * values[:kept].sqrt()).float()


def rectified_sigmoid(v: Tensor) -> Tensor:
    """``h(V) = clip(sigmoid(V) (ζ - γ) + γ, 0, 1)``."""
    return (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def _output_error(error: Tensor, hessian: Tensor) -> Tensor:
    """``Σ_o e_oᵀ H e_o``: the summed squared output error per input row."""
    return ((error @ hessian) * error).sum()


def adaround_round(
    weight: Tensor,
    hessian: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    qmin: int,
    qmax: int,
    *,
    iterations: int | None = None,
    regularisation: float = REGULARISATION,
    learning_rate: float = LEARNING_RATE,
) -> Tensor:
    """Integer codes (as float, ``[out, d]``) for ``weight`` ``[out, d]`` on per-column grids, each the floor or
    the ceiling of ``w / s`` (plus the zero point, clamped to ``[qmin, qmax]``), learned for the output error
    under the input second moment ``hessian`` ``[d, d]``.

    ``scale`` / ``zero_point``: ``[out, d]`` (as `cq.quant.gptq.gptq_round` takes them). Columns the calibration
    never excites (zero diagonal) are rounded to nearest. ``iterations``: Adam steps (default `ITERATIONS`).
    Deterministic: no random draw."""
    iterations = ITERATIONS if iterations is None else iterations
    w = weight.detach().float()
    s, z = scale.detach().float(), zero_point.detach().float()
    h = hessian.detach().float().to(w.device)
    scaled = w / s
    base = torch.floor(scaled)
    nearest = (torch.round(scaled) + z).clamp(qmin, qmax)

    def codes_error(codes: Tensor) -> float:
        return float(_output_error(w - (codes - z) * s, h))

    factor = input_factor(h)
    # the output error in units of round-to-nearest's, the regulariser a mean over weights: one λ for every layer
    unit = max(float(((w - (nearest - z) * s) @ factor).pow(2).sum()), 1e-30)
    # V such that h(V) is the fractional part: the relaxed start is the unrounded weight
    frac = (scaled - base).clamp(1e-4, 1 - 1e-4)
    v = (-torch.log((ZETA - GAMMA) / (frac - GAMMA) - 1)).requires_grad_(True)
    optimizer = torch.optim.Adam([v], lr=learning_rate)
    warmup = int(WARMUP * iterations)
    with torch.enable_grad():
        for it in range(iterations):
            soft = rectified_sigmoid(v)
            error = w - ((base + z + soft).clamp(qmin, qmax) - z) * s
            loss = (error @ factor).pow(2).sum() / unit
            if it >= warmup and regularisation > 0:
                progress = (it - warmup) / max(1, iterations - warmup)
                beta = BETA[0] + (BETA[1] - BETA[0]) * progress
                loss = loss + regularisation * (1 - (2 * soft - 1).abs().pow(beta)).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    learned = (base + z + (v.detach() >= 0).float()).clamp(qmin, qmax)
    dead = torch.diagonal(h) == 0
    learned[:, dead] = nearest[:, dead]
    return learned if codes_error(learned) <= codes_error(nearest) else nearest

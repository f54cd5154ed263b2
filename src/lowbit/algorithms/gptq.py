"""GPTQ (Frantar et al. 2022): quantize a weight column by column, feeding each column's error forward to the
columns not yet quantized, weighted by the inverse Hessian of the layer's inputs.

With H = E[x x^T] (in x in) and U the upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, for column
j: q_j = Q(w_j), e_j = (w_j - q_j) / U_jj, and every later column k gets w_k -= e_j U_jk (lazily, in blocks
of `block_size` columns). With `act_order` the columns go by descending diag(H); the scales are fixed from
the whole weight beforehand (static groups), so every group keeps the scale it is stored with.

GPTAQ (Li et al. 2025, "asymmetric calibration"): a layer of the quantized model reads inputs x_q that differ
from the float model's x_f by the error of the layers before it. Minimising ||Q x_q - W x_f||^2 instead of
||(Q - W) x_q||^2 over the tokens is GPTQ on the target W~ = W + W D H^-1 with D = E[(x_f - x_q) x_q^T]
(`asymmetric_target`): ||Q x_q - W x_f||^2 = tr((Q - W~) H (Q - W~)^T) + const. With x_f = x_q it is W.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.errors import LowbitError

log = logging.getLogger(__name__)

MAX_DAMP_TRIES = 6  # damp, 10 damp, ... before giving up


def asymmetric_target(w: Tensor, hessian: Tensor, cross: Tensor, damp: float, alpha: float = 1.0) -> Tensor:
    """GPTAQ's target W + alpha W D (H + lambda I)^-1 (float32), for D = `cross` = E[(x_f - x_q) x_q^T]
    (in x in), lambda = damp * mean(diag H) as in GPTQ; alpha = 1 is the exact minimiser, smaller values
    trust the correction less (GPTAQ's alpha, 0.25 there)."""
    w = w.detach().float()
    h = hessian.float()
    lower, info = torch.linalg.cholesky_ex(damped(h, damp * max(float(torch.diagonal(h).mean()), 1e-8)))
    if int(info) != 0:  # GPTQ raises the damping for this Hessian itself
        log.warning("GPTAQ: Hessian not positive definite at damp %g; GPTQ's own target W is used", damp)
        return w
    correction = torch.cholesky_solve((w @ cross.float()).t(), lower).t()  # (W D) H^-1, H symmetric
    return w + alpha * correction


def damped(hessian: Tensor, lam: float) -> Tensor:
    """H + lam I as a new matrix (no identity matrix built)."""
    h = hessian.clone()
    h.diagonal().add_(lam)
    return h


def inverse_hessian_factor(hessian: Tensor, damp: float, name: str = "") -> tuple[Tensor, float]:
    """(U upper-triangular with U^T U = (H + lambda I)^-1, the damping fraction used). On a Cholesky failure
    the damping is raised tenfold and retried; after MAX_DAMP_TRIES a LowbitError, never garbage."""
    diag_mean = float(torch.diagonal(hessian).mean())
    frac = damp
    for _ in range(MAX_DAMP_TRIES):
        # at most three in x in matrices at a time (the caller's H, then two): each is freed once the next
        # exists, and the damping goes on the diagonal in place
        lower, info = torch.linalg.cholesky_ex(damped(hessian, frac * max(diag_mean, 1e-8)))
        if int(info) == 0:
            inv = torch.cholesky_inverse(lower)
            del lower
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            del inv
            if int(info) == 0 and torch.isfinite(upper).all():
                if frac != damp:
                    log.warning(
                        "%s: Hessian not positive definite at damp %g; used damp %g", name, damp, frac
                    )
                return upper, frac
        frac *= 10
    raise LowbitError(
        f"{name}: GPTQ's Hessian stays singular up to damp {frac / 10:g}; the calibration data barely reaches "
        "this module: use more --calib-size, or another --algorithm for it"
    )


@dataclass(frozen=True)
class HessianFactor:
    """What GPTQ derives from the Hessian alone (`factor_hessian`), the same for every weight and every round
    that reads this Hessian: the column order, U (upper, U^T U = (H + lambda I)^-1 in that order) and the
    damping fraction used."""

    perm: Tensor
    upper: Tensor
    damp: float


@torch.no_grad()
def factor_hessian(
    hessian: Tensor, damp: float = 0.01, act_order: bool = True, name: str = ""
) -> HessianFactor:
    """GPTQ's Hessian preparation: inputs that were always zero get H_jj = 1 (any value is exact there), the
    columns go by descending diag(H) with `act_order`, then `inverse_hessian_factor`."""
    h = hessian.float().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    n = h.shape[0]
    perm = (
        torch.argsort(torch.diagonal(h), descending=True) if act_order else torch.arange(n, device=h.device)
    )
    h = h[perm[:, None], perm]
    upper, used = inverse_hessian_factor(h, damp, name)
    return HessianFactor(perm, upper, used)


@torch.no_grad()
def gptq_quantize(
    w: Tensor,
    hessian: Tensor,
    quantize_columns: Callable[[Tensor, Tensor], Tensor],
    *,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = True,
    name: str = "",
    factor: HessianFactor | None = None,
) -> tuple[Tensor, float]:
    """(quantized weight (out, in) float32, damping used). `quantize_columns(cols, idx)` fake-quantizes the
    columns `idx` (original order) of the weight given as `cols` (out, len(idx)) with their fixed scales.
    `factor`: `factor_hessian(hessian, damp, act_order)` computed once for several calls on this Hessian."""
    if factor is None:
        factor = factor_hessian(hessian, damp, act_order, name)
    perm, u = factor.perm, factor.upper
    w = w.detach().float()[:, perm]
    n = w.shape[1]
    q = torch.zeros_like(w)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        w1 = w[:, i1:i2].clone()
        err = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i : i + 1]
            qc = quantize_columns(col, perm[i1 + i : i1 + i + 1])
            q[:, i1 + i] = qc[:, 0]
            e = torch.sub(col[:, 0], qc[:, 0], out=err[:, i]).div_(u1[i, i])
            # only the columns after i are read again (column i's own update is never used)
            w1[:, i + 1 :] -= e[:, None] * u1[i : i + 1, i + 1 :]
        w[:, i2:] -= err @ u[i1:i2, i2:]
    out = torch.empty_like(q)
    out[:, perm] = q
    return out, factor.damp

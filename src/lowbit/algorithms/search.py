"""Scale searches: clip ratios for weight blocks (AWQ's clip search, MSE), percentile / MSE activation amax.

Weight blocks: for each ratio r in 1.0, 1 - step, ..., `clip_min`, quantize with amax * r and keep, per
scale block, the ratio with the smallest error: `d_b^T H_bb d_b` with the Hessian's diagonal block for the
block's input columns (AWQ's clip search), or `|d_b|^2` without a Hessian (MSE). Blocks never grow: r <= 1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.formats.elements import round_to_grid
from lowbit.formats.scaled import ScaledFormat, fake_quant, reduce_amax


def clip_ratios(n: int, clip_min: float) -> list[float]:
    return [1.0 - i * (1.0 - clip_min) / max(n - 1, 1) for i in range(n)]


@torch.no_grad()
def search_weight_amax(
    w: Tensor, fmt: ScaledFormat, ratios: list[float], hessian: Tensor | None = None
) -> Tensor:
    """Per-block amax (fmt's scale shape) minimising each block's error; the first-level format's blocks
    (NVFP4 keeps its tensor amax)."""
    w = w.detach().float()
    amax = reduce_amax(w, fmt)
    gamax = w.abs().amax() if fmt.global_scale else None
    if not fmt.symmetric:
        return amax  # asymmetric formats keep min/max (no search)
    weight = _block_weights(w, fmt, hessian)
    best_loss = torch.full(amax.shape, float("inf"), device=w.device)
    best = amax.clone()
    for r in ratios:
        d = fake_quant(w, fmt, amax=amax * r, global_amax=gamax) - w
        loss = _block_loss(d, fmt, weight, amax.shape)
        better = loss < best_loss
        best_loss = torch.where(better, loss, best_loss)
        best = torch.where(better, amax * r, best)
    return best


def _block_weights(w: Tensor, fmt: ScaledFormat, hessian: Tensor | None) -> Tensor | None:
    """The Hessian's diagonal blocks (n_groups, g, g) for group/row formats, its diagonal otherwise."""
    if hessian is None:
        return None
    if fmt.granularity == "group":
        g = fmt.group_size
        assert g is not None
        n = w.shape[1] // g
        return torch.stack([hessian[i * g : (i + 1) * g, i * g : (i + 1) * g] for i in range(n)])
    if fmt.granularity == "row":
        return hessian.unsqueeze(0)
    return torch.diagonal(hessian)


def _block_loss(d: Tensor, fmt: ScaledFormat, weight: Tensor | None, shape: torch.Size) -> Tensor:
    if weight is None:
        return _sum_blocks(d.pow(2), fmt, shape)
    if weight.dim() == 1:  # diagonal weighting (tensor / 2-D block formats)
        return _sum_blocks(d.pow(2) * weight, fmt, shape)
    db = d.reshape(d.shape[0], weight.shape[0], weight.shape[1])  # (out, groups, g)
    return torch.einsum("ong,ngh,onh->on", db, weight, db).reshape(shape)


def _sum_blocks(e: Tensor, fmt: ScaledFormat, shape: torch.Size) -> Tensor:
    # reduce_amax's block view, with sums instead of maxima
    from lowbit.formats.scaled import to_blocks

    return to_blocks(e, fmt).sum(-1).reshape(shape)


@torch.no_grad()
def activation_amax(
    samples: Tensor, fmt: ScaledFormat, method: str, percentile: float, ratios: list[float]
) -> Tensor:
    """A per-tensor activation amax from sampled |x| values: their `percentile`, or the clip of their max
    with the smallest fake-quantization MSE."""
    x = samples.float()
    top = x.abs().amax()
    if method == "percentile":
        k = max(1, round(x.numel() * percentile / 100.0))
        return x.abs().flatten().kthvalue(min(k, x.numel())).values.clamp(max=top)
    best, best_loss = top, float("inf")
    for r in ratios:
        a = top * r
        s = a / fmt.element.max
        loss = float((round_to_grid(x / s, fmt.element) * s - x).pow(2).mean())
        if loss < best_loss:
            best, best_loss = a, loss
    return best

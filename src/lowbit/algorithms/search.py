"""Scale searches: clip ratios for weight blocks (AWQ's clip search, MSE), percentile / MSE activation amax.

Weight blocks: for each ratio r in 1.0, 1 - step, ..., `clip_min`, quantize with amax * r and keep, per
scale block, the ratio with the smallest error: `d_b^T H_bb d_b` with the Hessian's diagonal block for the
block's input columns (AWQ's clip search), or `|d_b|^2` without a Hessian (MSE). Blocks never grow: r <= 1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.algorithms.stats import row_output_errors
from lowbit.formats.elements import round_to_grid
from lowbit.formats.scaled import ScaledFormat, fake_quant, reduce_amax
from lowbit.formats.scales import Stats, scales


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
        d = fake_quant(w, fmt, amax=amax * r, global_amax=gamax).sub_(w)
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


CHUNK_ELEMENTS = 1 << 24  # rows x groups x in_features per step of the refit (64 MB of fp32)


@torch.no_grad()
def refit_group_amax(
    w: Tensor, wq: Tensor, fmt: ScaledFormat, amax: Tensor, global_amax: Tensor | None, hessian: Tensor
) -> tuple[Tensor, Tensor]:
    """(per-group amax in fmt's scale shape, the weight on it): scales that, with the grid values of `wq`
    kept, minimise each row's output error `(w - wq') H (w - wq')^T`. The G group scales of a row are a
    linear least-squares fit (a G x G system per row), then put on the scale grid; rows where that is not
    better keep `amax` and `wq`.

    `wq` is w quantized with `amax` (after GPTQ, whose codes assumed the old scales); the fit is exact
    because changing a group's scale moves all its elements along their codes.
    """
    assert fmt.granularity == "group" and fmt.group_size is not None and fmt.symmetric
    w, wq, h = w.detach().float(), wq.detach().float(), hessian.float()
    out, n = w.shape
    gs = fmt.group_size
    groups = n // gs
    eff = scales(fmt, Stats(amax, global_amax)).effective  # (out, groups): scale x global scale
    codes = wq.view(out, groups, gs) / eff[..., None]
    hb = h.view(groups, gs, n)
    fitted = torch.empty_like(eff)
    step = max(1, CHUNK_ELEMENTS // (groups * n))
    for r0 in range(0, out, step):
        c = codes[r0 : r0 + step]
        t = torch.einsum("ogk,gkj->ogj", c, hb)  # codes placed in their group's columns, times H
        a = torch.einsum("oghk,ohk->ogh", t.view(-1, groups, groups, gs), c)
        b = torch.einsum("ogj,oj->og", t, w[r0 : r0 + step])
        empty = c.abs().sum(-1) == 0  # a group of zeros: any scale is exact
        a = a + torch.diag_embed(empty.float())
        ridge = 1e-9 * a.diagonal(dim1=-2, dim2=-1).abs().amax(-1).clamp(min=1e-30)
        a = a + ridge[:, None, None] * torch.eye(groups, device=a.device)
        s, info = torch.linalg.solve_ex(a, b.unsqueeze(-1))
        s = s.squeeze(-1)
        ok = torch.isfinite(s) & (s > 0) & ~empty & (info == 0)[:, None]
        fitted[r0 : r0 + step] = torch.where(ok, s, eff[r0 : r0 + step])
    new_amax = fitted * fmt.element.max  # the amax whose scale is `fitted` (both levels for NVFP4)
    new_eff = scales(fmt, Stats(new_amax, global_amax)).effective  # on the scale grid
    new_wq = (codes * new_eff[..., None]).view(out, n)
    new_wq = fake_quant(new_wq, fmt, amax=new_amax, global_amax=global_amax)  # exactly as the quantizer has it
    old_err = row_output_errors(wq - w, h)
    new_err = row_output_errors(new_wq - w, h)
    better = (new_err < old_err)[:, None]
    return torch.where(better, new_amax, amax.float().reshape(new_amax.shape)), torch.where(better, new_wq, wq)

"""SmoothQuant and AWQ: per-input-channel scales s that move difficulty between a Linear's input and weight.

The layer computes `(x / s) @ (W * s)^T == x @ W^T`: 1/s is folded exactly into the module that produces x
(a norm's weight, or the output rows of the Linear before) and s into the input columns of every Linear
that reads x (`fold`). The float model's output is unchanged; only what is quantized changes.

- SmoothQuant: `s_j = max|x_j|^a / max|W_j|^(1-a)`, clamped to [1e-4, 1e4].
- AWQ: candidates `s = mean|x|^a` and `s = mean|x|^a / w_mean^(1-a)` (w_mean: |W| normalised by its group
  max, averaged over output rows), each divided by sqrt(max(s) min(s)), for a on a grid in [0, 1); the
  one with the smallest output error `sum_l tr(D_l H D_l^T)`, `D_l = Q(W_l s) / s - W_l`, wins. a = 0
  gives s = 1: AWQ never does worse than round-to-nearest on its objective.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from lowbit.algorithms.stats import output_error

SCALE_MIN, SCALE_MAX = 1e-4, 1e4  # SmoothQuant's clamp


def pool(per_input: Tensor, channel_map: Tensor | None, n_prev: int, reduce: str) -> Tensor:
    """Per-input-channel values -> per-channel of the producing module (max or mean over the input channels
    one producer channel feeds; identity without a map)."""
    if channel_map is None:
        return per_input
    out = torch.zeros(n_prev, dtype=per_input.dtype, device=per_input.device)
    if reduce == "amax":
        return out.scatter_reduce(0, channel_map, per_input, "amax", include_self=False)
    return out.scatter_reduce(0, channel_map, per_input, "mean", include_self=False)


def expand(s: Tensor, channel_map: Tensor | None) -> Tensor:
    return s if channel_map is None else s[channel_map]


def weight_amax(weights: Sequence[Tensor]) -> Tensor:
    """max_l max_i |W_l[i, j]| per input channel j."""
    return torch.stack([w.detach().abs().amax(0).float() for w in weights]).amax(0)


def smoothquant_scales(act_amax: Tensor, w_amax: Tensor, alpha: float) -> Tensor:
    """s_j = max|x_j|^alpha / max|W_j|^(1 - alpha) (clamped); 1 for channels never active."""
    s = act_amax.float().clamp(min=1e-8).pow(alpha) / w_amax.clamp(min=1e-8).pow(1 - alpha)
    s = s.clamp(SCALE_MIN, SCALE_MAX)
    return torch.where((act_amax > 0) & (w_amax > 0), s, torch.ones_like(s))


def weight_importance(weights: Sequence[Tensor], group_size: int | None) -> Tensor:
    """AWQ's w_mean: |W| divided by the max of its quantization group, averaged over all output rows."""
    w = torch.cat([w.detach().float() for w in weights], 0)
    g = group_size or w.shape[1]
    blocks = w.abs().reshape(w.shape[0], -1, g)
    blocks = blocks / blocks.amax(-1, keepdim=True).clamp(min=1e-8)
    return blocks.reshape(w.shape).mean(0)


def awq_candidates(x_mean: Tensor, w_mean: Tensor, grid: int) -> list[tuple[str, Tensor]]:
    """[(label, s)] for a = i / grid, i < grid, in both AWQ forms (the first is a = 0, s = 1)."""
    x = x_mean.float().clamp(min=1e-8)
    w = w_mean.float().clamp(min=1e-8)
    out = []
    for i in range(grid):
        a = i / grid
        out.append((f"x^{a:.2f}", _normalise(x.pow(a))))
        if i:
            out.append((f"x^{a:.2f}/w^{1 - a:.2f}", _normalise(x.pow(a) / w.pow(1 - a))))
    return out


def power_of_two(s: Tensor) -> Tensor:
    """s rounded to the nearest power of two (in log scale): multiplying and dividing by it is exact in any
    binary floating-point dtype, so a fold with it changes no stored value beyond its exponent."""
    return torch.exp2(torch.log2(s.float()).round())


def _normalise(s: Tensor) -> Tensor:
    s = s.clamp(SCALE_MIN, SCALE_MAX)
    return s / (s.max() * s.min()).sqrt()


def awq_search(
    weights: Sequence[Tensor],
    hessian: Tensor | Sequence[Tensor],
    candidates: Sequence[tuple[str, Tensor]],
    quantize: Callable[[Tensor], Tensor],
    channel_map: Tensor | None = None,
) -> tuple[Tensor, str, list[float]]:
    """(best s, its label, loss of every candidate): the loss is the output error of the smoothed,
    quantized weights `sum_l tr(D_l H_l D_l^T)`, D_l = Q(W_l * s) / s - W_l (one H for all, or one each)."""
    losses = []
    ws = [w.detach().float() for w in weights]
    hs = [hessian] * len(ws) if isinstance(hessian, Tensor) else list(hessian)
    for _, s in candidates:
        si = expand(s, channel_map)
        loss = sum(float(output_error((quantize(w * si) / si).sub_(w), h)) for w, h in zip(ws, hs, strict=True))
        losses.append(loss)
    best = min(range(len(losses)), key=losses.__getitem__)
    return candidates[best][1], candidates[best][0], losses


@torch.no_grad()
def fold(
    prev: nn.Module, linears: Sequence[nn.Module], s: Tensor, channel_map: Tensor | None = None,
    norm_offset: float = 0.0,
) -> None:  # fmt: skip
    """Divide prev's output channels by s (a norm's weight and bias, or a Linear's output rows and bias) and
    multiply the input columns of `linears` (Linears, or routers with a weight) by s (expanded through
    `channel_map`). In place. A norm that scales by `norm_offset + weight` (Gemma: 1 + w) gets
    w' = (norm_offset + w) / s - norm_offset."""
    weight = prev.weight
    assert isinstance(weight, Tensor)
    sp = s.to(weight.device)
    if weight.dim() == 1:
        weight.add_(norm_offset).div_(sp.to(weight.dtype)).sub_(norm_offset)
    else:
        weight.div_(sp.to(weight.dtype)[:, None])
    bias = getattr(prev, "bias", None)
    if isinstance(bias, Tensor):
        bias.div_(sp.to(bias.dtype))
    si = expand(sp, channel_map)
    for linear in linears:
        w = linear.weight
        assert isinstance(w, Tensor)
        w.mul_(si.to(w.dtype))

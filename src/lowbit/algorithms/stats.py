"""Statistics of each quantized Linear's input, gathered with forward hooks during one calibration pass.

Linears that read the same tensor (q/k/v, gate/up) share one `InputStats`, so the Hessian of a shared input
is accumulated once. Per input channel j over the n tokens x seen:

- `amax[j]   = max |x_j|`                       (SmoothQuant)
- `absmean[j] = sum |x_j| / n`                  (AWQ)
- `hessian   = sum x x^T / n`   (in x in, fp32)  (GPTQ, AWQ's loss, the per-layer error report)

The output error of a weight change D (out x in) on these inputs is `tr(D H D^T)` (`output_error`), which is
how AWQ's searches and the error report measure a candidate without keeping the activations.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from lowbit.models import moe


@dataclass
class InputStats:
    in_features: int
    hessian_rows: int | None = None  # tokens per batch that go into the Hessian (None: all)
    track_absmean: bool = True  # False: no absmean (only AWQ reads it), one pass less over each input
    n: int = 0  # rows seen
    mass: float = 0.0  # their total weight (= n without weights)
    n_hessian: float = 0.0  # total weight of the rows in the Hessian
    rows_seen: int = 0  # rows that went into the Hessian
    amax: Tensor | None = None
    abssum: Tensor | None = None
    hessian_sum: Tensor | None = field(default=None, repr=False)
    # with hessian_rows: the sampled rows themselves while they are fewer than in_features (smaller than the
    # in x in Hessian; the error report of a wide Linear such as down_proj needs no 127 MB matrix)
    rows: list[Tensor] = field(default_factory=list, repr=False)
    cross_sum: Tensor | None = field(default=None, repr=False)  # sum (x_f - x_q) x_q^T (GPTAQ)
    n_cross: float = 0.0
    # which input tensor these rows come from (`collect_inputs`): equal for the routing-weighted statistics of
    # MoE experts that all read the block's one input, each with its own token weights
    source: int | None = None
    # how each accumulated field combines over processes that saw different batches (passes.Reducer): sums
    # add, maxima take the max; the report's sampled rows are gathered (a process past in_features rows holds
    # their Hessian instead: the rows then go into the sum)
    REDUCTIONS: ClassVar[dict[str, str]] = {
        "n": "SUM", "mass": "SUM", "n_hessian": "SUM", "rows_seen": "SUM", "amax": "MAX", "abssum": "SUM",
        "hessian_sum": "SUM", "rows": "GATHER", "cross_sum": "SUM", "n_cross": "SUM",
    }  # fmt: skip

    @torch.no_grad()
    def add(self, x: Tensor, weight: Tensor | None = None) -> None:
        """Accumulate the rows of x; `weight` (rows,) weights each row in absmean, the Hessian and the cross
        term (a routed expert's tokens, `moe.TokenWeights`); amax stays over every row."""
        x = x.detach().reshape(-1, self.in_features)
        if weight is not None:
            weight = weight.detach().reshape(-1).float()
        if self.track_absmean:
            a = x.float().abs()
            amax = a.amax(0)
            part = a.sum(0) if weight is None else weight @ a
            self.abssum = part if self.abssum is None else self.abssum.add_(part)
            del a
        else:  # max |x| without a |x| copy; exact in the input's dtype
            amax = torch.maximum(x.amax(0), x.amin(0).neg()).float()
        self.amax = amax if self.amax is None else torch.maximum(self.amax, amax)
        self.n += x.shape[0]
        self.mass += x.shape[0] if weight is None else float(weight.sum())
        if (
            self.hessian_rows is not None and x.shape[0] > self.hessian_rows
        ):  # evenly spaced tokens of this batch
            pick = torch.linspace(0, x.shape[0] - 1, self.hessian_rows, device=x.device).long()
            x = x[pick]
            weight = None if weight is None else weight[pick]
        x = x.float()
        self.n_hessian += x.shape[0] if weight is None else float(weight.sum())
        if weight is not None:
            x = x * weight.sqrt()[:, None]
        self.rows_seen += x.shape[0]
        if self.hessian_rows is not None and self.hessian_sum is None and self.rows_seen < self.in_features:
            self.rows.append(x.clone())
            return
        if self.hessian_sum is None:
            self.hessian_sum = torch.zeros(self.in_features, self.in_features, device=x.device)
            for r in self.rows:
                self.hessian_sum.addmm_(r.t(), r)
            self.rows = []
        self.hessian_sum.addmm_(x.t(), x)

    @torch.no_grad()
    def add_cross(self, x: Tensor, reference: Tensor, weight: Tensor | None = None) -> None:
        """Accumulate (x_f - x_q) x_q^T for the float model's input `reference` of the same tokens as x (rows
        weighted as in `add`)."""
        x = x.detach().reshape(-1, self.in_features).float()
        e = reference.detach().reshape(-1, self.in_features).float() - x
        if self.cross_sum is None:
            self.cross_sum = torch.zeros(self.in_features, self.in_features, device=x.device)
        if weight is not None:
            w = weight.detach().reshape(-1).float()
            e = e * w[:, None]
            self.n_cross += float(w.sum())
        else:
            self.n_cross += x.shape[0]
        self.cross_sum.addmm_(e.t(), x)

    @property
    def cross(self) -> Tensor | None:
        """E[(x_f - x_q) x_q^T] (in x in), None without a reference pass."""
        return None if self.cross_sum is None else self.cross_sum / max(self.n_cross, 1e-30)

    @property
    def absmean(self) -> Tensor:
        assert self.abssum is not None
        return self.abssum / max(self.mass, 1e-30)

    @property
    def hessian(self) -> Tensor | None:
        """E[x x^T] over the tokens seen (fp32, in x in)."""
        if self.rows:
            x = torch.cat(self.rows)
            return x.t() @ x / max(self.n_hessian, 1e-30)
        return None if self.hessian_sum is None else self.hessian_sum / max(self.n_hessian, 1e-30)

    def output_error(self, delta: Tensor) -> Tensor | None:
        """tr(D H D^T) for a weight change D (out, in) on these inputs; None without a Hessian."""
        if self.rows:
            total = torch.zeros((), device=delta.device)
            for r in self.rows:
                total += (r @ delta.t()).pow(2).sum()
            return total / max(self.n_hessian, 1e-30)
        h = self.hessian
        return None if h is None else output_error(delta, h)

    def scale_inputs(self, s: Tensor) -> None:
        """The statistics of x / s (after smoothing folds 1/s into the input)."""
        if self.amax is not None:
            self.amax = self.amax / s
        if self.abssum is not None:
            self.abssum = self.abssum / s
        inv = 1.0 / s
        if self.hessian_sum is not None:
            self.hessian_sum = self.hessian_sum * inv[:, None] * inv[None, :]
        self.rows = [r * inv for r in self.rows]
        if self.cross_sum is not None:
            self.cross_sum = self.cross_sum * inv[:, None] * inv[None, :]


def output_error(delta: Tensor, hessian: Tensor) -> Tensor:
    """Mean squared output change per token, summed over outputs: tr(D H D^T) for D (out, in)."""
    return row_output_errors(delta, hessian).sum()


def row_output_errors(delta: Tensor, hessian: Tensor) -> Tensor:
    """Each output's mean squared change per token: the diagonal of D H D^T for D (out, in)."""
    return ((delta @ hessian) * delta).sum(1)


RECENT_INPUTS = 4  # inputs remembered for sharing: a MoE block reads its input again after each expert


def _same(a: Tensor, b: Tensor) -> bool:
    """The same tensor, or a contiguous view of the same memory with the same rows (x.view(-1, hidden))."""
    if a is b:
        return True
    return (
        a.data_ptr() == b.data_ptr() and a.numel() == b.numel() and a.dtype == b.dtype
        and a.shape[-1] == b.shape[-1] and a.is_contiguous() and b.is_contiguous()
    )  # fmt: skip


@dataclass
class CalibrationContext:
    """What the hooks of one calibration pass read while its forwards run, made per pass and handed to them
    (`collect_inputs`, `routers.record_targets`, the ExpertLists through `moe.set_calibrating`): whether the
    forward now running is a reference one, and the token weights of the MoE expert now running. Nothing a
    hook reads is stored on a class, so two passes (or two `collect_inputs`) never see each other's."""

    reference: bool = False  # the forward now running computes the float model's activations (GPTAQ)
    token_weights: moe.TokenWeights = field(default_factory=moe.TokenWeights)

    @contextmanager
    def reference_inputs(self) -> Iterator[None]:
        """Forward passes in this context give each Linear's input of the float model (GPTAQ's reference, the
        same tokens as the next forward): `collect_inputs` keeps them for that forward's cross statistics and
        records nothing else from them."""
        self.reference = True
        try:
            yield
        finally:
            self.reference = False


@contextmanager
def collect_inputs(
    linears: Mapping[str, nn.Module],
    hessian_rows: int | None,
    absmean: bool = True,
    context: CalibrationContext | None = None,
) -> Iterator[dict[str, InputStats]]:
    """Hooks that fill {name: InputStats} while the caller runs forward passes. Linears called with the very
    same tensor object as one of the last few Linears (q/k/v, gate/up, every expert of a MoE block during
    calibration) share that one's InputStats, so a shared input is accumulated once. A forward under
    `context.reference_inputs()` before a forward adds E[(x_f - x_q) x_q^T] (`InputStats.cross`). Inside a MoE
    expert under token weighting (`context.token_weights`) the rows are weighted, and only the Linears of one
    expert (the same weights) share. Without a `context` the hooks read one of their own (no reference, no
    token weights)."""
    ctx = CalibrationContext() if context is None else context
    stats: dict[str, InputStats] = {}
    recent: list[tuple[Tensor, Tensor | None, InputStats]] = []  # kept alive, so identity is reliable
    sources = itertools.count()
    pending: dict[str, Tensor] = {}  # the reference input of each Linear, until its next forward

    def hook(name: str, args: tuple[Tensor, ...]) -> None:
        x = args[0]
        if ctx.reference:
            pending[name] = x.detach()
            return
        reference = pending.pop(name, None)
        weight = ctx.token_weights.current
        same_x = [i for i, (t, _, _) in enumerate(recent) if _same(t, x)]
        seen = next((i for i in same_x if recent[i][1] is weight), None)
        if seen is not None:
            shared = recent.pop(seen)
            recent.append(shared)
            own = stats.setdefault(name, shared[2])
            if own is shared[2]:
                return
        if name not in stats:  # the same input read under other token weights: the same source
            source = recent[same_x[-1]][2].source if same_x else next(sources)
            stats[name] = InputStats(x.shape[-1], hessian_rows, absmean, source=source)
        own = stats[name]
        own.add(x, weight)
        if reference is not None and reference.shape == x.shape:
            own.add_cross(x, reference, weight)
        if seen is None:
            recent.append((x, weight, own))
            del recent[:-RECENT_INPUTS]

    handles = [m.register_forward_pre_hook(lambda _, a, n=name: hook(n, a)) for name, m in linears.items()]
    try:
        yield stats
    finally:
        recent.clear()
        pending.clear()
        for h in handles:
            h.remove()

"""Refitting a MoE block's router (kept in high precision) to the float model's routing logits.

A router reads the hidden states of the quantized model, which differ from the float model's by the error of
every quantized layer before it, this layer's attention included. A small change there sends some tokens to
another expert: a discrete change of the block's output that a dense MLP does not have, and the main reason a
quantized MoE loses more than a dense model of its active size (docs/experiments, the 2026-12-01 MoE entry).

With the float model's logits z_f = W x_f of the calibration tokens (gathered in GPTAQ's reference pass) and
the router inputs x_q of the calibrated, quantized layer on the same tokens, the router weight becomes the
ridge least-squares fit

    W' = argmin E||W' x_q - z_f||^2 + lambda ||W' - W||^2 = (E[z_f x_q^T] + lambda W) (E[x_q x_q^T] + lambda I)^-1

with lambda = damp * mean(diag E[x_q x_q^T]) as in GPTQ. Only the linear part of the router (its `weight`) is
fitted; biases and score corrections stay. Its report is the relative logit error E||W x_q - z_f||^2 /
E||z_f||^2 before and after.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lowbit.algorithms.gptq import damped
from lowbit.algorithms.passes import ForwardLoop, Pass
from lowbit.algorithms.stats import CalibrationContext


def find_routers(layer: nn.Module, router: str) -> dict[str, nn.Module]:
    """The modules named `router` in `layer` (one per MoE block) that carry a 2-D `weight` (experts x hidden)."""
    return {
        name: module for name, module in layer.named_modules()
        if (name == router or name.endswith("." + router))
        and isinstance(getattr(module, "weight", None), Tensor) and module.weight.dim() == 2
    }  # fmt: skip


@dataclass
class _Fit:
    weight: Tensor  # the router's float32 weight (experts x hidden)
    targets: list[Tensor] = field(default_factory=list)  # z_f of each reference batch (tokens x experts)
    next: int = 0
    n: int = 0
    h: Tensor | None = None  # sum x_q x_q^T
    a: Tensor | None = None  # sum z_f x_q^T
    zz: float = 0.0  # sum ||z_f||^2


def _fp32(x: Tensor) -> contextlib.AbstractContextManager[Any]:
    """The hooks run inside the calibration forwards, under bf16 autocast where calib_dtype resolves to it:
    their logits and statistics are fp32 products all the same."""
    return torch.autocast(x.device.type, enabled=False)


@contextlib.contextmanager
def record_targets(routers: dict[str, nn.Module], context: CalibrationContext) -> Iterator[dict[str, _Fit]]:
    """While the statistics pass runs: keep the logits W x_f of every router in each of the pass's reference
    forwards (`context.reference`)."""
    fits = {name: _Fit(_weight(m).detach().float().clone()) for name, m in routers.items()}

    def hook(name: str, args: tuple[Any, ...]) -> None:
        if context.reference:
            fit = fits[name]
            x = args[0].detach().reshape(-1, fit.weight.shape[1]).float()
            with _fp32(x):
                fit.targets.append(x @ fit.weight.t())

    handles = [m.register_forward_pre_hook(lambda _, a, n=name: hook(n, a)) for name, m in routers.items()]
    try:
        yield fits
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def refit(
    routers: dict[str, nn.Module],
    fits: dict[str, _Fit],
    forward_loop: ForwardLoop,
    layer: nn.Module,
    damp: float,
    storage_dtypes: dict[str, torch.dtype] | None = None,
) -> dict[str, dict[str, float]]:
    """Run the quantized layer once over the calibration batches, gathering each router's inputs against its
    recorded float logits, and replace each router's weight by the ridge fit (rounded to the dtype it is
    stored in, `storage_dtypes[name + ".weight"]`), where that lowers the logit error. Routers without
    recorded targets are left alone. Returns {router name: {"before", "after", "tokens"}}."""
    fits = {n: f for n, f in fits.items() if f.targets}
    if not fits:
        return {}

    def hook(name: str, args: tuple[Any, ...]) -> None:
        fit = fits[name]
        x = args[0].detach().reshape(-1, fit.weight.shape[1]).float()
        z = fit.targets[fit.next]
        if z.shape[0] != x.shape[0]:
            raise RuntimeError(
                f"router {name}: batch {fit.next} has {x.shape[0]} tokens, its reference {z.shape[0]}"
            )
        fit.next += 1
        with _fp32(x):
            fit.h = x.t() @ x if fit.h is None else fit.h.addmm_(x.t(), x)
            fit.a = z.t() @ x if fit.a is None else fit.a.addmm_(z.t(), x)
        fit.zz += float((z * z).sum())
        fit.n += x.shape[0]

    handles = [routers[n].register_forward_pre_hook(lambda _, a, n=n: hook(n, a)) for n in fits]
    try:
        forward_loop(layer, Pass())  # the quantized layer, as the next layers will see it
    finally:
        for handle in handles:
            handle.remove()
    report = {}
    for name, fit in fits.items():
        if fit.h is None or fit.a is None or fit.n == 0:
            continue
        param = _weight(routers[name])
        w = param.detach().float()  # not fit.weight: smoothing may have scaled its columns since
        h, a = fit.h / fit.n, fit.a / fit.n
        lam = damp * max(float(torch.diagonal(h).mean()), 1e-8)
        lower, info = torch.linalg.cholesky_ex(damped(h, lam))
        if int(info) != 0:
            continue
        new = torch.cholesky_solve((a + lam * w).t(), lower).t()
        stored: torch.dtype = (storage_dtypes or {}).get(f"{name}.weight", param.dtype)
        new = new.to(stored).float()
        before, after = (_logit_error(v, h, a, fit.zz / fit.n) for v in (w, new))
        if after < before:
            param.data = new.to(param.dtype)
        report[name] = {"before": before, "after": min(after, before), "tokens": fit.n}
    return report


def _weight(router: nn.Module) -> Tensor:
    weight = router.weight
    assert isinstance(weight, Tensor)
    return weight


def _logit_error(w: Tensor, h: Tensor, a: Tensor, zz: float) -> float:
    """E||w x - z||^2 / E||z||^2 from H = E[x x^T], A = E[z x^T], zz = E||z||^2."""
    return float(((w @ h) * w).sum() - 2 * (w * a).sum() + zz) / max(zz, 1e-30)

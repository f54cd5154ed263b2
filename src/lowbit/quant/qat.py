"""Putting a calibrated model into quantization-aware training, and taking it out again.

During QAT every quantizer fake-quantizes with a straight-through gradient (`formats.scaled.round_ste`) and
keeps its calibrated statistics frozen (plain buffers, which no optimizer sees), except:
- weights in formats with FP8 / E8M0 block scales (NVFP4, MXFP4, MXFP8) take their block amaxes from the
  current weight at every step, as ModelOpt's dynamic block quantizers do; the NVFP4 global amax stays;
- with `learn_scales`, static amaxes with fp32 scales (INT and FP8 formats) become parameters trained by
  the learned-step-size gradient.
A checkpoint of the trained model (`lowbit.train.trainer.checkpoint_tensors`) stores the learned amaxes as
statistics and re-observes recomputed block amaxes on each weight as stored.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lowbit.quant.convert import all_quantizers, join, quant_linears
from lowbit.quant.linear import QuantLinear
from lowbit.quant.quantizer import Quantizer


@dataclass
class QATReport:
    recomputed: list[str] = field(default_factory=list)  # weight quantizers with per-step block amaxes
    learned: list[str] = field(default_factory=list)  # quantizers whose amax is a parameter
    frozen: int = 0  # quantizers left as calibrated


def _recomputes(q: Quantizer) -> bool:
    fmt = q.fmt
    return fmt.scale_element is not None and fmt.granularity in ("group", "block") and not fmt.dynamic


def _learnable(q: Quantizer) -> bool:
    fmt = q.fmt
    return fmt.scale_element is None and fmt.symmetric and not fmt.dynamic and q.amax is not None


def prepare_qat(
    model: nn.Module,
    learn_scales: bool = False,
    recompute_block_scales: bool = True,
    fused: list[list[str]] | None = None,
) -> QATReport:
    """Set up every quantizer of `model` for training (see the module docstring); returns what it did.

    `fused`: groups of Linear names whose per-tensor weight scales engines share (q/k/v, gate/up); with
    learn_scales, each group's tied amaxes become one parameter, so that they stay tied.
    """
    report = QATReport()
    for name, linear in quant_linears(model):
        first = linear.weight_quantizer.quantizers()[0]
        if recompute_block_scales and _recomputes(first):
            first.recompute_blocks = True
            report.recomputed.append(join(name, "weight_quantizer.0"))
    shared = _shared_parameters(model, fused or []) if learn_scales else {}
    for name, q in all_quantizers(model):
        if learn_scales and not q.recompute_blocks and _learnable(q):
            assert q.amax is not None
            q.amax = shared[name] if name in shared else nn.Parameter(q.amax.detach().clone())
            report.learned.append(name)
        elif not q.recompute_blocks:
            report.frozen += 1
    return report


def _shared_parameters(model: nn.Module, fused: list[list[str]]) -> dict[str, nn.Parameter]:
    """{weight quantizer name: parameter} where a fused group's per-tensor amaxes are tied (equal)."""
    shared: dict[str, nn.Parameter] = {}
    for group in fused:
        members = {m: lin for m in group if isinstance(lin := model.get_submodule(m), QuantLinear)}
        if len(members) < 2:
            continue
        chains = [lin.weight_quantizer.quantizers() for lin in members.values()]
        for stage, qs in enumerate(zip(*chains, strict=False)):
            first = qs[0].amax
            if first is None or qs[0].fmt.granularity != "tensor" or not _learnable(qs[0]):
                continue
            if all(q.amax is not None and torch.equal(q.amax, first) for q in qs):
                param = nn.Parameter(first.detach().clone())
                shared.update({f"{m}.weight_quantizer.{stage}": param for m in members})
    return shared


def quantizer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The learned amaxes (empty unless prepare_qat(learn_scales=True))."""
    return [q.amax for _, q in all_quantizers(model) if isinstance(q.amax, nn.Parameter)]

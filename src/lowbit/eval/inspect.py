"""Per-module report of a quantized model: formats, scale ranges, weight SQNR, packed size."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lowbit.formats.packing import pack, packed_nbytes
from lowbit.formats.scaled import quantize, sqnr_db
from lowbit.formats.scales import scales
from lowbit.quant.convert import all_quantizers, quant_linears
from lowbit.quant.linear import QuantLinear


@dataclass
class ModuleReport:
    name: str
    weight: str
    input: str
    scale_min: float
    scale_max: float
    sqnr_db: float
    packed_bytes: int
    numel: int


@torch.no_grad()
def weight_scales(linear: QuantLinear) -> torch.Tensor:
    """The effective step (scale x global scale) of each block of the weight's first format."""
    q = linear.weight_quantizer.quantizers()[0]
    return scales(q.fmt, q.stat_values()).effective


@torch.no_grad()
def packed_weight_bytes(linear: QuantLinear) -> int:
    """Bytes of the weight stored packed in its (first) format: codes + scales."""
    q = linear.weight_quantizer.quantizers()[0]
    return packed_nbytes(pack(quantize(linear.weight, q.fmt, q.amax, q.global_amax, q.amin)))


@torch.no_grad()
def report(model: nn.Module) -> list[ModuleReport]:
    rows = []
    for name, linear in quant_linears(model):
        s = weight_scales(linear)
        rows.append(
            ModuleReport(
                name=name,
                weight="+".join(f.name for f in linear.spec.weight),
                input=linear.spec.input.name if linear.spec.input else "-",
                scale_min=float(s.min()),
                scale_max=float(s.max()),
                sqnr_db=sqnr_db(linear.weight, linear.quantized_weight()),
                packed_bytes=packed_weight_bytes(linear),
                numel=linear.weight.numel(),
            )
        )
    return rows


def kv_quantizers(model: nn.Module) -> list[tuple[str, str, float]]:
    """(name, format, amax) of each K/V cache quantizer."""
    out = []
    for n, q in all_quantizers(model):
        if n.endswith(("k_quantizer", "v_quantizer")):
            amax = q.stat_values().tensor_amax(q.fmt)
            out.append((n, q.fmt.name, float(amax) if amax is not None else 0.0))
    return out


def model_size_bytes(model: nn.Module) -> tuple[int, int, int]:
    """(packed bytes of the model, weights in quantized linears, their packed bytes): quantized weights packed
    (codes + scales), every other tensor as bf16, as an exported checkpoint stores them."""
    quantized = dict(quant_linears(model))
    total, qnumel, qbytes = 0, 0, 0
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        owner = name.rpartition(".")[0]
        if name.endswith(".weight") and owner in quantized:
            packed = packed_weight_bytes(quantized[owner])
            total, qbytes, qnumel = total + packed, qbytes + packed, qnumel + p.numel()
        else:
            total += p.numel() * 2  # bf16 in an exported checkpoint
    return total, qnumel, qbytes

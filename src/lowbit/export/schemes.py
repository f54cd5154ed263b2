"""What a QuantSpec is in the vocabulary of the export formats: each format a short kind name, and the checks
that the exporters share (which modules of the model are Linear, the exact scales of an input quantizer)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lowbit.formats.elements import PowerOfTwoElement
from lowbit.formats.scaled import ScaledFormat
from lowbit.quant.linear import QuantSpec

if TYPE_CHECKING:
    from lowbit.export.source import KVScales, QLinear, Source, Unit
    from lowbit.export.writer import ExportWriter

# {tensor suffix or name: (tensor, declared dtype, declared shape)}
Declared = dict[str, tuple[Tensor, torch.dtype, tuple[int, ...]]]


def kind(fmt: ScaledFormat) -> str:
    """fp8_tensor, fp8_channel, fp8_token, fp8_block, int8_channel, int8_tensor, int8_token, int4_group,
    int4_channel, int4_group_asym, nvfp4, nvfp4_dynamic, mxfp4, mxfp4_dynamic, mxfp8, mxfp8_dynamic, ..."""
    dyn = "_dynamic" if fmt.dynamic else ""
    element = fmt.element.name
    if isinstance(fmt.scale_element, PowerOfTwoElement):
        return f"mx{'fp4' if element == 'e2m1' else 'fp8' if element == 'e4m3' else element}{dyn}"
    if fmt.global_scale and element == "e2m1":
        return f"nvfp4{dyn}"
    base = {"e4m3": "fp8", "int8": "int8", "int4": "int4", "uint4": "int4", "uint8": "int8"}.get(
        element, element
    )
    if fmt.granularity == "row":
        return f"{base}_token" if fmt.dynamic else f"{base}_channel"
    return f"{base}_{fmt.granularity}{'' if fmt.symmetric else '_asym'}{dyn}"


@dataclass(frozen=True)
class Scheme:
    """A QuantSpec as kinds: weight chain and input."""

    weight: tuple[str, ...]
    input: str | None
    group_size: int | None

    @staticmethod
    def of(spec: QuantSpec) -> Scheme:
        return Scheme(
            tuple(kind(f) for f in spec.weight),
            kind(spec.input) if spec.input is not None else None,
            spec.weight[0].group_size if spec.weight[0].granularity == "group" else None,
        )

    def describe(self) -> str:
        return f"weights {'+'.join(self.weight)}, activations {self.input or 'none'}"


def exclude_modules(source: Source, embeddings: bool = True) -> list[str]:
    """Linear and embedding modules of the model left in high precision (lm_head, embeddings, routers), as
    ModelOpt lists them in exclude_modules."""
    from torch import nn

    from lowbit.models.conv1d import is_conv1d

    model = source.meta_model
    kinds = (nn.Linear, nn.Embedding) if embeddings else (nn.Linear,)
    fam = source.family
    router = "." + fam.moe.router if fam is not None and fam.moe is not None else None
    return sorted(
        source.checkpoint_name(n)
        for n, m in model.named_modules()
        if (isinstance(m, kinds) or is_conv1d(m) or (router is not None and n.endswith(router)))
        and n not in source.modules
    )


def write_unit(
    writer: ExportWriter, unit: Unit, dtype: torch.dtype, linear_tensors: Callable[[QLinear], Declared],
    kv_tensors: Callable[[KVScales], Declared],
) -> None:  # fmt: skip
    """Write one unit: unquantized tensors in `dtype`, each quantized Linear's tensors as the format declares
    them (plus its bias in `dtype`), the K/V cache scales."""
    for name, t in unit.tensors.items():
        writer.add(name, t.to(dtype) if t.is_floating_point() else t)
    for name, lin in unit.linears.items():
        for suffix, (t, dt, shape) in linear_tensors(lin).items():
            writer.add(f"{name}.{suffix}", t, dt, shape)
        if lin.bias is not None:
            writer.add(f"{name}.bias", lin.bias.to(dtype))
    for kv in unit.kv.values():
        for name, (t, dt, shape) in kv_tensors(kv).items():
            writer.add(name, t, dt, shape)


def export_config(
    source: Source, dtype: torch.dtype, quantization_config: dict[str, Any] | None
) -> dict[str, Any]:
    """The source's config.json with the export's dtype and quantization_config."""
    config = dict(source.config)
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    config["dtype"] = str(dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)
    return config

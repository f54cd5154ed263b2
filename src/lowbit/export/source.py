"""What an exporter reads: a lowbit quantized checkpoint (or a plain model for no_quant), one unit at a time.

A unit is the set of tensors of one decoder layer (`model.layers.3.*`), or everything outside the layers
(embeddings, final norm, lm_head). Exporters walk the units in order, so peak memory is one layer whatever
the model's size. In a unit, each quantized Linear is a `QLinear`: its stored float weight (already
smoothed and, after GPTQ, on the quantization grid) and its calibrated statistics; `weight_qtensors()` gives
the exact codes and scales the fake-quantized model computes with. K/V cache quantizers come as `KVScales`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lowbit.checkpoint.load import is_lowbit_checkpoint, read_manifest
from lowbit.errors import LowbitError
from lowbit.formats.scaled import QTensor, ScaledFormat, dequantize, quantize
from lowbit.formats.scales import Scales, Stats, scales
from lowbit.models.conv1d import conv1d_names
from lowbit.models.families import Family, find_family, to_checkpoint_name
from lowbit.models.loading import (
    SafetensorsReader,
    build_meta_model,
    load_config,
    load_config_json,
    model_files_for_copy,
    resolve_model,
)
from lowbit.models.moe import unfuse_known
from lowbit.quant.linear import QuantSpec
from lowbit.quant.recipe import format_from_data, spec_from_dict

LAYER_INDEX = re.compile(r"^(.*?)\.(\d+)\.")


@dataclass
class QLinear:
    """One quantized Linear of the checkpoint: float weight as stored plus its quantizers' statistics."""

    name: str  # module name, e.g. model.layers.0.self_attn.q_proj
    spec: QuantSpec
    weight: Tensor
    bias: Tensor | None
    weight_stats: list[Stats]  # per quantizer of the weight chain
    input_stats: Stats = field(default_factory=Stats)

    def weight_qtensors(self) -> list[QTensor]:
        """The weight chain's quantized tensors: [q0] for one format; [INT4 groups, FP8 of their dequantized
        values] for W4A8. Dequantizing the last one gives exactly the fake-quantized weight."""
        out: list[QTensor] = []
        w = self.weight.float()
        if not bool(torch.isfinite(w).all()):
            raise LowbitError(
                f"{self.name}.weight has NaN or Inf values; the checkpoint is damaged (re-run quantize)"
            )
        for fmt, stats in zip(self.spec.weight, self.weight_stats, strict=True):
            amax = None if fmt.dynamic else stats.amax
            q = quantize(w, fmt, amax=amax, global_amax=stats.global_amax, amin=stats.amin)
            out.append(q)
            w = dequantize(q)
        return out

    def dequantized_weight(self) -> Tensor:
        return dequantize(self.weight_qtensors()[-1])

    def input_scales(self) -> Scales | None:
        """The input quantizer's calibrated scales (a static format's scale, NVFP4's global scale), None
        without an input format or where its statistics are missing."""
        fmt = self.spec.input
        if fmt is None or (fmt.dynamic and not fmt.global_scale):
            return None
        if self.input_stats.tensor_amax(fmt) is None:
            return None
        return scales(fmt, self.input_stats)


@dataclass
class KVScales:
    """Calibrated K and V cache statistics of one attention module."""

    attention: str  # module name, e.g. model.layers.0.self_attn
    fmt: ScaledFormat
    k_stats: Stats
    v_stats: Stats

    def stats(self, which: str) -> Stats:
        stats = self.k_stats if which == "k" else self.v_stats
        if stats.tensor_amax(self.fmt) is None:
            raise LowbitError(f"{self.attention}: no calibrated {which.upper()} cache amax; re-run quantize")
        return stats

    def scale(self, which: str) -> Tensor:
        """The per-tensor scale of the K or V cache (fp32 scalar), as the fake quantizer computes it."""
        return scales(self.fmt, self.stats(which)).tensor_scale


@dataclass
class Unit:
    label: str  # "shell" or the layer prefix, e.g. model.layers.3
    tensors: dict[str, Tensor]  # every stored tensor of the unit except the quantized Linears' weights
    linears: dict[str, QLinear]  # by module name
    kv: dict[str, KVScales]  # by attention module name


class Source:
    """A lowbit checkpoint or a plain Hugging Face model directory, read unit by unit."""

    def __init__(self, path: str | Path) -> None:
        self.dir = resolve_model(str(path))
        self.config: dict[str, Any] = load_config_json(self.dir)
        self.manifest: dict[str, Any] | None = (
            read_manifest(self.dir) if is_lowbit_checkpoint(self.dir) else None
        )
        self.weights = SafetensorsReader(self.dir)
        self.modules: dict[str, QuantSpec] = {}
        self.kv_format: ScaledFormat | None = None
        if self.manifest is not None:
            for name, data in self.manifest["modules"].items():
                spec = spec_from_dict(data)
                if spec is None:
                    raise LowbitError(
                        f"{self.dir}: lowbit.json lists {name} without a format; re-run quantize"
                    )
                self.modules[name] = spec
            kv = self.manifest["recipe"].get("kv_cache")
            self.kv_format = format_from_data(kv, "kv_cache") if kv else None
        stat_files = (
            sorted(p.name for p in self.dir.glob("quantizers-*.safetensors")) if self.manifest else []
        )
        self.stats = SafetensorsReader(self.dir, stat_files)
        self.family: Family | None = find_family(self.model_type)
        # quantized GPT-2 Conv1D layers: stored (in, out) as the checkpoint has them, exported as Linears
        self.conv1d: set[str] = set()
        if self.modules:
            self.conv1d = conv1d_names(self.meta_model) & set(self.modules)

    @cached_property
    def meta_model(self) -> nn.Module:
        """The model's structure on the meta device, MoE experts split as lowbit quantizes them."""
        model = build_meta_model(load_config(self.dir))
        unfuse_known(model)
        return model

    def checkpoint_name(self, name: str) -> str:
        """A tensor or module name as the original checkpoint names it (lowbit works with module names)."""
        return to_checkpoint_name(name, self.family)

    @property
    def quantized(self) -> bool:
        return bool(self.modules) or self.kv_format is not None

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", ""))

    @property
    def preset(self) -> str:
        return str(self.manifest["recipe"]["name"]) if self.manifest else "no_quant"

    @property
    def algorithm(self) -> str:
        return str(self.manifest.get("algorithm", "none")) if self.manifest else "none"

    def tokenizer_files(self) -> list[Path]:
        return model_files_for_copy(self.dir)

    def tensor_names(self) -> list[str]:
        return list(self.weights.file_of)

    def unit_labels(self) -> list[str]:
        """'shell' first, then each numbered block (decoder layer) in numeric order."""
        layers = {_unit_of(n) for n in self.weights.file_of} - {"shell"}
        return ["shell", *sorted(layers, key=_unit_key)]

    def unit(self, label: str) -> Unit:
        tensors = self.weights.read([n for n in self.weights.file_of if _unit_of(n) == label])
        stats: dict[str, dict[str, Tensor]] = {}  # quantizer path -> {amax / global_amax / amin: tensor}
        for key, value in self.stats.read([k for k in self.stats.file_of if _unit_of(k) == label]).items():
            quantizer, _, stat = key.rpartition(".")
            stats.setdefault(quantizer, {})[stat] = value.float()
        linears: dict[str, QLinear] = {}
        for module, spec in self.modules.items():
            if f"{module}.weight" in tensors:
                chain = [
                    Stats.of(stats.get(f"{module}.weight_quantizer.{i}", {})) for i in range(len(spec.weight))
                ]
                weight = tensors.pop(f"{module}.weight")
                if module in self.conv1d:
                    weight = weight.t().contiguous()
                linears[module] = QLinear(
                    module, spec, weight, tensors.pop(f"{module}.bias", None), chain,
                    Stats.of(stats.get(f"{module}.input_quantizer", {})),
                )  # fmt: skip
        kv: dict[str, KVScales] = {}
        if self.kv_format is not None:
            for quantizer in sorted(q for q in stats if q.endswith(".k_quantizer")):
                attention = quantizer.removesuffix(".k_quantizer")
                kv[attention] = KVScales(
                    attention, self.kv_format, Stats.of(stats[quantizer]),
                    Stats.of(stats.get(f"{attention}.v_quantizer", {})),
                )  # fmt: skip
        return Unit(label, tensors, linears, kv)

    def units(self) -> Iterator[Unit]:
        for label in self.unit_labels():
            yield self.unit(label)

    def storage_dtype(self) -> torch.dtype:
        """The dtype of the model's unquantized weights (config dtype, else the embedding's)."""
        name = self.config.get("dtype") or self.config.get("torch_dtype")
        if isinstance(name, str) and hasattr(torch, name):
            dt = getattr(torch, name)
            if isinstance(dt, torch.dtype):
                return dt
        return torch.bfloat16


def _unit_of(name: str) -> str:
    m = LAYER_INDEX.match(name)
    return f"{m.group(1)}.{m.group(2)}" if m else "shell"


def _unit_key(label: str) -> tuple[str, int]:
    prefix, _, index = label.rpartition(".")
    return prefix, int(index)

"""Reading lowbit's own hf and compressed-tensors exports back for `generate` / `eval`.

Each quantized Linear is decoded to its dequantized weight, its QuantSpec and the quantizer statistics that
reproduce its scales (amax = scale * element max, NVFP4 global amax = weight_scale_2 * 6 * 448, ...), then
wrapped in a QuantLinear exactly as a lowbit checkpoint is. Re-quantizing the dequantized weight with those
statistics gives back the stored codes, so the model computes what the quantized checkpoint computed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lowbit.errors import LowbitError
from lowbit.export.codecs import Codec, codec_named
from lowbit.export.compressed_tensors import format_of_args
from lowbit.formats.scaled import FP8_TENSOR, NVFP4_DYNAMIC, dequantize
from lowbit.formats.scales import Scales, Stats, stats_for
from lowbit.models.loading import load_config_json
from lowbit.quant.linear import QuantSpec


@dataclass
class Decoded:
    spec: QuantSpec
    weight: Tensor  # dequantized, float32
    weight_stats: list[Stats]
    input_stats: Stats = field(default_factory=Stats)


def export_format(model_dir: Path) -> str | None:
    """'hf', 'compressed-tensors' or None (not a quantized export)."""
    if (model_dir / "hf_quant_config.json").is_file():
        return "hf"
    config = load_config_json(model_dir) if (model_dir / "config.json").is_file() else {}
    method = (config.get("quantization_config") or {}).get("quant_method")
    if method == "compressed-tensors":
        return "compressed-tensors"
    if method == "modelopt":
        return "hf"
    return None


def decode(row: Codec, t: dict[str, Tensor], group_size: int | None) -> Decoded:
    """One Linear's stored tensors (by suffix) -> its weight and the statistics that reproduce its scales."""
    chain, inputs = row.decode(t, group_size)
    spec = row.formats(group_size)
    stats = [stats_for(q.fmt, Scales(q.scale, q.global_scale)) for q in chain]
    input_stats = Stats()
    if spec.input is not None and inputs is not None and (inputs.scale, inputs.global_scale) != (None, None):
        input_stats = stats_for(spec.input, inputs)
    return Decoded(spec, dequantize(chain[-1]), stats, input_stats)


def decode_hf(t: dict[str, Tensor], algo: str, group_size: int | None) -> Decoded:
    """One Linear of the unified HF format: t holds its weight / weight_scale / ... by suffix."""
    row = codec_named("hf", algo)
    if row is None:
        raise LowbitError(f"cannot read quant_algo {algo!r} back; lowbit reads the algorithms it exports")
    return decode(row, t, group_size)


def ct_spec(group: dict[str, Any]) -> QuantSpec:
    """The QuantSpec of a compressed-tensors config group."""
    w, a = group["weights"], group.get("input_activations")
    return QuantSpec((format_of_args(w, weight=True),), format_of_args(a, weight=False) if a else None)


def decode_ct(t: dict[str, Tensor], group: dict[str, Any]) -> Decoded:
    spec = ct_spec(group)
    row = codec_named("compressed-tensors", str(group.get("format")), spec)
    if row is None:
        raise LowbitError(
            f"cannot read compressed-tensors group {group.get('format')!r} with {spec.describe()} back; "
            "lowbit reads the schemes it exports (re-export with lowbit export --format compressed-tensors)"
        )
    return decode(row, t, spec.weight[0].group_size)


# --- loading ----------------------------------------------------------------------------------------------


def load_export(model_dir: Path, fmt: str, dtype: torch.dtype) -> tuple[nn.Module, dict[str, Any]]:
    """(model, summary) of an hf or compressed-tensors export, with QuantLinears computing its values."""
    from transformers import AutoConfig

    from lowbit.checkpoint.load import load_quantizer_stats
    from lowbit.models.conv1d import conv1d_names, linearize
    from lowbit.models.families import find_family, to_checkpoint_name, to_module_name
    from lowbit.models.loading import SafetensorsReader, auto_model_class
    from lowbit.models.moe import unfuse_known
    from lowbit.quant.convert import KV_QUANTIZERS
    from lowbit.quant.kv import is_attention, use_kv_attention
    from lowbit.quant.linear import QuantLinear
    from lowbit.quant.quantizer import Quantizer

    config = AutoConfig.from_pretrained(model_dir)
    qcfg: dict[str, Any] = dict(getattr(config, "quantization_config", None) or {})
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = auto_model_class(config).from_config(config, dtype=dtype)
    model.eval()
    unfuse_known(model)  # MoE experts: one Linear per projection, as exported
    fam = find_family(str(config.model_type))

    def checkpoint_name(name: str) -> str:
        return to_checkpoint_name(name, fam)

    reader = SafetensorsReader(model_dir, rename=lambda n: to_module_name(n, fam))
    tensors = reader.read(reader.names())
    modules: dict[str, dict[str, Tensor]] = {}
    plain: dict[str, Tensor] = {}
    quantized = {n.rpartition(".")[0] for n in tensors if n.endswith((".weight_scale", ".weight_packed"))}
    linearize(model, conv1d_names(model) & quantized)  # quantized GPT-2 Conv1D layers are exported as Linears
    for name, t in tensors.items():
        module, _, suffix = name.rpartition(".")
        if suffix in ("k_scale", "v_scale"):
            continue  # KV cache scales: read below
        if module in quantized and suffix != "bias":
            modules.setdefault(module, {})[suffix] = t
        else:
            plain[name] = t
    if fmt == "hf":
        quant = json.loads((model_dir / "hf_quant_config.json").read_text())["quantization"] if (
            model_dir / "hf_quant_config.json").is_file() else qcfg  # fmt: skip
        layers = quant.get("quantized_layers") or {}
        summary = f"hf export ({quant.get('quant_algo')})"
        kv_algo = quant.get("kv_cache_quant_algo")
    else:
        groups = qcfg.get("config_groups", {})
        summary = f"compressed-tensors export ({qcfg.get('format')})"
        kv_algo = "FP8" if qcfg.get("kv_cache_scheme") else None
    stats: dict[str, Tensor] = {}
    for module, mt in modules.items():
        if fmt == "hf":
            layer = layers.get(checkpoint_name(module), {})
            algo = layer.get("quant_algo", quant.get("quant_algo"))
            gs = layer.get("group_size", quant.get("group_size"))
            d = decode_hf(mt, algo, gs)
        else:
            d = decode_ct(mt, _ct_group(groups, checkpoint_name(module)))
        linear = model.get_submodule(module)
        if not isinstance(linear, nn.Linear):
            raise LowbitError(
                f"{model_dir}: {module} has quantization scales but is not a Linear; not a lowbit export"
            )
        plain[f"{module}.weight"] = d.weight.to(dtype)
        parent, _, child = module.rpartition(".")
        setattr(model.get_submodule(parent), child, QuantLinear(linear, d.spec))
        for i, st in enumerate(d.weight_stats):
            stats.update({f"{module}.weight_quantizer.{i}.{k}": v for k, v in st.to_dict().items()})
        stats.update({f"{module}.input_quantizer.{k}": v for k, v in d.input_stats.to_dict().items()})
    missing, unexpected = model.load_state_dict(plain, strict=False)
    missing = [
        m
        for m in missing
        if not m.endswith("lm_head.weight") or not getattr(config, "tie_word_embeddings", False)
    ]
    if unexpected or any("quantizer" not in m for m in missing):
        raise LowbitError(
            f"{model_dir}: tensors do not match the architecture (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    if kv_algo:
        kv_fmt = FP8_TENSOR if kv_algo == "FP8" else NVFP4_DYNAMIC
        for name, module in model.named_modules():
            if is_attention(module):
                for attr in KV_QUANTIZERS:
                    module.add_module(attr, Quantizer(kv_fmt))
                which = [
                    ("k", f"{name}.k_proj.k_scale", f"{name}.k_scale"),
                    ("v", f"{name}.v_proj.v_scale", f"{name}.v_scale"),
                ]
                for kv, hf_name, ct_name in which:
                    s = tensors.get(hf_name, tensors.get(ct_name))
                    if s is None:
                        raise LowbitError(f"{model_dir}: no {kv}_scale for {name}; the export is incomplete")
                    stored = s.float().reshape(())
                    kv_scales = Scales.of_tensor_scale(kv_fmt, stored)
                    stats.update(
                        {
                            f"{name}.{kv}_quantizer.{k}": v
                            for k, v in stats_for(kv_fmt, kv_scales).to_dict().items()
                        }
                    )
        use_kv_attention(model)
    load_quantizer_stats(model, stats)
    return model, {"recipe": {"name": summary}, "export": fmt}


def _ct_group(groups: dict[str, Any], module: str) -> dict[str, Any]:
    for group in groups.values():
        targets = group.get("targets", [])
        if module in targets or "Linear" in targets:
            return dict(group)
    raise LowbitError(f"{module}: no compressed-tensors config group targets it; the export is damaged")

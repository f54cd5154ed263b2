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
from lowbit.formats.elements import E2M1, E4M3, decode, decode_e8m0
from lowbit.formats.packing import unpack_int32, unpack_nibbles
from lowbit.formats.scaled import (
    FP8_BLOCK128,
    FP8_CHANNEL,
    FP8_TENSOR,
    FP8_TOKEN,
    INT4_G128,
    INT8_CHANNEL,
    INT8_TENSOR,
    INT8_TOKEN,
    MXFP4,
    MXFP4_DYNAMIC,
    MXFP8,
    MXFP8_DYNAMIC,
    NVFP4,
    NVFP4_DYNAMIC,
    NVFP4_GLOBAL_DIVISOR,
    ScaledFormat,
    global_scale_from_amax,
)
from lowbit.quant.linear import QuantSpec


@dataclass
class Decoded:
    spec: QuantSpec
    weight: Tensor  # dequantized, float32
    weight_stats: list[dict[str, Tensor]]
    input_stats: dict[str, Tensor] = field(default_factory=dict)


def export_format(model_dir: Path) -> str | None:
    """'hf', 'compressed-tensors' or None (not a quantized export)."""
    if (model_dir / "hf_quant_config.json").is_file():
        return "hf"
    config = (
        json.loads((model_dir / "config.json").read_text()) if (model_dir / "config.json").is_file() else {}
    )
    method = (config.get("quantization_config") or {}).get("quant_method")
    if method == "compressed-tensors":
        return "compressed-tensors"
    if method == "modelopt":
        return "hf"
    return None


def _amax(scale: Tensor, fmt: ScaledFormat) -> Tensor:
    return scale.float() * fmt.element.max


def _global_amax(g: Tensor) -> Tensor:
    """An amax from which `global_scale_from_amax` computes exactly the stored global scale g."""
    g = g.float().reshape(())
    amax = g * NVFP4_GLOBAL_DIVISOR
    for _ in range(64):
        got = global_scale_from_amax(amax)
        if bool(got == g):
            return amax
        amax = torch.nextafter(amax, torch.tensor(float("inf") if bool(got < g) else float("-inf")))
    return g * NVFP4_GLOBAL_DIVISOR  # not representable exactly: the nearest (a few ulps off)


# --- hf (ModelOpt unified) --------------------------------------------------------------------------------


def decode_hf(t: dict[str, Tensor], algo: str, group_size: int | None) -> Decoded:
    """One Linear of the unified HF format: t holds its weight / weight_scale / ... by suffix."""
    w, ws = t["weight"], t["weight_scale"].float()
    if algo in ("FP8", "FP8_PER_CHANNEL_PER_TOKEN", "fp8_pb_wo", "FP8_PB_WO"):
        values = w.float()
        if algo == "FP8":
            fmt, inp, amax = FP8_TENSOR, FP8_TENSOR, _amax(ws.reshape(()), FP8_TENSOR)
            weight = values * ws
        elif algo == "FP8_PER_CHANNEL_PER_TOKEN":
            fmt, inp, amax = FP8_CHANNEL, FP8_TOKEN, _amax(ws.reshape(-1, 1), FP8_CHANNEL)
            weight = values * ws.reshape(-1, 1)
        else:
            fmt, inp = FP8_BLOCK128, None
            s = ws.reshape(ws.shape[0], ws.shape[2]) if ws.dim() == 4 else ws
            amax = _amax(s, fmt)
            full = s.repeat_interleave(128, 0).repeat_interleave(128, 1)[: w.shape[0], : w.shape[1]]
            weight = values * full
        stats = [{"amax": amax}]
    elif algo in ("W8A16", "W8A8_SQ_PER_CHANNEL"):
        fmt, inp = INT8_CHANNEL, INT8_TENSOR if algo == "W8A8_SQ_PER_CHANNEL" else None
        weight = w.float() * ws.reshape(-1, 1)
        stats = [{"amax": _amax(ws.reshape(-1, 1), fmt)}]
    elif algo in ("W4A16_AWQ", "W4A8_AWQ"):
        g = group_size or 128
        fmt = INT4_G128.replace(group_size=g)
        q = unpack_nibbles(w, dim=0, signed=True).float()
        weight = q * ws.repeat_interleave(g, 1)
        stats = [{"amax": _amax(ws, fmt)}]
        inp = None
        if algo == "W4A8_AWQ":
            s2 = t["weight_scale_2"].float().reshape(())
            weight = (weight / s2).to(torch.float8_e4m3fn).float() * s2
            stats.append({"amax": _amax(s2, FP8_TENSOR)})
            inp = FP8_TENSOR
            return _finish((fmt, FP8_TENSOR), inp, weight, stats, t)
    elif algo in ("NVFP4", "NVFP4_AWQ", "W4A16_NVFP4"):
        fmt, inp = NVFP4, NVFP4_DYNAMIC if algo != "W4A16_NVFP4" else None
        gs2 = t["weight_scale_2"].float().reshape(())
        block = ws  # e4m3 values
        q = decode(unpack_nibbles(w), E2M1)
        weight = q * (block * gs2).repeat_interleave(16, 1)
        stats = [{"amax": block * E2M1.max * gs2, "global_amax": _global_amax(gs2)}]
    elif algo == "MXFP8":
        fmt, inp = MXFP8, MXFP8_DYNAMIC
        s = decode_e8m0(t["weight_scale"])
        weight = w.float() * s.repeat_interleave(32, 1)
        stats = [{"amax": s * E4M3.max}]
    else:
        raise LowbitError(f"cannot read quant_algo {algo!r} back; lowbit reads the algorithms it exports")
    return _finish((fmt,), inp, weight, stats, t)


def _finish(
    weight_fmts: tuple[ScaledFormat, ...], inp: ScaledFormat | None, weight: Tensor, stats: list[dict[str, Tensor]],
    t: dict[str, Tensor],
) -> Decoded:  # fmt: skip
    input_stats: dict[str, Tensor] = {}
    if inp is not None and "input_scale" in t:
        s = t["input_scale"].float().reshape(())
        input_stats = {"global_amax": _global_amax(s)} if inp.global_scale else {"amax": _amax(s, inp)}
    return Decoded(QuantSpec(weight_fmts, inp), weight, stats, input_stats)


# --- compressed-tensors -----------------------------------------------------------------------------------


def ct_spec(group: dict[str, Any]) -> QuantSpec:
    """The QuantSpec of a compressed-tensors config group."""
    w, a = group["weights"], group.get("input_activations")
    return QuantSpec((_ct_format(w, weight=True),), _ct_format(a, weight=False) if a else None)


def _ct_format(args: dict[str, Any], weight: bool) -> ScaledFormat:
    bits, typ, strategy = args["num_bits"], args["type"], args["strategy"]
    gs = args.get("group_size")
    dynamic = bool(args.get("dynamic"))
    table: dict[tuple[str, int, str], ScaledFormat] = {
        ("int", 4, "group"): INT4_G128.replace(group_size=gs or 128),
        ("int", 4, "channel"): INT4_G128.replace(name="int4_channel", granularity="row", group_size=None),
        ("int", 8, "channel"): INT8_CHANNEL,
        ("int", 8, "tensor"): INT8_TENSOR,
        ("int", 8, "token"): INT8_TOKEN,
        ("float", 8, "tensor"): FP8_TENSOR,
        ("float", 8, "channel"): FP8_CHANNEL,
        ("float", 8, "token"): FP8_TOKEN,
        ("float", 8, "block"): FP8_BLOCK128,
        ("float", 4, "tensor_group"): NVFP4_DYNAMIC if dynamic else NVFP4,
        ("float", 4, "group"): MXFP4_DYNAMIC if dynamic else MXFP4,
        ("float", 8, "group"): MXFP8_DYNAMIC if dynamic else MXFP8,
    }
    fmt = table.get((typ, bits, strategy))
    if fmt is None or not args.get("symmetric", True):
        raise LowbitError(
            f"cannot read compressed-tensors scheme {args} back; lowbit reads the schemes it exports"
        )
    return fmt


def decode_ct(t: dict[str, Tensor], spec: QuantSpec) -> Decoded:
    fmt = spec.weight[0]
    if "weight_packed" in t and fmt.element.name in ("int4", "int8"):
        bits = fmt.element.bits
        out_f, in_f = (int(x) for x in t["weight_shape"].tolist())
        q = unpack_int32(t["weight_packed"], bits).float()[:, :in_f] - (1 << (bits - 1))
        s = t["weight_scale"].float()
        weight = q * (
            s.repeat_interleave(fmt.group_size or 1, 1) if fmt.granularity == "group" else s.reshape(out_f, 1)
        )
        stats = [{"amax": _amax(s.reshape(out_f, -1), fmt)}]
    elif "weight_packed" in t:  # FP4: NVFP4 or MXFP4
        q = decode(unpack_nibbles(t["weight_packed"]), E2M1)
        if fmt.global_scale:
            g = 1 / t["weight_global_scale"].float().reshape(())
            block = decode(t["weight_scale"], E4M3)
            weight = q * (block * g).repeat_interleave(16, 1)
            stats = [{"amax": block * E2M1.max * g, "global_amax": _global_amax(g)}]
        else:
            s = decode_e8m0(t["weight_scale"])
            weight = q * s.repeat_interleave(32, 1)
            stats = [{"amax": s * E2M1.max}]
    else:
        w, s = t["weight"].float(), t["weight_scale"]
        if fmt.scale_element is not None:  # MXFP8
            s = decode_e8m0(s)
            weight = w * s.repeat_interleave(32, 1)
        elif fmt.granularity == "block":
            s = s.float()
            weight = w * s.repeat_interleave(128, 0).repeat_interleave(128, 1)[: w.shape[0], : w.shape[1]]
        else:
            s = s.float()
            weight = w * (s.reshape(()) if fmt.granularity == "tensor" else s.reshape(-1, 1))
        amax = _amax(s, fmt)
        stats = [
            {
                "amax": amax.reshape(())
                if fmt.granularity == "tensor"
                else amax.reshape(-1, 1)
                if fmt.granularity == "row"
                else amax
            }
        ]
    input_stats: dict[str, Tensor] = {}
    inp = spec.input
    if inp is not None:
        if "input_global_scale" in t:
            input_stats = {"global_amax": _global_amax(1 / t["input_global_scale"].float())}
        elif "input_scale" in t:
            input_stats = {"amax": _amax(t["input_scale"].float().reshape(()), inp)}
    return Decoded(spec, weight, stats, input_stats)


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
            d = decode_ct(mt, ct_spec(_ct_group(groups, checkpoint_name(module))))
        linear = model.get_submodule(module)
        if not isinstance(linear, nn.Linear):
            raise LowbitError(
                f"{model_dir}: {module} has quantization scales but is not a Linear; not a lowbit export"
            )
        plain[f"{module}.weight"] = d.weight.to(dtype)
        parent, _, child = module.rpartition(".")
        setattr(model.get_submodule(parent), child, QuantLinear(linear, d.spec))
        for i, st in enumerate(d.weight_stats):
            stats.update({f"{module}.weight_quantizer.{i}.{k}": v for k, v in st.items()})
        stats.update({f"{module}.input_quantizer.{k}": v for k, v in d.input_stats.items()})
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
                    key = "global_amax" if kv_fmt.global_scale else "amax"
                    div = NVFP4_GLOBAL_DIVISOR if kv_fmt.global_scale else E4M3.max
                    stats[f"{name}.{kv}_quantizer.{key}"] = s.float().reshape(()) * div
        use_kv_attention(model.config)
    load_quantizer_stats(model, stats)
    return model, {"recipe": {"name": summary}, "export": fmt}


def _ct_group(groups: dict[str, Any], module: str) -> dict[str, Any]:
    for group in groups.values():
        targets = group.get("targets", [])
        if module in targets or "Linear" in targets:
            return dict(group)
    raise LowbitError(f"{module}: no compressed-tensors config group targets it; the export is damaged")

"""The unified Hugging Face checkpoint that NVIDIA ModelOpt writes (read by vLLM, SGLang, TensorRT-LLM).

Original tensor names; beside each quantized Linear's `weight` its scales (spec §5):

| quant_algo                 | weight               | weight_scale          | weight_scale_2 | input_scale |
|----------------------------|----------------------|-----------------------|----------------|-------------|
| FP8                        | e4m3 [out, in]       | fp32 []               |                | fp32 []     |
| FP8_PER_CHANNEL_PER_TOKEN  | e4m3 [out, in]       | fp32 [out]            |                |             |
| FP8_PB_WO                  | e4m3 [out, in]       | fp32 [out/128, in/128]|                |             |
| W8A16 / W8A8_SQ_PER_CHANNEL| int8 [out, in]       | fp32 [out]            |                | SQ: fp32 [] |
| W4A16_AWQ                  | uint8 [out/2, in]    | [out, in/g]           |                |             |
| W4A8_AWQ                   | uint8 [out/2, in]    | [out, in/g]           | fp32 []        | fp32 []     |
| NVFP4 / NVFP4_AWQ          | uint8 [out, in/2]    | e4m3 [out, in/16]     | fp32 []        | fp32 []     |
| W4A16_NVFP4                | uint8 [out, in/2]    | e4m3 [out, in/16]     | fp32 []        |             |
| MXFP8                      | e4m3 [out, in]       | uint8 E8M0 [out, in/32]|               |             |

INT4 is packed along the output dim (rows 2r, 2r+1 in the low, high nibble); FP4 along the input dim. lowbit
folds AWQ / SmoothQuant scales into the preceding norm or Linear at calibration, so no pre_quant_scale is
written. Every value is the one the fake-quantized checkpoint computes with (`QLinear.weight_qtensors`).
KV cache: `<attention>.k_proj.k_scale` and `.v_proj.v_scale` = amax / 448 (fp32 scalars), as ModelOpt's
unified export writes them (its TensorRT-LLM and Megatron exporters clamp them to >= 1; lowbit never does).
"""

from __future__ import annotations

from typing import Any

import torch
from tqdm import tqdm

from lowbit import __version__
from lowbit.errors import LowbitError
from lowbit.export.api import ExportOptions
from lowbit.export.schemes import (
    Declared,
    Scheme,
    exclude_modules,
    export_config,
    input_scale,
    kind,
    write_unit,
)
from lowbit.export.source import KVScales, QLinear, Source
from lowbit.export.writer import ExportWriter
from lowbit.formats.elements import E2M1, E4M3, INT4, INT8, encode, encode_e8m0
from lowbit.formats.packing import pack_nibbles
from lowbit.formats.scaled import NVFP4_GLOBAL_DIVISOR

HF_QUANT_CONFIG = "hf_quant_config.json"
PRODUCER = {"name": "lowbit", "version": __version__}

# (weight kinds, input kind) -> quant_algo
QUANT_ALGOS: dict[tuple[tuple[str, ...], str | None], str] = {
    (("fp8_tensor",), "fp8_tensor"): "FP8",
    (("fp8_channel",), "fp8_token"): "FP8_PER_CHANNEL_PER_TOKEN",
    (("fp8_block",), None): "fp8_pb_wo",  # lower case, as ModelOpt 0.47 writes it
    (("int8_channel",), None): "W8A16",
    (("int8_channel",), "int8_tensor"): "W8A8_SQ_PER_CHANNEL",
    (("int4_group",), None): "W4A16_AWQ",
    (("int4_group", "fp8_tensor"), "fp8_tensor"): "W4A8_AWQ",
    (("nvfp4",), "nvfp4_dynamic"): "NVFP4",
    (("nvfp4",), None): "W4A16_NVFP4",
    (("mxfp8",), "mxfp8_dynamic"): "MXFP8",
}
KV_ALGOS = {"fp8_tensor": "FP8", "nvfp4_dynamic": "NVFP4"}


def quant_algo(scheme: Scheme, algorithm: str) -> str:
    algo = QUANT_ALGOS.get((scheme.weight, scheme.input))
    if algo is None:
        raise LowbitError(
            f"the unified HF format has no quant_algo for {scheme.describe()}; "
            "export it with --format compressed-tensors, or quantize with a preset the format lists"
        )
    if algo == "NVFP4" and "awq" in algorithm:
        return "NVFP4_AWQ"
    return algo


def linear_tensors(lin: QLinear, algo: str) -> Declared:
    """{suffix: (tensor, declared dtype, declared shape)} of one quantized Linear in the unified format."""
    out_f, in_f = lin.weight.shape
    qs = lin.weight_qtensors()
    q = qs[0]
    t: Declared = {}
    if algo in ("FP8", "FP8_PER_CHANNEL_PER_TOKEN", "fp8_pb_wo"):
        t["weight"] = (encode(q.values, E4M3), torch.float8_e4m3fn, (out_f, in_f))
        scale = q.scale.float()
        if algo == "FP8":
            t["weight_scale"] = (scale.reshape(()), torch.float32, ())
        elif algo == "FP8_PER_CHANNEL_PER_TOKEN":
            t["weight_scale"] = (scale.reshape(out_f), torch.float32, (out_f,))
        else:  # ModelOpt writes the block scales as [out/128, 1, in/128, 1]
            nb, kb = scale.shape
            t["weight_scale"] = (scale.reshape(nb, 1, kb, 1), torch.float32, (nb, 1, kb, 1))
    elif algo in ("W8A16", "W8A8_SQ_PER_CHANNEL"):
        t["weight"] = (encode(q.values, INT8), torch.int8, (out_f, in_f))
        t["weight_scale"] = (q.scale.float().reshape(out_f), torch.float32, (out_f,))
    elif algo in ("W4A16_AWQ", "W4A8_AWQ"):
        g = q.fmt.group_size
        assert g is not None
        t["weight"] = (pack_nibbles(encode(q.values, INT4), dim=0), torch.uint8, (out_f // 2, in_f))
        t["weight_scale"] = (q.scale.float(), torch.float32, (out_f, in_f // g))
        if algo == "W4A8_AWQ":
            # the engine computes fp8(int4 * weight_scale / weight_scale_2) * weight_scale_2: lowbit's chain
            t["weight_scale_2"] = (qs[1].scale.float().reshape(()), torch.float32, ())
    elif algo in ("NVFP4", "NVFP4_AWQ", "W4A16_NVFP4"):
        assert q.global_scale is not None
        t["weight"] = (pack_nibbles(encode(q.values, E2M1), dim=-1), torch.uint8, (out_f, in_f // 2))
        t["weight_scale"] = (encode(q.scale, E4M3), torch.float8_e4m3fn, (out_f, in_f // 16))
        t["weight_scale_2"] = (q.global_scale.float().reshape(()), torch.float32, ())
    elif algo == "MXFP8":
        t["weight"] = (encode(q.values, E4M3), torch.float8_e4m3fn, (out_f, in_f))
        t["weight_scale"] = (encode_e8m0(q.scale), torch.uint8, (out_f, in_f // 32))
    else:  # pragma: no cover - QUANT_ALGOS and this function are kept in step
        raise AssertionError(algo)
    if algo in ("FP8", "W8A8_SQ_PER_CHANNEL", "W4A8_AWQ", "NVFP4", "NVFP4_AWQ"):
        amax, fmt = lin.input_amax(), lin.input_format
        if amax is None or fmt is None:
            raise LowbitError(
                f"{lin.name}: no calibrated input amax; the checkpoint is damaged (re-run quantize)"
            )
        t["input_scale"] = (input_scale(amax, fmt), torch.float32, ())
    return t


def kv_scales(kv: KVScales) -> Declared:
    """k_scale / v_scale of one attention module, under the K / V projections as ModelOpt names them."""
    divisor = E4M3.max_norm if kv.fmt.element is E4M3 and not kv.fmt.global_scale else NVFP4_GLOBAL_DIVISOR
    return {
        f"{kv.attention}.{w}_proj.{w}_scale": (kv.amax(w) / divisor, torch.float32, ()) for w in ("k", "v")
    }


def quant_config(source: Source, algos: dict[str, str], scheme_of: dict[str, Scheme]) -> dict[str, Any]:
    """hf_quant_config.json's "quantization" section."""
    exclude = exclude_modules(source)
    kv_algo = KV_ALGOS.get(kind(source.kv_format)) if source.kv_format is not None else None
    distinct = sorted(set(algos.values()))
    quant: dict[str, Any] = {"quant_algo": None, "kv_cache_quant_algo": kv_algo}
    if len(distinct) == 1:
        algo = distinct[0]
        quant["quant_algo"] = algo
        group = next(iter(scheme_of.values())).group_size
        if algo in ("W4A16_AWQ", "W4A8_AWQ", "NVFP4", "NVFP4_AWQ", "W4A16_NVFP4", "MXFP8"):
            quant["group_size"] = group
        if algo in ("W4A16_AWQ", "W4A8_AWQ", "NVFP4_AWQ"):
            quant["has_zero_point"] = False
            quant["pre_quant_scale"] = False  # folded into the preceding norm / Linear
    elif distinct:
        quant["quant_algo"] = "MIXED_PRECISION"
        quant["quantized_layers"] = {
            source.checkpoint_name(name): {
                "quant_algo": algo, **({"group_size": g} if (g := scheme_of[name].group_size) else {})
            }
            for name, algo in algos.items()
        }
    quant["exclude_modules"] = exclude
    return quant


def config_quantization(quant: dict[str, Any]) -> dict[str, Any]:
    """config.json's quantization_config, as ModelOpt 0.47 derives it from hf_quant_config.json."""
    out: dict[str, Any] = {"ignore": quant["exclude_modules"], "quant_algo": quant["quant_algo"]}
    if quant.get("kv_cache_quant_algo") == "FP8":
        out["kv_cache_scheme"] = {"dynamic": False, "num_bits": 8, "type": "float"}
    elif quant.get("kv_cache_quant_algo"):
        out["kv_cache_quant_algo"] = quant["kv_cache_quant_algo"]
    fp8 = {"dynamic": False, "num_bits": 8, "type": "float"}
    fp4 = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16}
    groups = {
        "FP8": {"input_activations": fp8, "weights": fp8},
        "NVFP4": {"input_activations": fp4, "weights": fp4},
        "W4A16_NVFP4": {"weights": fp4},
    }.get(quant["quant_algo"])
    if groups is not None:
        out["config_groups"] = {"group_0": {**groups, "targets": ["Linear"]}}
    if quant["quant_algo"] == "MIXED_PRECISION":
        out["quantized_layers"] = quant["quantized_layers"]
    return {**out, "producer": PRODUCER, "quant_method": "modelopt"}


def export_hf(source: Source, writer: ExportWriter, options: ExportOptions) -> None:
    dtype = options.dtype or source.storage_dtype()
    scheme_of = {name: Scheme.of(spec) for name, spec in source.modules.items()}
    algos = {name: quant_algo(s, source.algorithm) for name, s in scheme_of.items()}  # all checked up front
    for label in tqdm(source.unit_labels(), desc="export hf", unit="unit", disable=not options.progress):
        write_unit(
            writer, source.unit(label), dtype, lambda lin: linear_tensors(lin, algos[lin.name]), kv_scales
        )
    quant = quant_config(source, algos, scheme_of)
    if source.quantized:
        writer.write_json(HF_QUANT_CONFIG, {"producer": PRODUCER, "quantization": quant})
    qcfg = config_quantization(quant) if source.quantized else None
    writer.write_json("config.json", export_config(source, dtype, qcfg))
    writer.copy(source.tokenizer_files())

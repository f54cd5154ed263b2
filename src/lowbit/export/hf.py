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
from lowbit.export.codecs import Codec, codec_for
from lowbit.export.schemes import Declared, Scheme, exclude_modules, export_config, kind, write_unit
from lowbit.export.source import KVScales, Source
from lowbit.export.writer import ExportWriter
from lowbit.quant.steps import Algorithm

HF_QUANT_CONFIG = "hf_quant_config.json"
PRODUCER = {"name": "lowbit", "version": __version__}
KV_ALGOS = {"fp8_tensor": "FP8", "nvfp4_dynamic": "NVFP4"}


def codec(scheme: Scheme, algorithm: str) -> Codec:
    """The row of the unified format for `scheme` (NVFP4_AWQ where AWQ smoothed the weights)."""
    row = codec_for("hf", scheme, awq=Algorithm.parse(algorithm).awq)
    if row is None:
        raise LowbitError(
            f"the unified HF format has no quant_algo for {scheme.describe()}; "
            "export it with --format compressed-tensors, or quantize with a preset the format lists"
        )
    return row


def kv_scales(kv: KVScales) -> Declared:
    """k_scale / v_scale of one attention module, under the K / V projections as ModelOpt names them: the
    per-tensor scale of the FP8 cache, or the global scale of the NVFP4 one."""
    return {f"{kv.attention}.{w}_proj.{w}_scale": (kv.scale(w), torch.float32, ()) for w in ("k", "v")}


def quant_config(source: Source, codecs: dict[str, Codec], scheme_of: dict[str, Scheme]) -> dict[str, Any]:
    """hf_quant_config.json's "quantization" section."""
    algos = {name: c.name for name, c in codecs.items()}
    exclude = exclude_modules(source)
    kv_algo = KV_ALGOS.get(kind(source.kv_format)) if source.kv_format is not None else None
    distinct = sorted(set(algos.values()))
    quant: dict[str, Any] = {"quant_algo": None, "kv_cache_quant_algo": kv_algo}
    if len(distinct) == 1:
        row = next(iter(codecs.values()))
        quant["quant_algo"] = row.name
        if row.groups:
            quant["group_size"] = next(iter(scheme_of.values())).group_size
        if row.variant == "awq":
            quant["has_zero_point"] = False
            quant["pre_quant_scale"] = False  # folded into the preceding norm / Linear
    elif distinct:
        quant["quant_algo"] = "MIXED_PRECISION"
        quant["quantized_layers"] = {
            source.checkpoint_name(name): {
                "quant_algo": algo,
                **({"group_size": g} if (g := scheme_of[name].group_size) else {}),
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
    codecs = {name: codec(s, source.algorithm) for name, s in scheme_of.items()}  # all checked up front
    for label in tqdm(source.unit_labels(), desc="export hf", unit="unit", disable=not options.progress):
        write_unit(writer, source.unit(label), dtype, lambda lin: codecs[lin.name].encode(lin), kv_scales)
    quant = quant_config(source, codecs, scheme_of)
    if source.quantized:
        writer.write_json(HF_QUANT_CONFIG, {"producer": PRODUCER, "quantization": quant})
    qcfg = config_quantization(quant) if source.quantized else None
    writer.write_json("config.json", export_config(source, dtype, qcfg))
    writer.copy(source.tokenizer_files())

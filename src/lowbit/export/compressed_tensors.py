"""compressed-tensors checkpoints (read by vLLM, and by transformers with the compressed-tensors package).

The format per scheme (spec §6), tensors beside the original names:

- int4 / int8 weight-only -> pack-quantized: weight_packed int32 [out, in*bits/32], weight_scale,
  weight_shape int64 [2];
- int8 weights + int8 activations -> int-quantized: weight int8, weight_scale [out, 1], input_scale [1];
- fp8 (tensor / channel / block) -> float-quantized: weight e4m3, weight_scale, input_scale [1] if static;
- NVFP4 -> nvfp4-pack-quantized: weight_packed uint8 [out, in/2], weight_scale e4m3 [out, in/16],
  weight_global_scale [1], input_global_scale [1];
- MXFP4 / MXFP8 -> mxfp4-pack-quantized / mxfp8-quantized: packed / e4m3 weight, weight_scale uint8 E8M0.

Integer codes are offset binary in the int32 words (q + 2**(bits-1)). NVFP4 global scales are stored as
reciprocals: `weight_global_scale = 1 / weight_scale_2 = 448 * 6 / amax`. Scales are written in fp32 and the
config says so (`scale_dtype`), so the reader computes exactly what lowbit's fake-quantized model does.
Modules with different schemes become separate config groups targeting them by name (format
"mixed-precision"). KV cache: `<attention>.k_scale` / `.v_scale` = amax / 448.
"""

from __future__ import annotations

from typing import Any

import torch
from tqdm import tqdm

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
from lowbit.formats.packing import pack_int32, pack_nibbles

CT_VERSION = "0.20.0"

# (weight kinds, input kind) -> compressed-tensors format
FORMATS: dict[tuple[tuple[str, ...], str | None], str] = {
    (("int4_group",), None): "pack-quantized",
    (("int4_channel",), None): "pack-quantized",
    (("int8_channel",), None): "pack-quantized",
    (("int8_channel",), "int8_tensor"): "int-quantized",
    (("int8_channel",), "int8_token"): "int-quantized",
    (("fp8_tensor",), "fp8_tensor"): "float-quantized",
    (("fp8_tensor",), None): "float-quantized",
    (("fp8_channel",), "fp8_token"): "float-quantized",
    (("fp8_channel",), None): "float-quantized",
    (("fp8_block",), None): "float-quantized",
    (("nvfp4",), "nvfp4_dynamic"): "nvfp4-pack-quantized",
    (("nvfp4",), None): "nvfp4-pack-quantized",
    (("mxfp4",), "mxfp4_dynamic"): "mxfp4-pack-quantized",
    (("mxfp4",), None): "mxfp4-pack-quantized",
    (("mxfp8",), "mxfp8_dynamic"): "mxfp8-quantized",
    (("mxfp8",), None): "mxfp8-quantized",
}


def ct_format(scheme: Scheme) -> str:
    fmt = FORMATS.get((scheme.weight, scheme.input))
    if fmt is None:
        hint = (
            " (W4A8's FP8 second weight level has no compressed-tensors form)"
            if len(scheme.weight) > 1
            else ""
        )
        raise LowbitError(
            f"compressed-tensors has no format for {scheme.describe()}{hint}; export it with --format hf"
        )
    return fmt


def _args(k: str, group_size: int | None, weight: bool) -> dict[str, Any]:
    """QuantizationArgs of one format kind."""
    num_bits = 4 if k.startswith(("int4", "nvfp4", "mxfp4")) else 8
    a: dict[str, Any] = {
        "num_bits": num_bits,
        "type": "int" if k.startswith("int") else "float",
        "symmetric": True,
        "group_size": None,
        "strategy": "tensor",
        "block_structure": None,
        "dynamic": False,
        "actorder": None,
    }
    if k.startswith("nvfp4"):
        a.update(strategy="tensor_group", group_size=16, scale_dtype="torch.float8_e4m3fn")
        if not weight:
            a["dynamic"] = "local"
    elif k.startswith("mx"):
        a.update(strategy="group", group_size=32, scale_dtype="torch.uint8", dynamic=not weight)
    elif k.endswith("_group"):
        a.update(strategy="group", group_size=group_size, scale_dtype="torch.float32")
    elif k.endswith("_block"):
        a.update(strategy="block", block_structure=[128, 128], scale_dtype="torch.float32")
    elif k.endswith("_channel"):
        a.update(strategy="channel", scale_dtype="torch.float32")
    elif k.endswith("_token"):
        a.update(strategy="token", dynamic=True)
    elif k.endswith("_tensor"):
        a["scale_dtype"] = "torch.float32"
    if weight or a["dynamic"] is False:
        a["observer"] = "minmax"
    return a


def scheme_config(scheme: Scheme) -> dict[str, Any]:
    return {
        "weights": _args(scheme.weight[0], scheme.group_size, weight=True),
        "input_activations": _args(scheme.input, None, weight=False) if scheme.input else None,
        "output_activations": None,
        "format": ct_format(scheme),
    }


def quantization_config(source: Source, scheme_of: dict[str, Scheme]) -> dict[str, Any]:
    schemes = sorted(set(scheme_of.values()), key=lambda s: s.describe())
    groups: dict[str, Any] = {}
    for i, scheme in enumerate(schemes):
        cfg = scheme_config(scheme)
        if len(schemes) == 1:
            cfg["targets"] = ["Linear"]
        else:
            cfg["targets"] = sorted(source.checkpoint_name(n) for n, s in scheme_of.items() if s == scheme)
        groups[f"group_{i}"] = cfg
    formats = {g["format"] for g in groups.values()}
    kv = None
    if source.kv_format is not None:
        if kind(source.kv_format) != "fp8_tensor":
            raise LowbitError(
                f"compressed-tensors stores FP8 KV caches only, not {source.kv_format.name}; "
                "export with --format hf or quantize with --kv-cache fp8"
            )
        kv = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor", "dynamic": False}
    return {
        "quant_method": "compressed-tensors",
        "version": CT_VERSION,
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": exclude_modules(source, embeddings=False),
        "kv_cache_scheme": kv,
        "global_compression_ratio": None,
        "sparsity_config": {},
    }


def linear_tensors(lin: QLinear, scheme: Scheme) -> Declared:
    """{suffix: (tensor, declared dtype, declared shape)} of one quantized Linear."""
    out_f, in_f = lin.weight.shape
    q = lin.weight_qtensors()[0]
    wk = scheme.weight[0]
    fmt = ct_format(scheme)
    t: Declared = {}
    if fmt == "pack-quantized":
        bits = 4 if wk.startswith("int4") else 8
        codes = encode(q.values, INT4 if bits == 4 else INT8).to(torch.int16) + (1 << (bits - 1))
        t["weight_packed"] = (pack_int32(codes, bits), torch.int32, (out_f, in_f * bits // 32))
        scale = q.scale.float().reshape(out_f, -1)
        t["weight_scale"] = (scale, torch.float32, tuple(scale.shape))
        t["weight_shape"] = (torch.tensor([out_f, in_f], dtype=torch.int64), torch.int64, (2,))
    elif fmt in ("int-quantized", "float-quantized"):
        element = INT8 if fmt == "int-quantized" else E4M3
        dtype = torch.int8 if fmt == "int-quantized" else torch.float8_e4m3fn
        t["weight"] = (encode(q.values, element), dtype, (out_f, in_f))
        scale = q.scale.float()
        scale = (
            scale.reshape(1)
            if wk.endswith("_tensor")
            else scale
            if wk.endswith("_block")
            else scale.reshape(out_f, 1)
        )
        t["weight_scale"] = (scale, torch.float32, tuple(scale.shape))
    elif fmt == "nvfp4-pack-quantized":
        assert q.global_scale is not None
        t["weight_packed"] = (pack_nibbles(encode(q.values, E2M1)), torch.uint8, (out_f, in_f // 2))
        t["weight_scale"] = (encode(q.scale, E4M3), torch.float8_e4m3fn, (out_f, in_f // 16))
        t["weight_global_scale"] = ((1 / q.global_scale.float()).reshape(1), torch.float32, (1,))
    elif fmt == "mxfp4-pack-quantized":
        t["weight_packed"] = (pack_nibbles(encode(q.values, E2M1)), torch.uint8, (out_f, in_f // 2))
        t["weight_scale"] = (encode_e8m0(q.scale), torch.uint8, (out_f, in_f // 32))
    elif fmt == "mxfp8-quantized":
        t["weight"] = (encode(q.values, E4M3), torch.float8_e4m3fn, (out_f, in_f))
        t["weight_scale"] = (encode_e8m0(q.scale), torch.uint8, (out_f, in_f // 32))
    else:  # pragma: no cover - FORMATS and this function are kept in step
        raise AssertionError(fmt)
    fmt_in = lin.input_format
    if fmt_in is not None and (not fmt_in.dynamic or fmt_in.global_scale):
        amax = lin.input_amax()
        if amax is None:
            raise LowbitError(
                f"{lin.name}: no calibrated input amax; the checkpoint is damaged (re-run quantize)"
            )
        s = input_scale(amax, fmt_in)
        if fmt_in.global_scale:
            t["input_global_scale"] = ((1 / s).reshape(1), torch.float32, (1,))
        else:
            t["input_scale"] = (s.reshape(1), torch.float32, (1,))
    return t


def kv_scales(kv: KVScales) -> Declared:
    return {
        f"{kv.attention}.{w}_scale": ((kv.amax(w) / E4M3.max_norm).reshape(1), torch.float32, (1,))
        for w in ("k", "v")
    }


def export_ct(source: Source, writer: ExportWriter, options: ExportOptions) -> None:
    dtype = options.dtype or source.storage_dtype()
    scheme_of = {name: Scheme.of(spec) for name, spec in source.modules.items()}
    for s in set(scheme_of.values()):
        ct_format(s)  # every scheme checked before anything is written
    qcfg = quantization_config(source, scheme_of) if source.quantized else None
    for label in tqdm(source.unit_labels(), desc="export compressed-tensors", unit="unit",
                      disable=not options.progress):  # fmt: skip
        write_unit(
            writer, source.unit(label), dtype, lambda lin: linear_tensors(lin, scheme_of[lin.name]), kv_scales
        )
    writer.write_json("config.json", export_config(source, dtype, qcfg))
    writer.copy(source.tokenizer_files())

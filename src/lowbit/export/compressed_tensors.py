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
from lowbit.export.codecs import Codec, codec_for
from lowbit.export.schemes import Declared, Scheme, exclude_modules, export_config, kind, write_unit
from lowbit.export.source import KVScales, Source
from lowbit.export.writer import ExportWriter
from lowbit.formats.elements import FloatElement, IntElement, PowerOfTwoElement
from lowbit.formats.scaled import FORMATS, ScaledFormat
from lowbit.quant.linear import QuantSpec

CT_VERSION = "0.20.0"


def codec(scheme: Scheme) -> Codec:
    row = codec_for("compressed-tensors", scheme)
    if row is None:
        hint = (
            " (W4A8's FP8 second weight level has no compressed-tensors form)"
            if len(scheme.weight) > 1
            else ""
        )
        raise LowbitError(
            f"compressed-tensors has no format for {scheme.describe()}{hint}; export it with --format hf"
        )
    return row


def quantization_args(fmt: ScaledFormat, weight: bool) -> dict[str, Any]:
    """compressed-tensors' QuantizationArgs of one format, derived from the format itself."""
    dynamic: bool | str = "local" if fmt.dynamic and fmt.global_scale else fmt.dynamic
    strategy = (
        "tensor_group" if fmt.global_scale
        else {"row": "token" if fmt.dynamic else "channel"}.get(fmt.granularity, fmt.granularity)
    )  # fmt: skip
    a: dict[str, Any] = {
        "num_bits": fmt.bits,
        "type": "int" if isinstance(fmt.element, IntElement) else "float",
        "symmetric": True,
        "group_size": fmt.group_size if fmt.granularity == "group" else None,
        "strategy": strategy,
        "block_structure": list(fmt.block_shape) if fmt.block_shape else None,
        "dynamic": dynamic,
        "actorder": None,
    }
    if strategy != "token":
        a["scale_dtype"] = (
            "torch.float8_e4m3fn" if isinstance(fmt.scale_element, FloatElement)
            else "torch.uint8" if isinstance(fmt.scale_element, PowerOfTwoElement)
            else "torch.float32"
        )  # fmt: skip
    if weight or a["dynamic"] is False:
        a["observer"] = "minmax"
    return a


def format_of_args(args: dict[str, Any], weight: bool) -> ScaledFormat:
    """The lowbit format whose `quantization_args` are `args` (reading an export back)."""
    keys = ("num_bits", "type", "strategy", "group_size", "dynamic", "block_structure")
    regrouped = [
        f.replace(group_size=int(args["group_size"]))
        for f in FORMATS.values()
        if f.granularity == "group" and f.scale_element is None and args.get("group_size")
    ]
    for fmt in [*FORMATS.values(), *regrouped]:
        if not fmt.symmetric or (weight and fmt.dynamic):
            continue
        mine = quantization_args(fmt, weight)
        if all(mine.get(k) == args.get(k) for k in keys):
            return fmt
    raise LowbitError(
        f"cannot read compressed-tensors scheme {args} back; lowbit reads the schemes it exports"
    )


def scheme_config(scheme: Scheme, spec: QuantSpec) -> dict[str, Any]:
    return {
        "weights": quantization_args(spec.weight[0], weight=True),
        "input_activations": quantization_args(spec.input, weight=False) if spec.input else None,
        "output_activations": None,
        "format": codec(scheme).name,
    }


def quantization_config(source: Source, scheme_of: dict[str, Scheme]) -> dict[str, Any]:
    schemes = sorted(set(scheme_of.values()), key=lambda s: s.describe())
    spec_of = {scheme_of[n]: spec for n, spec in source.modules.items()}
    groups: dict[str, Any] = {}
    for i, scheme in enumerate(schemes):
        cfg = scheme_config(scheme, spec_of[scheme])
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


def kv_scales(kv: KVScales) -> Declared:
    return {f"{kv.attention}.{w}_scale": (kv.scale(w).reshape(1), torch.float32, (1,)) for w in ("k", "v")}


def export_ct(source: Source, writer: ExportWriter, options: ExportOptions) -> None:
    dtype = options.dtype or source.storage_dtype()
    scheme_of = {name: Scheme.of(spec) for name, spec in source.modules.items()}
    codecs = {
        name: codec(s) for name, s in scheme_of.items()
    }  # every scheme checked before anything is written
    qcfg = quantization_config(source, scheme_of) if source.quantized else None
    for label in tqdm(source.unit_labels(), desc="export compressed-tensors", unit="unit",
                      disable=not options.progress):  # fmt: skip
        write_unit(writer, source.unit(label), dtype, lambda lin: codecs[lin.name].encode(lin), kv_scales)
    writer.write_json("config.json", export_config(source, dtype, qcfg))
    writer.copy(source.tokenizer_files())

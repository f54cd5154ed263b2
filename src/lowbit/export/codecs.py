"""Codecs: one row per (target, scheme), how a quantized Linear's numbers lie on disk in each export format.

A row (`Codec`) names its target ("hf", "compressed-tensors", "trtllm"), the name the target gives the scheme
(quant_algo, or compressed-tensors' format), the weight formats and input format it stores, and its tensors:
each `Field` is a suffix, the number of the Linear it holds (`Part`), how that number is encoded (`Encoding`:
dtype, encode, decode) and the shape it is declared with. So one table gives

- `encode(lin)`: the declared tensors of one Linear ({suffix: (tensor, dtype, shape)}), which the exporters
  write and `ExportWriter` checks;
- `decode(tensors)`: the QTensors of its weight chain and the Scales of its input, which
  `formats.dequantize` and `formats.scales.stats_for` turn back into weights and quantizer statistics
  (`readback`);
- `parts(lin)`: TensorRT-LLM's logical tensors with their out/in axes, split per rank before encoding.

Every number comes from the QTensors that `formats.quantize` computes for the fake-quantized model
(`QLinear.weight_qtensors`) and from `formats.scales.scales` for inputs, so an export holds exactly the
scales the checkpoint computes with. A format's config entry is derived from the same row (`hf.py`,
`compressed_tensors.py`). Adding a format means a row here (and its ScaledFormat in `formats/`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.export.schemes import Declared, Scheme, kind
from lowbit.formats.elements import E2M1, E4M3, INT4, INT8, Element, decode, decode_e8m0, encode, encode_e8m0
from lowbit.formats.packing import pack_int32, pack_nibbles, unpack_int32, unpack_nibbles
from lowbit.formats.scaled import (
    FP8_BLOCK128,
    FP8_CHANNEL,
    FP8_TENSOR,
    FP8_TOKEN,
    INT4_CHANNEL,
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
    QTensor,
    ScaledFormat,
    quantize,
    scale_shape,
)
from lowbit.formats.scales import Scales, stats_for
from lowbit.quant.linear import QuantSpec

if TYPE_CHECKING:
    from lowbit.export.source import QLinear

Target = Literal["hf", "compressed-tensors", "trtllm"]
# which number of a quantized Linear a tensor holds: the weight chain's first stage (grid values, block scales,
# NVFP4's global scale), the FP8 level of W4A8 (the chain's second stage), the input's per-tensor scale or
# NVFP4 global scale, the weight's [out, in] shape
Part = Literal[
    "values", "scale", "global_scale", "level2_scale", "input_scale", "input_global_scale", "shape"
]
Shape = Callable[
    [int, int, ScaledFormat], tuple[int, ...]
]  # (out, in, first weight format) -> declared shape
Axes = tuple[str, ...]  # TensorRT-LLM: per dim of the declared tensor, "out", "in" or "-" (neither)


@dataclass(frozen=True)
class Encoding:
    """How one number is stored: its dtype on disk, stored = encode(logical), logical = decode(stored, (out,
    in)) in float32, and for grid values the [out, in] shape a stored tensor holds (None: from `shape`)."""

    dtype: torch.dtype
    encode: Callable[[Tensor], Tensor]
    decode: Callable[[Tensor, tuple[int, int]], Tensor]
    weight_shape: Callable[[torch.Size], tuple[int, int]] | None = None


def _codes(element: Element, dtype: torch.dtype) -> Encoding:
    """Grid values as their bit patterns, one per element (FP8, INT8)."""
    return Encoding(dtype, lambda v: encode(v, element), lambda c, _: decode(c, element), lambda s: (s[0], s[1]))


def _words(bits: int) -> Encoding:
    """compressed-tensors' int32 words of offset-binary codes (q + 2**(bits-1)), the last word zero-padded."""
    element, offset = (INT4 if bits == 4 else INT8), 1 << (bits - 1)
    return Encoding(
        torch.int32,
        lambda v: pack_int32(encode(v, element).to(torch.int16) + offset, bits),
        lambda w, shape: unpack_int32(w, bits).float()[:, : shape[1]] - offset,
    )


E4M3_CODES = _codes(E4M3, torch.float8_e4m3fn)
INT8_CODES = _codes(INT8, torch.int8)
INT4_ROW_PAIRS = Encoding(  # ModelOpt: rows 2r, 2r + 1 in the low, high nibble
    torch.uint8,
    lambda v: pack_nibbles(encode(v, INT4), dim=0),
    lambda c, _: unpack_nibbles(c, dim=0, signed=True).float(),
    lambda s: (2 * s[0], s[1]),
)
INT4_ROW_PAIRS_INT8 = Encoding(  # TensorRT-LLM reads ModelOpt's bytes as int8
    torch.int8,
    lambda v: pack_nibbles(encode(v, INT4), dim=0).view(torch.int8),
    lambda c, _: unpack_nibbles(c.view(torch.uint8), dim=0, signed=True).float(),
    lambda s: (2 * s[0], s[1]),
)
FP4_PAIRS = Encoding(  # columns 2j, 2j + 1 in the low, high nibble
    torch.uint8,
    lambda v: pack_nibbles(encode(v, E2M1)),
    lambda c, _: decode(unpack_nibbles(c), E2M1),
    lambda s: (s[0], 2 * s[1]),
)
FP32 = Encoding(torch.float32, lambda t: t.float(), lambda t, _: t.float())
RECIPROCAL = Encoding(torch.float32, lambda t: 1 / t.float(), lambda t, _: 1 / t.float())
E4M3_SCALES = Encoding(torch.float8_e4m3fn, lambda s: encode(s, E4M3), lambda c, _: decode(c, E4M3))
E8M0_SCALES = Encoding(torch.uint8, encode_e8m0, lambda c, _: decode_e8m0(c))
INT64 = Encoding(torch.int64, lambda t: t.to(torch.int64), lambda t, _: t.float())


def _scalar(o: int, i: int, f: ScaledFormat) -> tuple[int, ...]:
    return ()


def _one(o: int, i: int, f: ScaledFormat) -> tuple[int, ...]:
    return (1,)


def _weight(o: int, i: int, f: ScaledFormat) -> tuple[int, ...]:
    return (o, i)


def _rows(o: int, i: int, f: ScaledFormat) -> tuple[int, ...]:
    return (o,)


def _rows_1(o: int, i: int, f: ScaledFormat) -> tuple[int, ...]:
    return (o, 1)


def _blocks(o: int, i: int, f: ScaledFormat) -> tuple[int, ...]:
    return tuple(scale_shape((o, i), f))  # (out, in / g) for groups, (out / 128, in / 128) for 2-D blocks


def _modelopt_blocks(o: int, i: int, f: ScaledFormat) -> tuple[int, ...]:
    nb, kb = scale_shape((o, i), f)
    return (nb, 1, kb, 1)  # ModelOpt writes 2-D block scales as [out/128, 1, in/128, 1]


def _groups_or_1(o: int, i: int, f: ScaledFormat) -> tuple[int, ...]:
    return (o, i // f.group_size) if f.granularity == "group" and f.group_size else (o, 1)


def _half_rows(o: int, i: int, f: ScaledFormat) -> tuple[int, ...]:
    return (o // 2, i)


def _half_cols(o: int, i: int, f: ScaledFormat) -> tuple[int, ...]:
    return (o, i // 2)


def _words_shape(bits: int) -> Shape:
    return lambda o, i, f: (o, -(-i * bits // 32))


@dataclass(frozen=True)
class Field:
    """One stored tensor of a quantized Linear."""

    suffix: str
    part: Part
    encoding: Encoding
    shape: Shape
    axes: Axes = ()  # TensorRT-LLM only


@dataclass(frozen=True)
class Codec:
    """One (target, scheme) row: the formats it stores and their tensors."""

    target: Target
    name: str  # hf quant_algo, compressed-tensors format, or TensorRT-LLM quant_algo
    weight: tuple[ScaledFormat, ...]  # the weight chain (group sizes of the prototypes do not matter)
    input: ScaledFormat | None
    fields: tuple[Field, ...]
    variant: str | None = None  # "awq": the name the target uses when AWQ smoothed the weights (NVFP4_AWQ)
    groups: bool = False  # hf: the config states group_size

    @property
    def key(self) -> tuple[tuple[str, ...], str | None]:
        return tuple(kind(f) for f in self.weight), kind(self.input) if self.input is not None else None

    def formats(self, group_size: int | None) -> QuantSpec:
        """The QuantSpec this row stores, with `group_size` for INT groups (as the export's config states)."""
        first = self.weight[0]
        if group_size and first.granularity == "group" and first.scale_element is None:
            first = first.replace(group_size=group_size)
        return QuantSpec((first, *self.weight[1:]), self.input)

    # --- writing ---

    def encode(self, lin: QLinear) -> Declared:
        """{suffix: (stored tensor, declared dtype, declared shape)} of one quantized Linear."""
        out_f, in_f = lin.weight.shape
        fmt = lin.spec.weight[0]
        numbers = _numbers(lin, self)
        return {
            f.suffix: (
                f.encoding.encode(_logical(numbers[f.part], f, out_f, in_f, fmt)),
                f.encoding.dtype,
                f.shape(out_f, in_f, fmt),
            )
            for f in self.fields
        }

    def parts(self, lin: QLinear) -> dict[str, tuple[Tensor, Axes, Callable[[Tensor], Tensor]]]:
        """TensorRT-LLM: {suffix: (logical tensor in its declared shape, axes, encoder)}; the tensor-parallel
        split cuts the logical tensors along their axes and encodes each piece."""
        out_f, in_f = lin.weight.shape
        fmt = lin.spec.weight[0]
        numbers = _numbers(lin, self)
        return {
            f.suffix: (_logical(numbers[f.part], f, out_f, in_f, fmt), f.axes, f.encoding.encode)
            for f in self.fields
        }

    # --- reading ---

    def decode(
        self, tensors: dict[str, Tensor], group_size: int | None
    ) -> tuple[list[QTensor], Scales | None]:
        """The weight chain's QTensors and the input's Scales (None without an input format) of one Linear's
        stored tensors (by suffix)."""
        spec = self.formats(group_size)
        fields = {f.part: f for f in self.fields}
        shape = _weight_shape(tensors, fields)
        numbers = {
            f.part: f.encoding.decode(tensors[f.suffix], shape) for f in self.fields if f.part != "shape"
        }
        fmt = spec.weight[0]
        glob = numbers.get("global_scale")
        chain = [
            QTensor(
                numbers["values"], numbers["scale"].reshape(scale_shape(shape, fmt)), fmt,
                None if glob is None else glob.reshape(()),
            )
        ]  # fmt: skip
        if len(spec.weight) > 1:  # W4A8: the FP8 level of the dequantized INT4 values, from its stored scale
            from lowbit.formats.scaled import dequantize

            level = spec.weight[1]
            stats = stats_for(level, Scales(numbers["level2_scale"].reshape(())))
            chain.append(quantize(dequantize(chain[0]), level, amax=stats.amax))
        inputs = None
        if spec.input is not None:
            s, g = numbers.get("input_scale"), numbers.get("input_global_scale")
            inputs = Scales(None if s is None else s.reshape(()), None if g is None else g.reshape(()))
        return chain, inputs


def _weight_shape(tensors: dict[str, Tensor], fields: dict[Part, Field]) -> tuple[int, int]:
    if "shape" in fields:
        out_f, in_f = (int(x) for x in tensors[fields["shape"].suffix].tolist())
        return out_f, in_f
    values = fields["values"]
    assert values.encoding.weight_shape is not None
    return values.encoding.weight_shape(tensors[values.suffix].shape)


def _logical(t: Tensor, f: Field, out_f: int, in_f: int, fmt: ScaledFormat) -> Tensor:
    """A number in the shape its field declares (grid values stay [out, in]: packing changes their shape)."""
    return t if f.part == "values" else t.reshape(f.shape(out_f, in_f, fmt))


def _numbers(lin: QLinear, codec: Codec) -> dict[str, Tensor]:
    """The numbers a row may store, from the QTensors the fake-quantized model computes with."""
    qs = lin.weight_qtensors()
    out_f, in_f = lin.weight.shape
    numbers: dict[str, Tensor] = {
        "values": qs[0].values,
        "scale": qs[0].scale.float(),
        "shape": torch.tensor([out_f, in_f], dtype=torch.int64),
    }
    if qs[0].global_scale is not None:
        numbers["global_scale"] = qs[0].global_scale.float()
    if len(qs) > 1:
        numbers["level2_scale"] = qs[1].scale.float()
    if codec.input is not None and any(f.part.startswith("input") for f in codec.fields):
        scales = lin.input_scales()
        if scales is None:
            raise LowbitError(
                f"{lin.name}: no calibrated input amax; the checkpoint is damaged (re-run quantize)"
            )
        if scales.scale is not None:
            numbers["input_scale"] = scales.scale.float()
        if scales.global_scale is not None:
            numbers["input_global_scale"] = scales.global_scale.float()
    return numbers


# --- the rows -----------------------------------------------------------------------------------------------

IO, OUT, IN, NONE = ("out", "in"), ("out",), ("in",), ("-",)

# the unified HF checkpoint ModelOpt writes (spec §5)
_HF_E4M3 = Field("weight", "values", E4M3_CODES, _weight)
_HF_INT8 = Field("weight", "values", INT8_CODES, _weight)
_HF_INT4 = Field("weight", "values", INT4_ROW_PAIRS, _half_rows)
_HF_FP4 = Field("weight", "values", FP4_PAIRS, _half_cols)
_HF_SCALE = Field("weight_scale", "scale", FP32, _scalar)
_HF_ROW_SCALES = Field("weight_scale", "scale", FP32, _rows)
_HF_GROUP_SCALES = Field("weight_scale", "scale", FP32, _blocks)
_HF_FP4_SCALES = Field("weight_scale", "scale", E4M3_SCALES, _blocks)
_HF_INPUT = Field("input_scale", "input_scale", FP32, _scalar)
_HF_NVFP4 = (_HF_FP4, _HF_FP4_SCALES, Field("weight_scale_2", "global_scale", FP32, _scalar))
_HF_NVFP4_INPUT = Field("input_scale", "input_global_scale", FP32, _scalar)
_HF_W4A8 = (_HF_INT4, _HF_GROUP_SCALES, Field("weight_scale_2", "level2_scale", FP32, _scalar), _HF_INPUT)

HF = (
    Codec("hf", "FP8", (FP8_TENSOR,), FP8_TENSOR, (_HF_E4M3, _HF_SCALE, _HF_INPUT)),
    Codec("hf", "FP8_PER_CHANNEL_PER_TOKEN", (FP8_CHANNEL,), FP8_TOKEN, (_HF_E4M3, _HF_ROW_SCALES)),
    Codec("hf", "fp8_pb_wo", (FP8_BLOCK128,), None,  # lower case, as ModelOpt 0.47 writes it
          (_HF_E4M3, Field("weight_scale", "scale", FP32, _modelopt_blocks))),
    Codec("hf", "W8A16", (INT8_CHANNEL,), None, (_HF_INT8, _HF_ROW_SCALES)),
    Codec("hf", "W8A8_SQ_PER_CHANNEL", (INT8_CHANNEL,), INT8_TENSOR, (_HF_INT8, _HF_ROW_SCALES, _HF_INPUT)),
    Codec("hf", "W4A16_AWQ", (INT4_G128,), None, (_HF_INT4, _HF_GROUP_SCALES), variant="awq", groups=True),
    Codec("hf", "W4A8_AWQ", (INT4_G128, FP8_TENSOR), FP8_TENSOR, _HF_W4A8, variant="awq", groups=True),
    Codec("hf", "NVFP4", (NVFP4,), NVFP4_DYNAMIC, (*_HF_NVFP4, _HF_NVFP4_INPUT), groups=True),
    Codec("hf", "NVFP4_AWQ", (NVFP4,), NVFP4_DYNAMIC, (*_HF_NVFP4, _HF_NVFP4_INPUT), variant="awq", groups=True),
    Codec("hf", "W4A16_NVFP4", (NVFP4,), None, _HF_NVFP4, groups=True),
    Codec("hf", "MXFP8", (MXFP8,), MXFP8_DYNAMIC, (_HF_E4M3, Field("weight_scale", "scale", E8M0_SCALES, _blocks)),
          groups=True),
)  # fmt: skip

# compressed-tensors (spec §6): scales in fp32 unless the format's own scale element; NVFP4 global scales
# stored as reciprocals (weight_global_scale = 1 / weight_scale_2)
_CT_PACKED = (
    Field("weight_scale", "scale", FP32, _groups_or_1),
    Field("weight_shape", "shape", INT64, lambda o, i, f: (2,)),
)
_CT_E4M3 = Field("weight", "values", E4M3_CODES, _weight)
_CT_INT8 = Field("weight", "values", INT8_CODES, _weight)
_CT_INPUT = Field("input_scale", "input_scale", FP32, _one)
_CT_FP4 = Field("weight_packed", "values", FP4_PAIRS, _half_cols)
_CT_NVFP4 = (
    _CT_FP4,
    Field("weight_scale", "scale", E4M3_SCALES, _blocks),
    Field("weight_global_scale", "global_scale", RECIPROCAL, _one),
)
_CT_NVFP4_INPUT = Field("input_global_scale", "input_global_scale", RECIPROCAL, _one)
_CT_MX_SCALES = Field("weight_scale", "scale", E8M0_SCALES, _blocks)
_CT_TENSOR_SCALE = Field("weight_scale", "scale", FP32, _one)
_CT_ROW_SCALES = Field("weight_scale", "scale", FP32, _rows_1)

CT = (
    Codec("compressed-tensors", "pack-quantized", (INT4_G128,), None,
          (Field("weight_packed", "values", _words(4), _words_shape(4)), *_CT_PACKED)),
    Codec("compressed-tensors", "pack-quantized", (INT4_CHANNEL,), None,
          (Field("weight_packed", "values", _words(4), _words_shape(4)), *_CT_PACKED)),
    Codec("compressed-tensors", "pack-quantized", (INT8_CHANNEL,), None,
          (Field("weight_packed", "values", _words(8), _words_shape(8)), *_CT_PACKED)),
    Codec("compressed-tensors", "int-quantized", (INT8_CHANNEL,), INT8_TENSOR, (_CT_INT8, _CT_ROW_SCALES, _CT_INPUT)),
    Codec("compressed-tensors", "int-quantized", (INT8_CHANNEL,), INT8_TOKEN, (_CT_INT8, _CT_ROW_SCALES)),
    Codec("compressed-tensors", "float-quantized", (FP8_TENSOR,), FP8_TENSOR, (_CT_E4M3, _CT_TENSOR_SCALE, _CT_INPUT)),
    Codec("compressed-tensors", "float-quantized", (FP8_TENSOR,), None, (_CT_E4M3, _CT_TENSOR_SCALE)),
    Codec("compressed-tensors", "float-quantized", (FP8_CHANNEL,), FP8_TOKEN, (_CT_E4M3, _CT_ROW_SCALES)),
    Codec("compressed-tensors", "float-quantized", (FP8_CHANNEL,), None, (_CT_E4M3, _CT_ROW_SCALES)),
    Codec("compressed-tensors", "float-quantized", (FP8_BLOCK128,), None,
          (_CT_E4M3, Field("weight_scale", "scale", FP32, _blocks))),
    Codec("compressed-tensors", "nvfp4-pack-quantized", (NVFP4,), NVFP4_DYNAMIC, (*_CT_NVFP4, _CT_NVFP4_INPUT)),
    Codec("compressed-tensors", "nvfp4-pack-quantized", (NVFP4,), None, _CT_NVFP4),
    Codec("compressed-tensors", "mxfp4-pack-quantized", (MXFP4,), MXFP4_DYNAMIC, (_CT_FP4, _CT_MX_SCALES)),
    Codec("compressed-tensors", "mxfp4-pack-quantized", (MXFP4,), None, (_CT_FP4, _CT_MX_SCALES)),
    Codec("compressed-tensors", "mxfp8-quantized", (MXFP8,), MXFP8_DYNAMIC, (_CT_E4M3, _CT_MX_SCALES)),
    Codec("compressed-tensors", "mxfp8-quantized", (MXFP8,), None, (_CT_E4M3, _CT_MX_SCALES)),
)  # fmt: skip

# TensorRT-LLM checkpoints (spec §7): per-tensor scales are fp32 [1]; the axes give the tensor-parallel split
_TRT_SCALE = Field("weights_scaling_factor", "scale", FP32, _one, NONE)
_TRT_ACT = Field("activation_scaling_factor", "input_scale", FP32, _one, NONE)
_TRT_ROW_SCALES = Field("weights_scaling_factor", "scale", FP32, _rows, OUT)
_TRT_INT8 = Field("weight", "values", INT8_CODES, _weight, IO)
_TRT_INT4 = (
    Field("weight", "values", INT4_ROW_PAIRS_INT8, _half_rows, IO),
    Field("weights_scaling_factor", "scale", FP32, _blocks, IO),
)

TRTLLM = (
    Codec("trtllm", "FP8", (FP8_TENSOR,), FP8_TENSOR,
          (Field("weight", "values", E4M3_CODES, _weight, IO), _TRT_SCALE, _TRT_ACT)),
    Codec("trtllm", "W8A16", (INT8_CHANNEL,), None, (_TRT_INT8, _TRT_ROW_SCALES)),
    Codec("trtllm", "W8A8_SQ_PER_CHANNEL", (INT8_CHANNEL,), INT8_TENSOR, (_TRT_INT8, _TRT_ROW_SCALES, _TRT_ACT)),
    Codec("trtllm", "W4A16_AWQ", (INT4_G128,), None, _TRT_INT4),
    Codec("trtllm", "W4A8_AWQ", (INT4_G128, FP8_TENSOR), FP8_TENSOR,
          (*_TRT_INT4, Field("weights_scaling_factor_2", "level2_scale", FP32, _one, NONE), _TRT_ACT)),
    Codec("trtllm", "NVFP4", (NVFP4,), NVFP4_DYNAMIC,
          (Field("weight", "values", FP4_PAIRS, _half_cols, IO),
           Field("weights_scaling_factor", "scale", E4M3_SCALES, _blocks, IO),
           Field("weights_scaling_factor_2", "global_scale", FP32, _one, NONE),
           Field("activation_scaling_factor", "input_global_scale", FP32, _one, NONE))),
)  # fmt: skip

ROWS: dict[str, tuple[Codec, ...]] = {"hf": HF, "compressed-tensors": CT, "trtllm": TRTLLM}


def codec_for(target: Target, scheme: Scheme, awq: bool = False) -> Codec | None:
    """The row of `target` storing `scheme` (its AWQ variant where the weights were AWQ-smoothed and the
    target names that apart), or None."""
    rows = [c for c in ROWS[target] if c.key == (scheme.weight, scheme.input)]
    preferred = [c for c in rows if (c.variant == "awq") == awq] or [c for c in rows if c.variant is None]
    return next(iter(preferred or rows), None)


def codec_named(target: Target, name: str, spec: QuantSpec | None = None) -> Codec | None:
    """The row of `target` called `name` (hf: the quant_algo; compressed-tensors: the format, with `spec` the
    config group's formats to tell its rows apart)."""
    for c in ROWS[target]:
        if c.name.lower() != name.lower():
            continue
        if spec is None or c.key == (Scheme.of(spec).weight, Scheme.of(spec).input):
            return c
    return None

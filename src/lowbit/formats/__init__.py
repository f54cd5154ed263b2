"""Element and scaled formats: pure quantize / dequantize and pack / unpack (no nn.Module)."""

from lowbit.formats.elements import E2M1, E4M3, E5M2, E8M0, INT4, INT8, decode, encode, round_to_grid
from lowbit.formats.packing import pack, unpack
from lowbit.formats.scaled import (
    FORMATS,
    QTensor,
    ScaledFormat,
    dequantize,
    fake_quant,
    quantize,
    reduce_amax,
    sqnr_db,
)

__all__ = [
    "E2M1", "E4M3", "E5M2", "E8M0", "FORMATS", "INT4", "INT8", "QTensor", "ScaledFormat", "decode",
    "dequantize", "encode", "fake_quant", "pack", "quantize", "reduce_amax", "round_to_grid", "sqnr_db",
    "unpack",
]  # fmt: skip

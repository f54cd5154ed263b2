"""Packing quantized tensors to storage and back, bit-exactly.

Canonical storage (what lowbit's own tools read): codes in the element's natural dtype, 4-bit codes two
per byte along the last dim (element 2j in the LOW nibble), scales as fp32, float8_e4m3fn or E8M0 uint8.
Exporters re-lay these codes with the helpers below (nibbles along another dim, int32 words).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.formats.elements import (
    FloatElement,
    IntElement,
    PowerOfTwoElement,
    decode,
    decode_e8m0,
    encode,
    encode_e8m0,
)
from lowbit.formats.scaled import QTensor, ScaledFormat


def pack_nibbles(codes: Tensor, dim: int = -1) -> Tensor:
    """Two 4-bit codes per uint8 along `dim`: element 2j in the low nibble, 2j+1 in the high nibble."""
    c = (codes.to(torch.int16) & 0xF).to(torch.uint8).movedim(dim, -1)
    if c.shape[-1] % 2:
        raise ValueError(f"cannot pack an odd number ({c.shape[-1]}) of 4-bit codes")
    packed = c[..., 0::2] | (c[..., 1::2] << 4)
    return packed.movedim(-1, dim)


def unpack_nibbles(packed: Tensor, dim: int = -1, signed: bool = False) -> Tensor:
    """Inverse of `pack_nibbles`; `signed` sign-extends the nibbles to int8 (two's complement)."""
    p = packed.movedim(dim, -1)
    lo, hi = p & 0xF, p >> 4
    codes = torch.stack((lo, hi), dim=-1).reshape(*p.shape[:-1], p.shape[-1] * 2)
    if signed:
        codes = (codes.to(torch.int16) ^ 0x8).sub(0x8).to(torch.int8)
    return codes.movedim(-1, dim)


def pack_int32(codes: Tensor, bits: int = 4) -> Tensor:
    """32 / bits codes per int32 along the last dim, element i at bits [bits*i, bits*(i+1)) (little-endian,
    compressed-tensors' pack_to_int32). Codes are taken modulo 2**bits; the last dim must fill whole words."""
    per = 32 // bits
    if 32 % bits or codes.shape[-1] % per:
        raise ValueError(f"cannot pack {codes.shape[-1]} codes of {bits} bits into whole int32 words")
    mask = (1 << bits) - 1
    c = (codes.to(torch.int64) & mask).reshape(*codes.shape[:-1], codes.shape[-1] // per, per)
    shifts = torch.arange(0, 32, bits, dtype=torch.int64, device=codes.device)
    word = (c << shifts).sum(-1)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def unpack_int32(words: Tensor, bits: int = 4) -> Tensor:
    """Inverse of `pack_int32`: codes 0 .. 2**bits - 1 as uint8."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int64, device=words.device)
    c = (words.to(torch.int64).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return c.reshape(*words.shape[:-1], words.shape[-1] * (32 // bits)).to(torch.uint8)


def pack_int32_nibbles(codes: Tensor) -> Tensor:
    """Eight 4-bit codes per int32 along the last dim, element i at bits 4i..4i+3 (compressed-tensors)."""
    return pack_int32(codes, 4)


def unpack_int32_nibbles(words: Tensor) -> Tensor:
    """Inverse of `pack_int32_nibbles`: uint8 codes 0..15."""
    return unpack_int32(words, 4)


def encode_scale(scale: Tensor, fmt: ScaledFormat) -> Tensor:
    if isinstance(fmt.scale_element, PowerOfTwoElement):
        return encode_e8m0(scale)
    if isinstance(fmt.scale_element, FloatElement):
        return encode(scale, fmt.scale_element)
    return scale.float()


def decode_scale(stored: Tensor, fmt: ScaledFormat) -> Tensor:
    if isinstance(fmt.scale_element, PowerOfTwoElement):
        return decode_e8m0(stored)
    if isinstance(fmt.scale_element, FloatElement):
        return decode(stored, fmt.scale_element)
    return stored.float()


def pack(q: QTensor) -> dict[str, Tensor]:
    """Storage tensors of q: codes, scale, and global_scale / zero_point where the format has them."""
    fmt = q.fmt
    codes = encode(q.values, fmt.element)
    if fmt.bits == 4:
        codes = pack_nibbles(codes)
    out = {"codes": codes, "scale": encode_scale(q.scale, fmt)}
    if q.global_scale is not None:
        out["global_scale"] = q.global_scale.float()
    if q.zero_point is not None:
        out["zero_point"] = encode(q.zero_point, fmt.element)
    return out


def unpack(stored: dict[str, Tensor], fmt: ScaledFormat) -> QTensor:
    """Inverse of `pack`."""
    codes = stored["codes"]
    if fmt.bits == 4:
        signed = isinstance(fmt.element, IntElement) and fmt.element.signed
        codes = unpack_nibbles(codes, signed=signed)
    zero = stored.get("zero_point")
    return QTensor(
        values=decode(codes, fmt.element),
        scale=decode_scale(stored["scale"], fmt),
        fmt=fmt,
        global_scale=stored.get("global_scale"),
        zero_point=None if zero is None else decode(zero, fmt.element),
    )


def packed_nbytes(stored: dict[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in stored.values())

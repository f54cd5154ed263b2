"""Element formats: the number grids that quantized values live on.

Every float element goes through one rounding routine parameterised by (ebits, mbits, max_norm), as in
microxcaling; integer elements round half to even and clamp. Codes are the bit patterns stored on disk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class IntElement:
    """Two's-complement (signed) or unsigned integers of `bits` bits."""

    name: str
    bits: int
    signed: bool = True

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def max(self) -> float:
        """Largest magnitude a symmetric scale maps amax to (127 for INT8, 7 for INT4)."""
        return float(self.qmax)


@dataclass(frozen=True)
class FloatElement:
    """A minifloat with `ebits` exponent and `mbits` mantissa bits, saturating at `max_norm` (no inf)."""

    name: str
    ebits: int
    mbits: int
    max_norm: float
    torch_dtype: torch.dtype | None = None

    @property
    def bits(self) -> int:
        return 1 + self.ebits + self.mbits

    @property
    def max(self) -> float:
        return self.max_norm

    @property
    def min_exp(self) -> int:
        """Exponent of the smallest normal number: 1 - bias."""
        return 2 - 2 ** (self.ebits - 1)

    @property
    def min_subnormal(self) -> float:
        """Smallest positive value (2**-9 for E4M3)."""
        return float(2.0 ** (self.min_exp - self.mbits))


@dataclass(frozen=True)
class PowerOfTwoElement:
    """E8M0: unsigned biased exponent, value 2**(code - 127); code 255 is NaN. Used for MX block scales."""

    name: str = "e8m0"
    bits: int = 8
    bias: int = 127


Element = IntElement | FloatElement

INT8 = IntElement("int8", 8)
INT4 = IntElement("int4", 4)
UINT4 = IntElement("uint4", 4, signed=False)
UINT8 = IntElement("uint8", 8, signed=False)
E4M3 = FloatElement("e4m3", 4, 3, torch.finfo(torch.float8_e4m3fn).max, torch.float8_e4m3fn)  # 448
E5M2 = FloatElement("e5m2", 5, 2, torch.finfo(torch.float8_e5m2).max, torch.float8_e5m2)  # 57344
E2M1 = FloatElement("e2m1", 2, 1, 6.0)
E8M0 = PowerOfTwoElement()

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # magnitude of code & 0x7


def round_to_grid(x: Tensor, element: Element, out: Tensor | None = None) -> Tensor:
    """Round float32 `x` to the nearest value of `element` (ties to even), saturating at its range.

    Minifloats take the step of x's binade from the exponent bits of x (`_round_minifloat`: integer ops
    and one division by a power of two, no float8 casts, which this CPU build of torch converts back to
    float32 element by element); `round_minifloat_reference` is the definition it is tested against, as
    is torch's float8 cast. `out` (x itself allowed: rounding in place, for a temporary x that needs no
    gradient) receives the result, saving a tensor of x's size.
    """
    if isinstance(element, IntElement):
        return torch.round(x, out=out).clamp_(element.qmin, element.qmax)
    if x.requires_grad and element.torch_dtype is not None:  # the cast passes gradients straight through
        assert out is None, "round_to_grid: no out= with autograd"
        return x.clamp(-element.max_norm, element.max_norm).to(element.torch_dtype).to(x.dtype)
    if x.dtype == torch.float32:
        return _round_minifloat(x, element, out)
    rounded = round_minifloat_reference(x, element)
    return rounded if out is None else out.copy_(rounded)


def _round_minifloat(x: Tensor, el: FloatElement, out: Tensor | None = None) -> Tensor:
    # The exponent field of x in place (bits 23..30, the sign masked off) is the float32 2**binade; floored at
    # the element's smallest normal binade and lowered by mbits it is the float32 step 2**(binade - mbits),
    # built in three integer ops. Infinities and NaN get a finite step, so that they saturate or stay NaN as in
    # the reference. `out` (x itself allowed) receives the result.
    step = x.view(torch.int32).bitwise_and(0x7F800000).clamp_(min=(el.min_exp + 127) << 23)
    step = step.sub_(el.mbits << 23).view(torch.float32)
    return torch.div(x, step, out=out).round_().mul_(step).clamp_(-el.max_norm, el.max_norm)


def round_minifloat_reference(x: Tensor, el: FloatElement) -> Tensor:
    """Reference rounding for any minifloat: the step of x's binade, round half to even, saturate."""
    # x = m * 2**exp with m in [0.5, 1): the binade of x is exp - 1, floored at the subnormal range.
    _, exp = torch.frexp(x)
    binade = (exp - 1).clamp_(min=el.min_exp)
    step = torch.exp2((binade - el.mbits).to(x.dtype))
    return (torch.round(x / step) * step).clamp_(-el.max_norm, el.max_norm)


def encode(values: Tensor, element: Element) -> Tensor:
    """Bit patterns of grid values: int8 for signed ints, uint8 for unsigned ints and FP4, fp8 dtypes."""
    if isinstance(element, IntElement):
        return values.to(torch.int8 if element.signed else torch.uint8)
    if element.torch_dtype is not None:
        return values.to(element.torch_dtype)
    if element is E2M1:
        mag = values.abs()
        index = _E2M1_INDEX_BY_DOUBLE.to(values.device)[(mag * 2).long()]
        sign = torch.signbit(values).to(torch.uint8) << 3
        return sign | index
    raise ValueError(f"no encoding for element {element.name}")


def decode(codes: Tensor, element: Element) -> Tensor:
    """Float32 values of bit patterns (inverse of `encode` on grid values)."""
    if isinstance(element, IntElement) or element.torch_dtype is not None:
        return codes.to(torch.float32)
    if element is E2M1:
        mag = torch.tensor(E2M1_VALUES, device=codes.device)[(codes & 0x7).long()]
        return torch.where((codes & 0x8).bool(), -mag, mag)
    raise ValueError(f"no decoding for element {element.name}")


def encode_e8m0(scale: Tensor) -> Tensor:
    """uint8 codes of power-of-two float32 scales: code = log2(scale) + 127."""
    _, exp = torch.frexp(scale)
    return (exp - 1 + E8M0.bias).clamp_(0, 254).to(torch.uint8)


def decode_e8m0(codes: Tensor) -> Tensor:
    """float32 2**(code - 127); code 255 is NaN."""
    value = torch.exp2(codes.to(torch.float32) - E8M0.bias)
    return torch.where(codes == 255, torch.full_like(value, float("nan")), value)


# (2 * |value|) -> index into E2M1_VALUES; only the 8 grid entries are ever looked up.
_E2M1_INDEX_BY_DOUBLE = torch.zeros(13, dtype=torch.uint8)
for _i, _v in enumerate(E2M1_VALUES):
    _E2M1_INDEX_BY_DOUBLE[int(_v * 2)] = _i

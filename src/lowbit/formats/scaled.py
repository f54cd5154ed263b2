"""Scaled formats: an element grid plus scales at a granularity (tensor, row, group, 2-D block).

A tensor is viewed as blocks `(..., n_blocks, block_size)`; one scale per block. The maths, with
`emax` the element's largest magnitude (127, 7, 448, 6):

- plain scale (INT, FP8):       s = amax_block / emax                       (fp32; 1 where amax is 0)
- NVFP4 (two levels):           g = amax_tensor / (6 * 448);  s = e4m3(clamp(amax_block / (6 * g), 2**-9, 448))
                                (0 -> 1)
- MX (power-of-two, E8M0):      s = 2 ** ceil(log2(amax_block / emax))
- asymmetric INT:               s = (max - min) / (2**bits - 1);  z = round(-min / s)
- quantize:                     q = round_to_grid(x / (s * g)) (+ z)
- dequantize:                   x_hat = (q - z) * (s * g)

`fake_quant(x) == dequantize(quantize(x))` by construction, and packing (see `packing.py`) is lossless on
grid values, so the fake-quantized model computes exactly what the packed checkpoint decodes to.

Gradients (quantization-aware training): rounding passes the gradient straight through where x / (s * g)
lies inside the element's range and blocks it where it saturates (`round_ste`), so d fake_quant / dx is 1
inside the clipping range and 0 outside. Scales taken from the tensor itself (dynamic blocks, a missing
global amax) are constants to autograd; a calibrated amax that requires grad gets the learned-step-size
gradient (round(u) - u inside the range, the saturated code outside) from the same expression.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from lowbit.formats.elements import (
    E2M1,
    E4M3,
    INT4,
    INT8,
    UINT4,
    Element,
    FloatElement,
    IntElement,
    PowerOfTwoElement,
    round_to_grid,
)
from lowbit.formats.scales import (  # noqa: F401 - the scale formulas, re-exported for their users
    NVFP4_GLOBAL_DIVISOR,
    Stats,
    asym_scale_zero,
    global_scale_from_amax,
    scale_from_amax,
    scales,
)

Granularity = Literal["tensor", "row", "group", "block"]


@dataclass(frozen=True)
class ScaledFormat:
    """A quantization format: element grid, scale granularity and scale encoding.

    granularity: "tensor" (one scale), "row" (one per output channel of a weight, or per token of an
    activation), "group" (`group_size` consecutive elements of the last dim), "block" (`block_shape`
    2-D tiles of a weight). `scale_element` None means fp32 scales. `global_scale` adds NVFP4's
    per-tensor second level. `dynamic` means block amaxes are taken from the tensor at run time
    (activations); the global amax of a two-level format is always calibrated.
    """

    name: str
    element: Element
    granularity: Granularity
    group_size: int | None = None
    block_shape: tuple[int, int] | None = None
    scale_element: FloatElement | PowerOfTwoElement | None = None
    global_scale: bool = False
    dynamic: bool = False
    symmetric: bool = True

    @property
    def bits(self) -> int:
        return self.element.bits

    @property
    def block_size(self) -> int | None:
        """Elements per scale along the last dim, where fixed (group formats)."""
        return self.group_size if self.granularity == "group" else None

    def bits_per_element(self, shape: tuple[int, ...]) -> float:
        """Storage bits per element including scales (not counting one-off per-tensor scalars)."""
        numel = 1
        for d in shape:
            numel *= d
        n_scales = scale_shape(shape, self).numel() if self.granularity != "tensor" else 0
        scale_bits = 8 if self.scale_element is not None else 32
        zero_bits = 0 if self.symmetric else self.bits
        return self.bits + n_scales * (scale_bits + zero_bits) / numel

    def replace(self, **changes: object) -> ScaledFormat:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


@dataclass
class QTensor:
    """Quantized tensor: grid values (float32, original shape), scales in block shape, optional extras."""

    values: Tensor
    scale: Tensor
    fmt: ScaledFormat
    global_scale: Tensor | None = None
    zero_point: Tensor | None = None


# --- block views ------------------------------------------------------------------------------------------


def check_shape(shape: tuple[int, ...], fmt: ScaledFormat) -> str | None:
    """Why `fmt` cannot quantize a tensor of `shape`, or None if it can."""
    if fmt.granularity == "group":
        assert fmt.group_size is not None
        if shape[-1] % fmt.group_size:
            return f"in_features={shape[-1]} is not divisible by group_size={fmt.group_size}"
    if fmt.granularity == "block" and len(shape) != 2:
        return f"{fmt.block_shape} blocks need a 2-D weight, got shape {tuple(shape)}"
    return None


def to_blocks(x: Tensor, fmt: ScaledFormat) -> Tensor:
    """View x as (..., n_blocks, block_size) for fmt's granularity."""
    if fmt.granularity == "tensor":
        return x.reshape(1, -1)
    if fmt.granularity == "row":
        return x.unsqueeze(-2)
    if fmt.granularity == "group":
        assert fmt.group_size is not None
        problem = check_shape(tuple(x.shape), fmt)
        if problem:
            raise ValueError(problem)
        return x.reshape(*x.shape[:-1], x.shape[-1] // fmt.group_size, fmt.group_size)
    assert fmt.block_shape is not None
    problem = check_shape(tuple(x.shape), fmt)
    if problem:
        raise ValueError(problem)
    (bm, bn), (n, k) = fmt.block_shape, x.shape
    nb, kb = -(-n // bm), -(-k // bn)  # partial edge tiles are zero-padded (compressed-tensors: ceil)
    x = torch.nn.functional.pad(x, (0, kb * bn - k, 0, nb * bm - n))
    return x.reshape(nb, bm, kb, bn).transpose(1, 2).reshape(nb, kb, bm * bn)


def from_blocks(xb: Tensor, fmt: ScaledFormat, shape: torch.Size) -> Tensor:
    """Inverse of `to_blocks`."""
    if fmt.granularity == "block":
        assert fmt.block_shape is not None
        (bm, bn), (n, k) = fmt.block_shape, shape
        nb, kb = -(-n // bm), -(-k // bn)
        return xb.reshape(nb, kb, bm, bn).transpose(1, 2).reshape(nb * bm, kb * bn)[:n, :k]
    return xb.reshape(shape)


def scale_shape(shape: tuple[int, ...] | torch.Size, fmt: ScaledFormat) -> torch.Size:
    """Shape of fmt's scale tensor for a tensor of `shape` (block dims, the block size dropped)."""
    if fmt.granularity == "tensor":
        return torch.Size([])
    if fmt.granularity == "row":
        return torch.Size([*shape[:-1], 1])
    if fmt.granularity == "group":
        assert fmt.group_size is not None
        return torch.Size([*shape[:-1], shape[-1] // fmt.group_size])
    assert fmt.block_shape is not None
    return torch.Size([-(-shape[0] // fmt.block_shape[0]), -(-shape[1] // fmt.block_shape[1])])


def reduce_amax(x: Tensor, fmt: ScaledFormat) -> Tensor:
    """max |x| per block, in scale shape (float32)."""
    return to_blocks(x.detach().float(), fmt).abs().amax(-1).reshape(scale_shape(x.shape, fmt))


def reduce_min_max(x: Tensor, fmt: ScaledFormat) -> tuple[Tensor, Tensor]:
    """(min, max) per block, in scale shape (float32), for asymmetric formats."""
    xb = to_blocks(x.detach().float(), fmt)
    shape = scale_shape(x.shape, fmt)
    return xb.amin(-1).reshape(shape), xb.amax(-1).reshape(shape)


# --- quantize / dequantize --------------------------------------------------------------------------------


class _RoundSTE(torch.autograd.Function):
    """round_to_grid in the forward; the straight-through gradient in the backward: passed where the input
    lies inside the element's range [lo, hi], zero where rounding saturates."""

    @staticmethod
    def forward(ctx: Any, u: Tensor, element: Element) -> Tensor:
        lo, hi = element_range(element)
        ctx.save_for_backward((u >= lo) & (u <= hi))
        return round_to_grid(u, element)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (inside,) = ctx.saved_tensors
        return grad * inside, None


def element_range(element: Element) -> tuple[float, float]:
    """The lowest and highest grid values of an element (the clipping range in units of the scale)."""
    if isinstance(element, IntElement):
        return float(element.qmin), float(element.qmax)
    return -element.max_norm, element.max_norm


def round_ste(u: Tensor, element: Element) -> Tensor:
    """round_to_grid, with a straight-through gradient when u requires grad (same values either way)."""
    if u.requires_grad:
        out: Tensor = _RoundSTE.apply(u, element)
        return out
    return round_to_grid(u, element)


def quantize(
    x: Tensor,
    fmt: ScaledFormat,
    amax: Tensor | None = None,
    global_amax: Tensor | None = None,
    amin: Tensor | None = None,
) -> QTensor:
    """Quantize x with fmt. amax (scale shape) defaults to the tensor's own block amax; global_amax
    (NVFP4) to its tensor amax; amin is the per-block minimum for asymmetric formats."""
    xf = x.float()
    xb = to_blocks(xf, fmt)
    sshape = scale_shape(x.shape, fmt)
    if fmt.global_scale and global_amax is None:
        global_amax = xf.detach().abs().amax()
    if not fmt.symmetric and (amax is None or amin is None):
        amin, amax = reduce_min_max(xf, fmt)
    elif fmt.symmetric:
        amax = reduce_amax(xf, fmt) if amax is None else amax.reshape(sshape)
    s = scales(fmt, Stats(amax, global_amax, amin))  # the one scale formula (formats.scales)
    scale, g, zero = s.scale, s.global_scale, s.zero_point
    assert scale is not None
    eff = _effective(scale, g).reshape(*sshape, 1) if fmt.granularity != "tensor" else _effective(scale, g)
    u = xb / eff if zero is None else (xb / eff).add_(zero.reshape(eff.shape))
    # u is this call's own tensor: rounded in place unless autograd needs it
    qb = round_ste(u, fmt.element) if u.requires_grad else round_to_grid(u, fmt.element, out=u)
    return QTensor(from_blocks(qb, fmt, x.shape), scale.reshape(sshape), fmt, g, zero)


def dequantize(q: QTensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """x_hat = (values - zero) * scale * global_scale, in `dtype`."""
    fmt = q.fmt
    qb = to_blocks(q.values, fmt)
    eff = _effective(q.scale, q.global_scale)
    if fmt.granularity != "tensor":
        eff = eff.reshape(*eff.shape, 1)
    if q.zero_point is not None:
        z = q.zero_point.reshape(eff.shape) if fmt.granularity != "tensor" else q.zero_point
        qb = qb - z
    return from_blocks(qb * eff, fmt, q.values.shape).to(dtype)


def fake_quant(
    x: Tensor,
    fmt: ScaledFormat,
    amax: Tensor | None = None,
    global_amax: Tensor | None = None,
    amin: Tensor | None = None,
) -> Tensor:
    """dequantize(quantize(x)) in x's dtype."""
    q = quantize(x, fmt, amax, global_amax, amin)
    if q.values.requires_grad or q.scale.requires_grad:
        return dequantize(q, x.dtype)
    # q.values is this call's own tensor: dequantized in place, as dequantize computes it
    qb = to_blocks(q.values, fmt)
    eff = _effective(q.scale, q.global_scale)
    if fmt.granularity != "tensor":
        eff = eff.reshape(*eff.shape, 1)
    if q.zero_point is not None:
        qb.sub_(q.zero_point.reshape(eff.shape) if fmt.granularity != "tensor" else q.zero_point)
    return from_blocks(qb.mul_(eff), fmt, x.shape).to(x.dtype)


@dataclass
class ScaleMap:
    """A format's scales expanded to every element of one tensor, for element-wise quantization of any slice
    of it (GPTQ quantizes a weight column by column with the scales of the whole weight)."""

    fmt: ScaledFormat
    scale: Tensor  # same shape as the tensor: s * g of each element's block
    zero: Tensor | None  # same shape; asymmetric formats only

    def fake_quant(self, x: Tensor, cols: slice | Tensor = slice(None)) -> Tensor:
        """fake_quant of x == tensor[:, cols] (float32) with the fixed scales of those columns."""
        s = self.scale[:, cols]
        z = self.zero[:, cols] if self.zero is not None else None
        u = x / s if z is None else (x / s).add_(z)
        if u.requires_grad:
            q = round_to_grid(u, self.fmt.element)
            return q * s if z is None else (q - z) * s
        # u is this call's own tensor: rounded and scaled back in place
        q = round_to_grid(u, self.fmt.element, out=u)
        return q.mul_(s) if z is None else q.sub_(z).mul_(s)


def scale_map(
    x: Tensor,
    fmt: ScaledFormat,
    amax: Tensor | None = None,
    global_amax: Tensor | None = None,
    amin: Tensor | None = None,
) -> ScaleMap:
    """The scales `quantize(x, fmt, amax, global_amax, amin)` uses, expanded to x's shape (2-D x)."""
    q = quantize(x, fmt, amax, global_amax, amin)
    eff = expand_to(_effective(q.scale, q.global_scale), fmt, x.shape)
    zero = expand_to(q.zero_point, fmt, x.shape).contiguous() if q.zero_point is not None else None
    return ScaleMap(fmt, eff.contiguous(), zero)


def expand_to(t: Tensor, fmt: ScaledFormat, shape: torch.Size) -> Tensor:
    """A tensor of fmt's scale shape for a tensor of `shape`, each block's value repeated over its elements
    (float32; differentiable)."""
    if fmt.granularity == "tensor":
        return t.float().expand(shape)
    blocks = to_blocks(torch.empty(shape, device="meta"), fmt).shape
    return from_blocks(t.reshape(*t.shape, 1).float().expand(blocks), fmt, shape)


def _effective(scale: Tensor, global_scale: Tensor | None) -> Tensor:
    return scale if global_scale is None else scale * global_scale


def sqnr_db(x: Tensor, x_hat: Tensor) -> float:
    """Signal-to-quantization-noise ratio 10 log10(|x|^2 / |x - x_hat|^2) in dB (inf when exact)."""
    x, x_hat = x.float(), x_hat.float()
    noise = (x - x_hat).pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(x.pow(2).sum() / noise))


# --- named formats ----------------------------------------------------------------------------------------

INT8_CHANNEL = ScaledFormat("int8_channel", INT8, "row")
INT8_TENSOR = ScaledFormat("int8_tensor", INT8, "tensor")
INT8_TOKEN = ScaledFormat("int8_token", INT8, "row", dynamic=True)
INT4_G128 = ScaledFormat("int4_g128", INT4, "group", group_size=128)
INT4_G64 = INT4_G128.replace(name="int4_g64", group_size=64)
INT4_G32 = INT4_G128.replace(name="int4_g32", group_size=32)
INT4_CHANNEL = ScaledFormat("int4_channel", INT4, "row")
INT4_G128_ASYM = ScaledFormat("int4_g128_asym", UINT4, "group", group_size=128, symmetric=False)
FP8_TENSOR = ScaledFormat("fp8_tensor", E4M3, "tensor")
FP8_CHANNEL = ScaledFormat("fp8_channel", E4M3, "row")
FP8_TOKEN = ScaledFormat("fp8_token", E4M3, "row", dynamic=True)
FP8_BLOCK128 = ScaledFormat("fp8_block128", E4M3, "block", block_shape=(128, 128))
NVFP4 = ScaledFormat("nvfp4", E2M1, "group", group_size=16, scale_element=E4M3, global_scale=True)
NVFP4_DYNAMIC = NVFP4.replace(name="nvfp4_dynamic", dynamic=True)
MXFP4 = ScaledFormat("mxfp4", E2M1, "group", group_size=32, scale_element=PowerOfTwoElement())
MXFP4_DYNAMIC = MXFP4.replace(name="mxfp4_dynamic", dynamic=True)
MXFP8 = ScaledFormat("mxfp8", E4M3, "group", group_size=32, scale_element=PowerOfTwoElement())
MXFP8_DYNAMIC = MXFP8.replace(name="mxfp8_dynamic", dynamic=True)

FORMATS: dict[str, ScaledFormat] = {
    f.name: f
    for f in (
        INT8_CHANNEL, INT8_TENSOR, INT8_TOKEN, INT4_G128, INT4_G64, INT4_G32, INT4_CHANNEL, INT4_G128_ASYM,
        FP8_TENSOR, FP8_CHANNEL, FP8_TOKEN, FP8_BLOCK128, NVFP4, NVFP4_DYNAMIC, MXFP4, MXFP4_DYNAMIC,
        MXFP8, MXFP8_DYNAMIC,
    )
}  # fmt: skip

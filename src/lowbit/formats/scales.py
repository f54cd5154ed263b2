"""Scales from statistics, and statistics from scales: the one place every scale of lowbit is computed.

A quantizer's calibrated statistics are a `Stats` value: per-block `amax` (in the format's scale shape),
the per-tensor `global_amax` of a two-level format (NVFP4), per-block `amin` of an asymmetric one.
`scales(fmt, stats)` gives the `Scales` that `formats.quantize` divides by; the fake quantizers, the
exporters (weight, input and KV cache scales), `lowbit inspect` and the scale searches all call it, so an
exported scale is bit for bit the one the checkpoint computes with. `stats_for(fmt, scales)` is its
inverse (reading an export back): statistics from which `scales` gives exactly the stored scales.

The formulas, with `emax` the element's largest magnitude (127, 7, 448, 6):

- plain scale (INT, FP8):   s = amax / emax                                     (fp32; 1 where amax is 0)
- NVFP4 (two levels):       g = amax_tensor / (6 * 448), raised by ulps until 1 / (1 / g) == g (0 -> 1);
                            s = e4m3(clamp(amax_block / (6 * g), 2**-9, 448))   (0 -> 1)
- MX (E8M0 block scales):   s = 2 ** ceil(log2(amax_block / emax))
- asymmetric INT:           s = (max - min) / (2**bits - 1);  z = round(-min / s)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lowbit.formats.elements import E2M1, E4M3, FloatElement, IntElement, PowerOfTwoElement, round_to_grid

if TYPE_CHECKING:
    from lowbit.formats.scaled import ScaledFormat

NVFP4_GLOBAL_DIVISOR = E2M1.max_norm * E4M3.max_norm  # 6 * 448, ModelOpt's weight_scale_2 divisor
STAT_NAMES = ("amax", "global_amax", "amin")


@dataclass(frozen=True)
class Stats:
    """Calibrated statistics of one quantized tensor (any of them may be missing)."""

    amax: Tensor | None = None  # per scale block (scale shape), or per tensor
    global_amax: Tensor | None = None  # two-level formats: max |x| of the whole tensor
    amin: Tensor | None = None  # asymmetric formats: per-block minimum

    @staticmethod
    def of(stats: Mapping[str, Tensor]) -> Stats:
        """From a {amax / global_amax / amin: tensor} mapping (a checkpoint's quantizer tensors)."""
        unknown = set(stats) - set(STAT_NAMES)
        if unknown:
            raise KeyError(f"unknown quantizer statistic {sorted(unknown)[0]!r}")
        return Stats(*(stats.get(n) for n in STAT_NAMES))

    def to_dict(self) -> dict[str, Tensor]:
        return {n: t for n in STAT_NAMES if (t := getattr(self, n)) is not None}

    def tensor_amax(self, fmt: ScaledFormat) -> Tensor | None:
        """The per-tensor statistic of `fmt`, if it has one: NVFP4's global amax, or the amax of a format with
        one scale per tensor."""
        if fmt.global_scale:
            return self.global_amax
        return self.amax if fmt.granularity == "tensor" else None

    def with_tensor_amax(self, fmt: ScaledFormat, value: Tensor) -> Stats:
        """A copy with the per-tensor statistic of `fmt` replaced (fused q/k/v, shared expert inputs)."""
        if fmt.global_scale:
            return Stats(self.amax, value, self.amin)
        assert fmt.granularity == "tensor", f"{fmt.name} has no per-tensor statistic"
        return Stats(value, self.global_amax, self.amin)


@dataclass(frozen=True)
class Scales:
    """What `quantize` divides by: per-block `scale` (scale shape; None for dynamic blocks not yet seen),
    NVFP4's per-tensor `global_scale`, an asymmetric format's `zero_point`."""

    scale: Tensor | None
    global_scale: Tensor | None = None
    zero_point: Tensor | None = None

    @property
    def effective(self) -> Tensor:
        """scale * global_scale: the step of each block's grid."""
        assert self.scale is not None
        return self.scale if self.global_scale is None else self.scale * self.global_scale

    @staticmethod
    def of_tensor_scale(fmt: ScaledFormat, scale: Tensor) -> Scales:
        """The Scales whose `tensor_scale` is `scale` (a stored per-tensor scale read back)."""
        return Scales(None, scale) if fmt.global_scale else Scales(scale)

    @property
    def tensor_scale(self) -> Tensor:
        """The per-tensor scale an engine reads (a static input's or KV cache's scale, NVFP4's global scale):
        global_scale for two-level formats, else the one scale."""
        t = self.global_scale if self.global_scale is not None else self.scale
        assert t is not None and t.numel() == 1, "not a per-tensor scale"
        return t.reshape(())


def scales(fmt: ScaledFormat, stats: Stats) -> Scales:
    """The scales of `fmt` from calibrated `stats` (module docstring). A dynamic format's blocks have no
    calibrated amax: its Scales then carry only the global scale."""
    g = None
    if fmt.global_scale:
        assert stats.global_amax is not None, f"{fmt.name} needs a global amax"
        g = global_scale_from_amax(stats.global_amax)
    if not fmt.symmetric:
        assert stats.amin is not None and stats.amax is not None, f"{fmt.name} needs amin and amax"
        s, z = asym_scale_zero(stats.amin, stats.amax, fmt)
        return Scales(s, g, z)
    if stats.amax is None:
        return Scales(None, g)
    return Scales(scale_from_amax(stats.amax, fmt, g), g)


def global_scale_from_amax(global_amax: Tensor) -> Tensor:
    """NVFP4 second-level scale: amax_tensor / (6 * 448) (fp32 scalar; 1 where amax is 0), raised by a few
    ulps where needed so that its fp32 reciprocal maps back to it exactly: compressed-tensors stores
    1 / scale, and a reader must recover the very scale lowbit computed with."""
    g = global_amax.float() / NVFP4_GLOBAL_DIVISOR
    g = torch.where(g > 0, g, torch.ones_like(g))
    for _ in range(16):
        off = (1 / (1 / g)) != g
        if not bool(off.any()):
            break
        g = torch.where(off, torch.nextafter(g, torch.full_like(g, float("inf"))), g)
    return g


def scale_from_amax(amax: Tensor, fmt: ScaledFormat, global_scale: Tensor | None = None) -> Tensor:
    """Per-block scales (float32 values already on the scale element's grid) from per-block amax."""
    amax = amax.float()
    emax = fmt.element.max
    if isinstance(fmt.scale_element, PowerOfTwoElement):
        # MX: smallest power of two that maps amax into range (no clipping), as ModelOpt does.
        ratio = torch.where(amax > 0, amax / emax, torch.ones_like(amax))
        exponent = torch.ceil(torch.log2(ratio)).clamp_(-127, 127)
        return torch.exp2(exponent)
    if fmt.global_scale:
        assert global_scale is not None, f"{fmt.name} needs a global scale"
        s = amax / (emax * global_scale)
    else:
        s = amax / emax
    if isinstance(fmt.scale_element, FloatElement):
        # a block whose scale would round to 0 keeps the smallest one instead (as ModelOpt does)
        el = fmt.scale_element
        s = torch.where(s > 0, round_to_grid(s.clamp(min=el.min_subnormal, max=el.max_norm), el), s)
    return torch.where(s > 0, s, torch.ones_like(s))


def asym_scale_zero(lo: Tensor, hi: Tensor, fmt: ScaledFormat) -> tuple[Tensor, Tensor]:
    """Asymmetric scale and zero point from per-block (min, max); the range always includes 0."""
    assert isinstance(fmt.element, IntElement)
    lo, hi = lo.float().clamp(max=0), hi.float().clamp(min=0)
    levels = fmt.element.qmax - fmt.element.qmin
    s = (hi - lo) / levels
    s = torch.where(s > 0, s, torch.ones_like(s))
    z = torch.round(-lo / s).clamp_(fmt.element.qmin, fmt.element.qmax)
    return s, z


# --- the inverse: statistics that reproduce stored scales -----------------------------------------------


def stats_for(fmt: ScaledFormat, stored: Scales) -> Stats:
    """Statistics from which `scales(fmt, ·)` computes exactly `stored` (symmetric formats): how a reader of an
    export gives its quantizers the scales the export holds."""
    g = None
    global_amax = None
    if fmt.global_scale:
        assert stored.global_scale is not None, f"{fmt.name} needs a global scale"
        global_amax = _global_amax_for(stored.global_scale.float().reshape(()))
        g = global_scale_from_amax(global_amax)
    if stored.scale is None:
        return Stats(None, global_amax)
    s = stored.scale.float()
    amax = s * fmt.element.max * (g if g is not None else 1.0)
    if fmt.scale_element is None:  # fp32 scales: a few ulps may separate (s * emax) / emax from s
        for _ in range(8):
            got = scale_from_amax(amax, fmt, g)
            if bool((got == s).all()):
                break
            amax = torch.where(got < s, torch.nextafter(amax, torch.full_like(amax, float("inf"))), amax)
            amax = torch.where(got > s, torch.nextafter(amax, torch.zeros_like(amax)), amax)
    return Stats(amax, global_amax)


def _global_amax_for(g: Tensor) -> Tensor:
    """An amax from which `global_scale_from_amax` computes exactly the stored global scale g."""
    amax = g * NVFP4_GLOBAL_DIVISOR
    for _ in range(64):
        got = global_scale_from_amax(amax)
        if bool(got == g):
            return amax
        amax = torch.nextafter(amax, torch.tensor(float("inf") if bool(got < g) else float("-inf")))
    return g * NVFP4_GLOBAL_DIVISOR  # not representable exactly: the nearest (a few ulps off)

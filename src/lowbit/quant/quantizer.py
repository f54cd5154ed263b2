"""Quantizer: observer + fake quantization for one tensor (a weight, a Linear's input, a K or V cache).

State is plain buffers, so a checkpoint is a safetensors state dict and statistics can be reduced across
processes: `amax` / `global_amax` reduce with MAX, `amin` with MIN (see `stat_reductions`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lowbit.formats.scaled import ScaledFormat, fake_quant, reduce_amax, reduce_min_max
from lowbit.formats.scales import STAT_NAMES, Stats

__all__ = ["STAT_NAMES", "Quantizer", "QuantizerChain", "stat_reductions"]
SAMPLES_PER_CALL = 4096  # |x| values kept per observed tensor when sampling (percentile / MSE amax)


class Quantizer(nn.Module):
    """Fake-quantizes its input with `fmt` using calibrated statistics.

    While `calibrating`, forward records statistics and returns the input unchanged. Static statistics:
    `amax` (per scale block, or per tensor) unless the format is dynamic; `global_amax` (per tensor) for
    two-level formats (NVFP4); `amin` for asymmetric formats. Dynamic block amaxes come from the input.
    """

    amax: Tensor | None
    global_amax: Tensor | None
    amin: Tensor | None

    def __init__(self, fmt: ScaledFormat) -> None:
        super().__init__()
        self.fmt = fmt
        self.calibrating = False
        self.recompute_blocks = False  # QAT: block amaxes from the input at each call (global amax kept)
        self.samples: list[Tensor] | None = None  # when a list: observe() also keeps a sample of |x|
        for name in STAT_NAMES:
            self.register_buffer(name, None)

    def extra_repr(self) -> str:
        return f"{self.fmt.name}{', calibrating' if self.calibrating else ''}"

    @property
    def needs_block_amax(self) -> bool:
        return not self.fmt.dynamic

    @property
    def is_calibrated(self) -> bool:
        if self.needs_block_amax and self.amax is None:
            return False
        return not (self.fmt.global_scale and self.global_amax is None)

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        """Fold x into the running statistics (max of amax, min of amin)."""
        if self.samples is not None:
            flat = x.detach().reshape(-1)
            step = max(1, flat.numel() // SAMPLES_PER_CALL)
            self.samples.append(flat[::step].abs().float().cpu())
        if self.fmt.global_scale:
            self.global_amax = _running(self.global_amax, x.detach().abs().amax().float(), torch.maximum)
        if not self.needs_block_amax:
            return
        if self.fmt.symmetric:
            self.amax = _running(self.amax, reduce_amax(x, self.fmt), torch.maximum)
        else:
            lo, hi = reduce_min_max(x, self.fmt)
            self.amin = _running(self.amin, lo, torch.minimum)
            self.amax = _running(self.amax, hi, torch.maximum)

    def forward(self, x: Tensor) -> Tensor:
        if self.calibrating:
            self.observe(x)
            return x
        if not self.is_calibrated:
            raise RuntimeError(f"quantizer ({self.fmt.name}) used before calibration")
        amax = self.amax if self.needs_block_amax and not self.recompute_blocks else None
        if amax is not None and amax.requires_grad:  # a learned step size stays positive
            amax = amax.clamp(min=torch.finfo(torch.float32).tiny)
        return fake_quant(x, self.fmt, amax=amax, global_amax=self.global_amax, amin=self.amin)

    def stats(self) -> dict[str, Tensor]:
        return {n: t for n in STAT_NAMES if (t := getattr(self, n)) is not None}

    def stat_values(self) -> Stats:
        """The statistics as one value (`formats.scales.scales(fmt, stats)` gives the scales they make)."""
        return Stats(self.amax, self.global_amax, self.amin)

    def load_stats(self, stats: dict[str, Tensor]) -> None:
        for name, value in stats.items():
            if name not in STAT_NAMES:
                raise KeyError(f"unknown quantizer statistic {name!r}")
            setattr(self, name, value.float())


def _running(old: Tensor | None, new: Tensor, op: object) -> Tensor:
    return new.clone() if old is None else op(old, new)  # type: ignore[operator]


def stat_reductions() -> dict[str, str]:
    """How each statistic combines across data shards: the torch.distributed ReduceOp name."""
    return {"amax": "MAX", "global_amax": "MAX", "amin": "MIN"}


class QuantizerChain(nn.Sequential):
    """Quantizers applied one after the other (W4A8: INT4 groups, then FP8 per tensor)."""

    def __init__(self, fmts: tuple[ScaledFormat, ...]) -> None:
        super().__init__(*(Quantizer(f) for f in fmts))

    @property
    def fmts(self) -> tuple[ScaledFormat, ...]:
        return tuple(q.fmt for q in self.quantizers())

    def quantizers(self) -> list[Quantizer]:
        return [q for q in self if isinstance(q, Quantizer)]

"""QuantLinear: nn.Linear with fake-quantized input and weight."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbit.formats.scaled import ScaledFormat
from lowbit.quant.quantizer import Quantizer, QuantizerChain


@dataclass(frozen=True)
class QuantSpec:
    """What one Linear gets: a chain of weight formats (usually one) and an input format (or None)."""

    weight: tuple[ScaledFormat, ...]
    input: ScaledFormat | None = None

    def describe(self) -> str:
        w = "+".join(f.name for f in self.weight) or "-"
        return f"W:{w} A:{self.input.name if self.input else '-'}"


class QuantLinear(nn.Linear):
    """A Linear whose weight and input pass through quantizers. Shares the wrapped Linear's parameters.

    State dict keys beside `weight`/`bias`: `weight_quantizer.{i}.{amax,global_amax,amin}` and
    `input_quantizer.{amax,global_amax}`. The fake-quantized weight is cached until the weight changes.
    """

    _qweight: Tensor | None

    def __init__(self, linear: nn.Linear, spec: QuantSpec) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.spec = spec
        self.training = linear.training  # a model in eval mode stays so (its weights quantized once, cached)
        self.weight_quantizer = QuantizerChain(spec.weight)
        self.input_quantizer = Quantizer(spec.input) if spec.input is not None else None
        # The fake-quantized weight, a non-persistent buffer so that .to() moves or frees it with the layer.
        self.register_buffer("_qweight", None, persistent=False)
        self._qweight_key: tuple[int, int] | None = None
        self.calibrating = False  # while True: observe inputs, compute with the float weight
        self.observe_input = True  # False: the caller derives the input statistics from its own (calibrate.py)
        self.baked = False  # True once the weight holds its own fake-quantized values (see bake)
        # the weight before GPTQ replaced it, while the rest of its layer is calibrated: calibrating forwards
        # (the float model's reference passes) compute with it
        self.float_weight: Tensor | None = None

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.spec.describe()}"

    @torch.no_grad()
    def calibrate_weight(self) -> None:
        """Max calibration of the weight chain: each quantizer observes what the previous one outputs."""
        w = self.weight.detach()
        for q in self.weight_quantizer.quantizers():
            q.amax = q.global_amax = q.amin = None
            q.observe(w)
            w = q(w)
        self._qweight = None

    @torch.no_grad()
    def bake(self) -> None:
        """Overwrite the weight with its fake-quantized values and skip the weight quantizer from then on.

        For forward-only use once the float weight is saved elsewhere (the layer-by-layer driver): the
        layer then holds one copy of its weights instead of the float weight plus a cached quantized one.
        """
        self.weight.data = self.weight_quantizer(self.weight).to(self.weight.dtype)
        self._qweight = None
        self.baked = True

    def quantized_weight(self) -> Tensor:
        if self.baked:
            return self.weight
        if self.training or (torch.is_grad_enabled() and self.weight.requires_grad):
            return self.weight_quantizer(self.weight)
        key = (self.weight._version, self.weight.data_ptr())
        if self._qweight is None or self._qweight_key != key or self._qweight.device != self.weight.device:
            with torch.no_grad():
                self._qweight = self.weight_quantizer(self.weight)
            self._qweight_key = key
        assert self._qweight is not None
        return self._qweight

    def forward(self, x: Tensor) -> Tensor:
        if self.calibrating:
            if self.input_quantizer is not None and self.observe_input:
                self.input_quantizer.observe(x)
            return F.linear(x, self.weight if self.float_weight is None else self.float_weight, self.bias)
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return F.linear(x, self.quantized_weight(), self.bias)

    def quantizers(self) -> list[Quantizer]:
        qs = self.weight_quantizer.quantizers()
        return qs + ([self.input_quantizer] if self.input_quantizer is not None else [])

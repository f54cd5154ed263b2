"""The calibration inputs of the decoder layer being calibrated, and what the passes over them keep.

The layer-by-layer driver owns one `LayerInputs` for the whole run: per batch the hidden states of the
quantized model (the layer's inputs), the float model's hidden states of the same batches where GPTAQ keeps
them (`reference`), each layer's keyword arguments (Family.per_layer_kwargs) and what the model adds to the
hidden states after some layers (Qwen3-VL's deepstack features). `run` is calibrate_layer's forward loop
(passes.ForwardLoop); `advance` replaces the inputs by the layer's outputs for the next layer.

What the statistics pass keeps is set per layer (`keep`): not sequential, the float layer's outputs become
the next layer's inputs, each batch's output replacing its input at once ("in_place", one copy of the
activations) or, where a later pass reads the inputs again, beside them until the layer is done ("beside");
with GPTAQ the outputs of the reference forwards become the next layer's float activations.

These are this process's batches: `reducer` is where data-parallel calibration will combine the statistics
they give with other processes' (passes.Reducer).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lowbit.algorithms.calibrate import StageInputsSeen, reference_pass, stopping_after
from lowbit.algorithms.passes import LocalReducer, Pass, Reducer
from lowbit.errors import LowbitError
from lowbit.models.loading import reused_heap
from lowbit.models.vision import Deepstack

Keep = Literal["in_place", "beside"]


@dataclass
class LayerInputs:
    """Per batch: the inputs of the layer being calibrated and what its passes keep (module docstring)."""

    hidden: list[Tensor]  # the quantized model's hidden states (the layer's inputs)
    kwargs: list[dict[str, Any]]  # the keyword arguments the model passes this layer (masks, rotary, ...)
    reference: list[Tensor] | None = None  # GPTAQ: the float model's hidden states of the same tokens
    per_layer: list[list[dict[str, Any]]] | None = None  # per layer, per batch (Family.per_layer_kwargs)
    injections: list[Deepstack | None] = field(default_factory=list)  # per batch (Qwen3-VL's deepstack)
    # the context of every forward of a layer (autocast to calib_dtype), not of the algorithms' arithmetic
    forwards: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext
    reducer: Reducer = field(default_factory=LocalReducer)
    # what the statistics pass of the layer now calibrating keeps (`keep`), and what it kept
    keep_outputs: Keep | None = None
    keep_reference: bool = False
    outputs: list[Tensor] | None = None  # the statistics pass's outputs ("beside"; [] once "in_place" ran)
    reference_outputs: list[Tensor] = field(default_factory=list)

    def for_layer(self, i: int) -> None:
        """Layer i's inputs: its own keyword arguments (hybrid and sliding-window models), nothing kept yet."""
        if self.per_layer is not None and self.hidden:
            self.kwargs = list(self.per_layer[i])
        self.keep(None, reference=False)

    def keep(self, outputs: Keep | None, reference: bool) -> None:
        """What the next statistics pass keeps: the float outputs (`outputs`), the reference forwards' ones."""
        self.keep_outputs, self.keep_reference = outputs, reference
        self.outputs, self.reference_outputs = None, []

    @torch.no_grad()
    def run(self, layer: nn.Module, pass_: Pass) -> None:
        """calibrate_layer's forward loop: `layer` over every batch (GPTAQ: its float activations first, as
        `pass_` asks); the statistics pass keeps what `keep` asked for."""
        keep = self.keep_outputs if pass_.statistics else None
        pair = self.reference if pass_.reference else None
        keep_reference = pass_.statistics and pair is not None and self.keep_reference
        if pass_.stop_after is not None and (keep is not None or keep_reference):
            raise AssertionError("a pass that keeps the layer's outputs runs every forward to the end")
        outputs: list[Tensor] = []
        with reused_heap(), stopping_after(pass_.stop_after):
            for j, hidden in enumerate(self.hidden):
                if pair is not None:
                    with reference_pass(layer, pass_.context):
                        ref = self._forward(layer, pair[j], j)
                    if keep_reference:
                        self.reference_outputs.append(_hidden_of(ref).to(hidden.dtype))
                out = self._forward(layer, hidden, j)
                if keep == "in_place":
                    self.hidden[j] = _hidden_of(out).to(hidden.dtype)
                elif keep == "beside":
                    outputs.append(_hidden_of(out).to(hidden.dtype))
        if keep is not None:
            self.outputs = outputs

    def _forward(self, layer: nn.Module, hidden: Tensor, j: int) -> Any:
        try:
            with self.forwards():
                return layer(hidden, **self.kwargs[j])
        except StageInputsSeen:  # a stage pass needs nothing after the stage's last module
            return None

    @torch.no_grad()
    def advance(self, layer: nn.Module) -> None:
        """Replace each batch's hidden states by the layer's output on them."""
        with reused_heap():
            for j, hidden in enumerate(self.hidden):
                with self.forwards():
                    out = layer(hidden, **self.kwargs[j])
                self.hidden[j] = _hidden_of(out).to(hidden.dtype)

    def advance_to_kept(self) -> bool:
        """The statistics pass's float outputs as the next layer's inputs; False if it kept none."""
        if self.outputs is None:
            return False
        if self.keep_outputs == "beside":
            self.hidden[:] = self.outputs
        self.outputs = None
        return True

    def advance_reference(self, i: int) -> None:
        """GPTAQ: the float layer i's outputs of the reference forwards as the next layer's float activations."""
        if self.reference is None:
            return
        if len(self.reference_outputs) != len(self.reference):
            raise AssertionError("the statistics pass did not run every batch's reference forward")
        self.reference[:] = self.reference_outputs
        self.reference_outputs = []
        _inject(self.reference, self.injections, i)

    def inject(self, i: int) -> None:
        """Add what the model adds to the hidden states after layer i (Qwen3-VL's deepstack visual features)."""
        _inject(self.hidden, self.injections, i)

    def check_finite(self, prefix: str) -> None:
        for hidden in self.hidden:
            # a NaN or Inf makes the sum non-finite; only then (or on an overflowing sum) look element by element
            if not torch.isfinite(hidden.sum()) and not torch.isfinite(hidden).all():
                raise LowbitError(
                    f"{prefix}: NaN or Inf in its inputs during calibration; the model overflows "
                    "in this dtype or its weights are damaged: check the checkpoint"
                )


def _hidden_of(out: Any) -> Tensor:
    """A decoder layer's hidden states out of what it returns (a tensor, or a tuple starting with one)."""
    return out[0] if isinstance(out, tuple) else out


def _inject(hidden: list[Tensor], injections: list[Deepstack | None], i: int) -> None:
    for j, injection in enumerate(injections):
        if injection is not None:
            hidden[j] = injection.apply(hidden[j], i)

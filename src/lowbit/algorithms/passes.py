"""What `calibrate_layer` asks of whoever owns the calibration data: passes over it, and reductions.

A pass is one run of the layer over every calibration batch (`ForwardLoop(layer, Pass)`), its hooks reading
the pass's own `CalibrationContext`. The owner of the data is the layer-by-layer driver (`LayerInputs`, which
also keeps what a pass's outputs give the next layer) or, for the whole-model API, the caller's loop.

Statistics gathered in a pass are over this process's batches. `Reducer` is the one point where they are
combined with other processes' before anything reads them: data-parallel calibration (each process running
its shard of the batches) puts torch.distributed all-reduces there: InputStats' sums with SUM and amax with
MAX (`InputStats.REDUCTIONS`), quantizer statistics as `quant.quantizer.stat_reductions()` says (amax and
global_amax MAX, amin MIN; percentile's samples gathered). One process has nothing to combine:
`LocalReducer`, which calibration calls after every pass that gathers statistics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from torch import nn

from lowbit.algorithms.stats import CalibrationContext, InputStats
from lowbit.quant.quantizer import Quantizer


@dataclass(frozen=True)
class Pass:
    """One pass over the layer's calibration inputs, as calibrate_layer asks it."""

    context: CalibrationContext = field(default_factory=CalibrationContext)  # what its hooks read
    # the statistics pass (the first over these inputs): the owner of the inputs may keep the layer's outputs
    # of it (the float layer's, for a next layer calibrated on the float model's activations)
    statistics: bool = False
    # run each batch of the float model's activations first where the loop has them (GPTAQ's reference
    # forwards, under `context.reference_inputs()`: calibrate.reference_pass)
    reference: bool = False
    # the pass needs only the inputs of the modules up to this one: each forward may end after it
    # (calibrate.stopping_after)
    stop_after: nn.Module | None = None


class ForwardLoop(Protocol):
    """Runs `layer` over every calibration batch (set up for the pass by calibrate_layer) as `pass_` asks."""

    def __call__(self, layer: nn.Module, pass_: Pass, /) -> None: ...


class Reducer(Protocol):
    """Makes the statistics of one pass (each Linear's InputStats, the quantizers that observed) those of
    every process's batches, in place; see the module docstring."""

    def reduce(self, stats: Mapping[str, InputStats], quantizers: Sequence[Quantizer]) -> None: ...


class LocalReducer:
    """One process: its batches are all the batches, nothing to combine."""

    def reduce(self, stats: Mapping[str, InputStats], quantizers: Sequence[Quantizer]) -> None:
        return None

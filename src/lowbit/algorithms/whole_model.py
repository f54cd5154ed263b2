"""`quantize(model, recipe, forward_loop)`: the in-memory API (the caller owns the data)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from lowbit.algorithms.calibrate import LayerInfo, calibrate_layer
from lowbit.algorithms.passes import ForwardLoop, Pass
from lowbit.models.conv1d import linearize
from lowbit.models.families import whole_model_family
from lowbit.models.moe import unfuse_known
from lowbit.quant.convert import convert
from lowbit.quant.kv import use_kv_attention
from lowbit.quant.linear import QuantSpec
from lowbit.quant.recipe import Recipe


def quantize(
    model: nn.Module, recipe: Recipe, forward_loop: Callable[[nn.Module], None] | None = None
) -> dict[str, QuantSpec]:
    """Fake-quantize `model` in place following `recipe`; `forward_loop(model)` runs the calibration data.

    Runs the recipe's algorithm on the whole model at once (every layer sees the float model's activations).
    Returns the spec given to each quantized module. For models larger than memory, and for calibration of
    each layer on the quantized layers before it, use `lowbit.algorithms.layerwise.quantize_checkpoint`.
    """
    unfuse_known(model)  # MoE experts: one Linear per projection, or they would stay unquantized
    linearize(model)  # GPT-2's Conv1D layers
    specs = convert(model, recipe)
    config: Any = getattr(model, "config", None)
    if recipe.kv_cache is not None:
        use_kv_attention(model)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    info = LayerInfo("", whole_model_family(model), getattr(text, "num_attention_heads", None),
                     getattr(text, "num_key_value_heads", None))  # fmt: skip
    loop = None if forward_loop is None else _passes_of(forward_loop)
    calibrate_layer(model, info, recipe.algorithm, recipe.params, loop)
    return specs


def _passes_of(forward_loop: Callable[[nn.Module], None]) -> ForwardLoop:
    """The caller's loop as calibration's forward loop: whole-model calibration has no float model's
    activations to run first (`Pass.reference`), keeps no outputs, and a stage pass runs the caller's forwards
    to the end (`Pass.stop_after` is a permission, not a must)."""

    def loop(model: nn.Module, pass_: Pass) -> None:
        forward_loop(model)

    return loop

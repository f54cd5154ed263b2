"""`quantize(model, recipe, forward_loop)`: the in-memory API (the caller owns the data)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from torch import nn

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
    from lowbit.algorithms.calibrate import LayerInfo, calibrate_layer
    from lowbit.models.conv1d import linearize
    from lowbit.models.moe import unfuse_known

    unfuse_known(model)  # MoE experts: one Linear per projection, or they would stay unquantized
    linearize(model)  # GPT-2's Conv1D layers
    specs = convert(model, recipe)
    config: Any = getattr(model, "config", None)
    if recipe.kv_cache is not None:
        use_kv_attention(config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    info = LayerInfo("", whole_model_family(model), getattr(text, "num_attention_heads", None),
                     getattr(text, "num_key_value_heads", None))  # fmt: skip
    loop = None if forward_loop is None else _passes_of(forward_loop)
    calibrate_layer(model, info, recipe.algorithm, recipe.params, loop)
    return specs


def _passes_of(forward_loop: Callable[[nn.Module], None]) -> Callable[..., None]:
    """The user's loop as calibration's pass loop: whole-model calibration has no float model's activations
    to run again, and a stage pass runs the user's forwards to the end."""

    def loop(model: nn.Module, reference_again: bool = False, stop_after: nn.Module | None = None) -> None:
        forward_loop(model)

    return loop


def whole_model_family(model: nn.Module) -> Any:
    """The model's family facts with per-layer names made full names (model.layers.3.input_layernorm)."""
    from lowbit.errors import LowbitError
    from lowbit.models.families import family

    config = getattr(model, "config", None)
    try:
        fam = family(getattr(config, "model_type", ""))
    except LowbitError:
        return None
    layers = model.get_submodule(fam.layers)
    n = len(layers)  # type: ignore[arg-type]
    smooth = tuple(
        dataclasses.replace(s, prev=f"{fam.layers}.{i}.{s.prev}",
                            linears=tuple(f"{fam.layers}.{i}.{x}" for x in s.linears),
                            also=tuple(f"{fam.layers}.{i}.{x}" for x in s.also))
        for i in range(n) for s in fam.smooth
    )  # fmt: skip

    def per_layer(groups: tuple[tuple[str, ...], ...]) -> tuple[tuple[str, ...], ...]:
        return tuple(tuple(f"{fam.layers}.{i}.{x}" for x in group) for i in range(n) for group in groups)

    no_clip = tuple(f"{fam.layers}.{i}.{x}" for i in range(n) for x in fam.no_clip)
    return dataclasses.replace(fam, smooth=smooth, no_clip=no_clip, fused=per_layer(fam.fused),
                               shared_inputs=per_layer(fam.shared_inputs))  # fmt: skip

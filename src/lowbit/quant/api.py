"""`quantize(model, recipe, forward_loop)`: the in-memory API (the caller owns the data)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from lowbit.quant.convert import calibrate_max, convert
from lowbit.quant.kv import use_kv_attention
from lowbit.quant.linear import QuantSpec
from lowbit.quant.recipe import Recipe, algorithm_to_run


def quantize(
    model: nn.Module, recipe: Recipe, forward_loop: Callable[[nn.Module], None] | None = None
) -> dict[str, QuantSpec]:
    """Fake-quantize `model` in place following `recipe`; `forward_loop(model)` runs the calibration data.

    Returns the spec given to each quantized module. For models larger than memory use
    `lowbit.pipeline.quantize_checkpoint`, which does the same layer by layer from the safetensors files.
    """
    specs = convert(model, recipe)
    if recipe.kv_cache is not None:
        use_kv_attention(model.config)  # type: ignore[arg-type]
    algorithm = algorithm_to_run(recipe.algorithm)
    calibrate_max(model, forward_loop if algorithm != "none" or recipe.kv_cache else None)
    return specs

"""Quantizer modules, QuantLinear, recipes (presets) and the in-memory quantize() API."""

from lowbit.quant.api import quantize
from lowbit.quant.linear import QuantLinear, QuantSpec
from lowbit.quant.quantizer import Quantizer
from lowbit.quant.recipe import PRESETS, Recipe, Rule, load_recipe, preset

__all__ = [
    "PRESETS",
    "QuantLinear",
    "QuantSpec",
    "Quantizer",
    "Recipe",
    "Rule",
    "load_recipe",
    "preset",
    "quantize",
]

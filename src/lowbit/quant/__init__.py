"""Quantizer modules, QuantLinear, recipes (presets) and the algorithms' steps (the in-memory quantize() API
is `lowbit.quantize`, from lowbit.algorithms.whole_model).

The names below load their modules (and torch) on first use, so that `lowbit.quant.steps`, which the
command line's parser reads, stays light.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "QuantLinear": "lowbit.quant.linear",
    "QuantSpec": "lowbit.quant.linear",
    "Quantizer": "lowbit.quant.quantizer",
    "PRESETS": "lowbit.quant.recipe",
    "Recipe": "lowbit.quant.recipe",
    "Rule": "lowbit.quant.recipe",
    "load_recipe": "lowbit.quant.recipe",
    "preset": "lowbit.quant.recipe",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'lowbit.quant' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)


__all__ = sorted(_LAZY)

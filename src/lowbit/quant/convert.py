"""Turning a float model (or one decoder layer) into a fake-quantized one, and calibrating it."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.formats.scaled import check_shape
from lowbit.quant.kv import is_attention
from lowbit.quant.linear import QuantLinear, QuantSpec
from lowbit.quant.quantizer import Quantizer
from lowbit.quant.recipe import Recipe

KV_QUANTIZERS = ("k_quantizer", "v_quantizer")


def join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _divisor_hint(k: int) -> str:
    ok = [g for g in (128, 64, 32, 16) if k % g == 0]
    return f" or use group_size {ok[0]}" if ok else ""


def plan(root: nn.Module, recipe: Recipe, prefix: str = "") -> dict[str, QuantSpec]:
    """{full name: spec} of the Linears `recipe` quantizes under `root`, every shape checked (works on the
    meta device, so a whole model is validated before any work)."""
    specs: dict[str, QuantSpec] = {}
    for name, module in root.named_modules():
        full = join(prefix, name)
        if not isinstance(module, nn.Linear) or isinstance(module, QuantLinear):
            continue
        spec = recipe.resolve(full)
        if spec is None:
            continue
        for fmt in spec.weight:
            problem = check_shape(tuple(module.weight.shape), fmt)
            if problem:
                raise LowbitError(
                    f"{full}: {problem} ({fmt.name}); add --exclude '{full}'{_divisor_hint(module.weight.shape[-1])}"
                )
        specs[full] = spec
    return specs


def convert(root: nn.Module, recipe: Recipe, prefix: str = "") -> dict[str, QuantSpec]:
    """Replace each nn.Linear that `recipe` assigns a spec with a QuantLinear (sharing its parameters), and
    give attention modules K/V quantizers when the recipe quantizes the KV cache. `prefix` is root's name in
    the full model, so rules match full names. Returns {full module name: spec}."""
    specs = plan(root, recipe, prefix)
    for full in specs:
        name = full[len(prefix) + 1 :] if prefix else full
        linear = root.get_submodule(name)
        assert isinstance(linear, nn.Linear)
        _set_submodule(root, name, QuantLinear(linear, specs[full]))
    if recipe.kv_cache is not None:
        for module in root.modules():
            if is_attention(module) and not hasattr(module, "k_quantizer"):
                for attr in KV_QUANTIZERS:
                    module.add_module(attr, Quantizer(recipe.kv_cache))
    return specs


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def quant_linears(root: nn.Module, prefix: str = "") -> Iterator[tuple[str, QuantLinear]]:
    for name, m in root.named_modules():
        if isinstance(m, QuantLinear):
            yield join(prefix, name), m


def all_quantizers(root: nn.Module, prefix: str = "") -> Iterator[tuple[str, Quantizer]]:
    for name, m in root.named_modules():
        if isinstance(m, Quantizer):
            yield join(prefix, name), m


def set_calibrating(root: nn.Module, flag: bool) -> None:
    """Observe activations (inputs of QuantLinears, K/V) instead of quantizing them."""
    for name, m in root.named_modules():
        if isinstance(m, QuantLinear) or (
            isinstance(m, Quantizer) and name.rpartition(".")[2] in KV_QUANTIZERS
        ):
            m.calibrating = flag


@torch.no_grad()
def calibrate_max(
    root: nn.Module, forward_loop: Callable[[nn.Module], None] | None, prefix: str = ""
) -> None:
    """Max calibration: weight amax from the weights, activation amax from `forward_loop(root)`."""
    for _, linear in quant_linears(root):
        linear.calibrate_weight()
    if forward_loop is not None:
        set_calibrating(root, True)
        try:
            forward_loop(root)
        finally:
            set_calibrating(root, False)
    check_calibrated(root, prefix)


def check_calibrated(root: nn.Module, prefix: str = "") -> None:
    """Every static statistic is present and finite, or a LowbitError names the module."""
    for name, q in all_quantizers(root, prefix):
        if not q.is_calibrated:
            raise LowbitError(f"{name}: saw no calibration data; check that the calibration set reaches it")
        for stat, value in q.stats().items():
            if not torch.isfinite(value).all():
                kind = "weights" if ".weight_quantizer" in name else "activations"
                raise LowbitError(
                    f"{name}.{stat}: NaN or Inf in the {kind}; check the checkpoint and calibration data "
                    f"(or --exclude '{name.rsplit('.', 2)[0]}')"
                )

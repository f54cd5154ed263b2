"""GPT-2-style Conv1D layers as Linears.

transformers' `Conv1D` (GPT-2, OpenAI GPT) computes `x @ W + b` with W stored (in, out): a Linear whose weight
is transposed. lowbit quantizes Linears, whose formats block the input axis of an (out, in) weight, so a
Conv1D becomes an `nn.Linear` holding W^T while lowbit works on it, and its weight is transposed back wherever
it is stored in the original layout: the lowbit checkpoint keeps the checkpoint's (in, out) tensors, so the
model loads as it did. Exported quantized weights are (out, in), as every quantized format stores them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def conv1d_names(model: nn.Module) -> set[str]:
    """Names of the Conv1D modules of `model` (works on the meta device)."""
    return {name for name, m in model.named_modules() if is_conv1d(m)}


def linearize(model: nn.Module, names: set[str] | None = None) -> set[str]:
    """Replace the Conv1D modules of `model` (all, or those in `names`) with Linears computing the same,
    the weight transposed (on the meta device: the structure only). Returns the names replaced."""
    done: set[str] = set()
    for name, module in list(model.named_modules()):
        if not is_conv1d(module) or (names is not None and name not in names):
            continue
        weight: Tensor = module.weight
        with torch.device(weight.device):
            linear = nn.Linear(module.nx, module.nf, bias=module.bias is not None, dtype=weight.dtype)
        if weight.device.type != "meta":
            with torch.no_grad():
                linear.weight.copy_(weight.t())
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, linear)
        done.add(name)
    return done


def transposed(tensors: dict[str, Tensor], modules: set[str]) -> dict[str, Tensor]:
    """`tensors` (by full name) with the weights of the Conv1D `modules` transposed, from one layout to the
    other."""
    out = {}
    for key, t in tensors.items():
        module, _, suffix = key.rpartition(".")
        if suffix == "weight" and module in modules and t.dim() == 2:
            t = t.t().contiguous()
        out[key] = t
    return out

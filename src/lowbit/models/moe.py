"""Mixture-of-experts blocks as one Linear per expert projection.

transformers 5 computes a MoE block's experts from two fused 3-D parameters (`gate_up_proj` (E, 2I, H), the
gate rows first, and `down_proj` (E, H, I)), while checkpoints store every expert's projections as separate
2-D tensors (`experts.3.w1.weight`, or `gate_proj` / `up_proj` / `down_proj`). lowbit replaces the fused
module with `ExpertList`: a ModuleList of `Expert`s whose Linears carry the checkpoint's names. Every expert
projection is then an ordinary Linear to quantize, calibrate, export and read back, and the tensors of the
checkpoint load one by one; a model already loaded with fused tensors is split into the same modules.

Calibration (`calibrating = True`): every expert runs on every token, so each expert's statistics come from
the whole calibration set, while the block's output stays the routed combination (the next layers see what
the model computes). With a `weight_floor` (calibration's default, `AlgorithmParams.moe_weighting`) the
statistics hooks weight each token by its routing weight to the expert squared, plus the floor (through
the pass's `TokenWeights`, which `set_calibrating` hands to the ExpertLists); without one every token counts
alike. `routed` counts the tokens the router actually sent to each expert; an expert with none is reported
(its statistics are then every token's at the floor's equal weight, never missing).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lowbit.models.families import Family, MoE, find_family


class Expert(nn.Module):
    """One expert: down(act(gate(x)) * up(x)), or down(act(up(x))) without a gate (Nemotron-H), its Linears
    named as the checkpoint names them."""

    def __init__(self, moe: MoE, hidden: int, inter: int, act: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.gate, self.up, self.down = moe.gate, moe.up, moe.down
        self.act = act
        shapes = {moe.up: (inter, hidden), moe.down: (hidden, inter)}
        if moe.gate is not None:
            shapes = {moe.gate: (inter, hidden), **shapes}
        for name, (n_out, n_in) in shapes.items():
            self.add_module(name, nn.Linear(n_in, n_out, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        h = getattr(self, self.up)(x)
        h = self.act(getattr(self, self.gate)(x)) * h if self.gate is not None else self.act(h)
        return getattr(self, self.down)(h)


@dataclass
class TokenWeights:
    """The weight of each token of the expert now running in a calibration pass (its rows' weight in the
    input statistics): `current`, None outside an expert or with uniform weighting. One per pass
    (`stats.CalibrationContext`): the ExpertLists set it, that pass's statistics hooks read it."""

    current: Tensor | None = None

    @contextlib.contextmanager
    def weighting(self, w: Tensor | None) -> Iterator[None]:
        self.current = w
        try:
            yield
        finally:
            self.current = None


class ExpertList(nn.ModuleList):
    """The experts of one MoE block, called as transformers' fused experts module is:
    `experts(hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k)) -> (T, H)`.

    `weight_floor` (None: uniform) weights each token's rows in an expert's statistics by what the expert's
    output error costs the block's output: its routing weight squared where the router sent it there, plus
    for every token `weight_floor` times the batch's mean routing weight squared (so that near misses, and
    the tokens of an expert the router never chose, still count, alike for any top-k and normalization)."""

    def __init__(self, experts: list[Expert]) -> None:
        super().__init__(experts)
        self.calibrating = False
        self.weight_floor: float | None = None
        self.token_weights: TokenWeights | None = None  # where the calibration pass reads the token weights
        self.routed = [0] * len(experts)  # tokens routed to each expert during calibration

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        out = torch.zeros_like(hidden_states)  # the input's dtype, as Mixtral's and Qwen3-MoE's experts return
        if self.calibrating and self.weight_floor is not None:  # relative to the mean routed weight squared
            floor = self.weight_floor * float(top_k_weights.float().square().mean())
        for e, expert in enumerate(self):
            token_idx, pos = torch.where(top_k_index == e)
            if self.calibrating:
                self.routed[e] += int(token_idx.numel())
                w = None
                if self.weight_floor is not None:
                    w = hidden_states.new_zeros(hidden_states.shape[0], dtype=torch.float32)
                    w[token_idx] = top_k_weights[token_idx, pos].float().square()
                    w += floor
                with self._weighting(w):  # statistics from every token, output from the routed
                    y = expert(hidden_states)[token_idx]
            elif token_idx.numel():
                y = expert(hidden_states[token_idx])
            else:
                continue
            out.index_add_(0, token_idx, (y * top_k_weights[token_idx, pos, None]).to(out.dtype))
        return out

    def _weighting(self, w: Tensor | None) -> contextlib.AbstractContextManager[None]:
        return self.token_weights.weighting(w) if self.token_weights is not None else contextlib.nullcontext()


def expert_lists(root: nn.Module) -> list[tuple[str, ExpertList]]:
    return [(name, m) for name, m in root.named_modules() if isinstance(m, ExpertList)]


def set_calibrating(
    root: nn.Module, flag: bool, weight_floor: float | None = None, token_weights: TokenWeights | None = None
) -> None:
    """Route every token through every expert (statistics) while the output stays routed; zero the counts
    when calibration starts. `weight_floor`: see ExpertList; `token_weights`: where the pass's statistics
    hooks read each expert's token weights (None: nothing reads them)."""
    for _, m in expert_lists(root):
        if flag and not m.calibrating:
            m.routed = [0] * len(m)
        m.calibrating = flag
        m.weight_floor = weight_floor if flag else None
        m.token_weights = token_weights if flag else None


def unfuse_experts(model: nn.Module, family: Family) -> int:
    """Replace every fused experts module (3-D `gate_up_proj` / `down_proj`) under `model` with an
    ExpertList; on a materialized model the fused tensors are split into the experts' weights. Returns the
    number of blocks replaced. Works on the meta device too."""
    moe = family.moe
    if moe is None:
        return 0
    count = 0
    for name, module in list(model.named_modules()):
        if not name.endswith(moe.experts) or not _is_fused(module, moe):
            continue
        gate_up: Tensor = module.gate_up_proj if moe.gate is not None else module.up_proj
        down: Tensor = module.down_proj
        n, rows, hidden = gate_up.shape
        inter = rows // 2 if moe.gate is not None else rows
        act = module.act_fn
        with torch.device(gate_up.device):
            experts = ExpertList([Expert(moe, hidden, inter, act) for _ in range(n)])
        experts.to(gate_up.dtype)
        if gate_up.device.type != "meta":
            with torch.no_grad():
                for e, expert in enumerate(experts):
                    if moe.gate is not None:  # gate rows first, then up
                        getattr(expert, moe.gate).weight.copy_(gate_up[e, :inter])
                    getattr(expert, moe.up).weight.copy_(gate_up[e, -inter:])
                    getattr(expert, moe.down).weight.copy_(down[e])
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, experts)
        count += 1
    return count


def unfuse_known(model: nn.Module) -> int:
    """unfuse_experts with the facts of the model's own family (none for unknown architectures)."""
    fam = find_family(str(getattr(getattr(model, "config", None), "model_type", "")))
    return unfuse_experts(model, fam) if fam is not None else 0


def _is_fused(module: nn.Module, moe: MoE) -> bool:
    first = "gate_up_proj" if moe.gate is not None else "up_proj"
    gate_up, down = getattr(module, first, None), getattr(module, "down_proj", None)
    return (
        isinstance(gate_up, Tensor) and isinstance(down, Tensor) and gate_up.dim() == 3 and down.dim() == 3
        and hasattr(module, "act_fn") and not getattr(module, "has_bias", False)
    )  # fmt: skip


def routed_report(root: nn.Module, prefix: str = "") -> dict[str, Any]:
    """{experts module name: [tokens routed to each expert]} of the last calibration pass."""
    return {
        f"{prefix}.{name}" if prefix else name: list(m.routed) for name, m in expert_lists(root)
    }

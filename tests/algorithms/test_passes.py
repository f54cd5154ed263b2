"""Passes over a layer's inputs: the hooks' context is the pass's own, and every statistics pass reduces."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from lowbit.algorithms.calibrate import LayerInfo, calibrate_layer
from lowbit.algorithms.layer_inputs import LayerInputs
from lowbit.algorithms.layerwise import _capture_inputs
from lowbit.algorithms.passes import LocalReducer, Pass
from lowbit.algorithms.stats import CalibrationContext, InputStats, collect_inputs
from lowbit.models import moe
from lowbit.models.families import find_family
from lowbit.quant.convert import convert
from lowbit.quant.kv import use_kv_attention
from lowbit.quant.linear import QuantLinear
from lowbit.quant.quantizer import Quantizer
from lowbit.quant.recipe import preset


class RecordingReducer(LocalReducer):
    def __init__(self) -> None:
        self.calls: list[tuple[list[str], int]] = []

    def reduce(self, stats: Mapping[str, InputStats], quantizers: Sequence[Quantizer]) -> None:
        self.calls.append((sorted(stats), len(quantizers)))


def _layer_and_inputs(path, calib_ids, model_type: str, recipe, reference: bool = False):
    """Layer 0 of the float model, converted, and its captured inputs (4 batches)."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    moe.unfuse_known(model)
    if recipe.kv_cache is not None:
        use_kv_attention(model)
    batches = [{"input_ids": b} for b in calib_ids[:8].split(2)]
    states, _ = _capture_inputs(model, model.model.layers, batches, torch.device("cpu"), False)
    hidden = [h for h, _ in states]
    inputs = LayerInputs(hidden, [kw for _, kw in states])
    if reference:  # the float model's activations: other tensors of the same shapes
        inputs.reference = [h + 0.1 * torch.randn_like(h) for h in hidden]
    info = LayerInfo("model.layers.0", find_family(model_type), model.config.num_attention_heads,
                     model.config.num_key_value_heads)  # fmt: skip
    layer = model.model.layers[0]
    convert(layer, recipe, "model.layers.0")
    return layer, inputs, info


def _counted(inputs: LayerInputs, passes: list[Pass]):
    def loop(layer: nn.Module, pass_: Pass) -> None:
        passes.append(pass_)
        inputs.run(layer, pass_)

    return loop


def test_two_collect_inputs_contexts_do_not_see_each_others_reference_or_token_weights():
    torch.manual_seed(0)
    lin = nn.Linear(8, 4, bias=False)
    x_f, x_q = torch.randn(16, 8), torch.randn(16, 8)
    a, b = CalibrationContext(), CalibrationContext()
    with (
        collect_inputs({"lin": lin}, None, context=a) as sa,
        collect_inputs({"lin": lin}, None, context=b) as sb,
    ):
        with a.reference_inputs():
            lin(x_f)  # a reference forward for a, an ordinary one for b
        with b.token_weights.weighting(torch.full((16,), 2.0)):
            lin(x_q)  # weighted rows for b only
    assert sa["lin"].n == 16 and sa["lin"].n_cross == 16 and sa["lin"].mass == 16
    torch.testing.assert_close(sa["lin"].cross, (x_f - x_q).t() @ x_q / 16)
    assert sb["lin"].n == 32 and sb["lin"].cross is None and sb["lin"].mass == 16 + 32


def _class_state() -> dict[type, dict[str, int]]:
    """Every attribute of every class lowbit defines, by identity."""
    classes = [
        obj for name, module in list(sys.modules.items()) if name.startswith("lowbit")
        for obj in vars(module).values() if isinstance(obj, type) and obj.__module__ == name
    ]  # fmt: skip
    return {cls: {k: id(v) for k, v in vars(cls).items()} for cls in classes}


def test_a_gptaq_pass_over_a_moe_layer_sets_nothing_on_a_class(tiny_factory, calib_ids):
    """GPTAQ's reference forwards and the routed token weights reach the hooks through the pass's context:
    no class changes while the hooks run (every Linear's forward, reference and routed expert ones too) or
    after, no ExpertList keeps a context, and each pass has its own."""
    recipe = preset("int4_awq").with_algorithm("gptaq")
    path = tiny_factory("qwen3_moe", 1)
    layer, inputs, info = _layer_and_inputs(path, calib_ids, "qwen3_moe", recipe, reference=True)
    inputs.keep(None, reference=True)
    before = _class_state()
    same: list[bool] = []
    for _, m in layer.named_modules():
        if isinstance(m, QuantLinear):
            m.register_forward_pre_hook(lambda *_: same.append(_class_state() == before))
    passes: list[Pass] = []
    report = calibrate_layer(layer, info, recipe.steps, recipe.params, _counted(inputs, passes))
    assert same and all(same) and _class_state() == before
    assert not hasattr(moe, "_TokenWeights") and not hasattr(moe, "token_weights")
    experts = [m for _, m in moe.expert_lists(layer)]
    assert experts and all(m.token_weights is None and not m.calibrating for m in experts)
    assert (
        passes[0].statistics and passes[0].reference and len({id(p.context) for p in passes}) == len(passes)
    )
    assert all(not p.context.reference and p.context.token_weights.current is None for p in passes)
    assert any(".experts.0." in name and "after" in e for name, e in report.items())
    assert len(inputs.reference_outputs) == len(inputs.hidden)  # kept for the next layer's float activations


def test_the_reducer_is_called_once_per_statistics_pass(tiny_llama, calib_ids):
    """Every pass that gathers statistics (the statistics pass, SmoothQuant's second pass for a smoothed V
    feeding a quantized KV cache, each later stage of true-sequential GPTQ) hands them to the reducer once."""
    cases = [
        (preset("fp8"), "max", {}, 1),
        (preset("int8_sq").with_kv_cache("fp8"), "smoothquant", {}, 2),
        (preset("int4_awq"), "gptq", {"true_sequential": True}, 4),  # q/k/v, o, gate/up, down
    ]
    for recipe, algorithm, params, expected in cases:
        recipe = recipe.with_algorithm(algorithm).with_params(**params)
        layer, inputs, info = _layer_and_inputs(tiny_llama, calib_ids, "llama", recipe)
        passes: list[Pass] = []
        reducer = RecordingReducer()
        calibrate_layer(layer, info, recipe.steps, recipe.params, _counted(inputs, passes), reducer)
        assert len(passes) == len(reducer.calls) == expected, algorithm
        first, _ = reducer.calls[0]
        assert set(first) == {n for n, m in layer.named_modules() if isinstance(m, QuantLinear)}
        if algorithm == "smoothquant":
            assert reducer.calls[1][0] == [] and reducer.calls[1][1] > 0  # the activation quantizers
        if algorithm == "gptq":
            assert [len(names) for names, _ in reducer.calls[1:]] == [1, 2, 1]

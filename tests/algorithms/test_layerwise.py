"""The layer-by-layer driver: same result as in-memory quantization, calibration on quantized outputs."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lowbit.algorithms.layerwise import matmul_dtype, quantize_checkpoint
from lowbit.algorithms.whole_model import quantize
from lowbit.errors import LowbitError
from lowbit.loader import load_model
from lowbit.quant import preset


@pytest.mark.parametrize("name", ["int4_awq", "nvfp4_wo", "fp8_pb_wo", "mxfp4"])
def test_layerwise_equals_in_memory_for_data_free_formats(tiny_llama, calib_ids, tmp_path, name):
    recipe = preset(name).with_algorithm("max" if name != "mxfp4" else "none")
    out = quantize_checkpoint(tiny_llama, recipe, tmp_path / name, calib_ids, progress=False)
    layerwise, _ = load_model(out.output)
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    quantize(reference, recipe, lambda m: m(calib_ids))
    ids = calib_ids[:2]
    with torch.no_grad():
        assert torch.equal(layerwise(ids).logits, reference(ids).logits)


@pytest.mark.parametrize(("sequential", "manifest_says"), [(True, True), (None, False), (False, False)])
def test_each_layer_is_calibrated_on_the_previous_quantized_outputs_when_sequential(
    tiny_llama, calib_ids, tmp_path, sequential, manifest_says
):
    """Sequential: layer 1's input amax is the max over what the quantized layer 0 produced; not sequential
    (the default for max): over the float model's layer-1 inputs."""
    recipe = preset("fp8").with_params(calib_dtype="float32", sequential=sequential)  # fp32: amax reproduced
    out = quantize_checkpoint(tiny_llama, recipe, tmp_path / "fp8", calib_ids, batch_size=4, progress=False)
    model, manifest = load_model(out.output)
    assert manifest["algorithm"] == "max" and manifest["calibration_sequential"] is manifest_says
    seen: list[torch.Tensor] = []
    q_proj = model.model.layers[1].self_attn.q_proj
    handle = q_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0].abs().amax()))
    with torch.no_grad():
        for batch in calib_ids.split(4):
            model(batch)
    handle.remove()
    float_model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    float_seen: list[torch.Tensor] = []
    float_model.model.layers[1].self_attn.q_proj.register_forward_pre_hook(
        lambda m, args: float_seen.append(args[0].abs().amax())
    )
    with torch.no_grad():
        float_model(calib_ids)
    quantized_max, float_max = torch.stack(seen).max(), torch.stack(float_seen).max()
    assert not torch.allclose(quantized_max, float_max, rtol=1e-6)
    expected = quantized_max if manifest_says else float_max
    assert torch.allclose(q_proj.input_quantizer.amax, expected, rtol=1e-5)


@pytest.mark.parametrize(
    ("algorithm", "explicit", "expected"),
    [("max", None, False), ("smoothquant", None, False), ("none", None, False), ("percentile", None, False),
     ("gptq", None, True), ("awq_full+gptq", None, True), ("awq_lite", None, True), ("smoothquant+gptq", None, True),
     ("gptaq", None, True), ("max", True, True), ("gptq", False, False)],
)  # fmt: skip
def test_sequential_by_default_where_a_step_fits_weights_to_the_inputs(algorithm, explicit, expected):
    from lowbit.quant.steps import Algorithm

    params = preset("fp8").with_params(sequential=explicit).params
    assert Algorithm.parse(algorithm).sequential(params) is expected


def test_kv_cache_quantization_applies_after_rope_and_works_with_generate(tiny_llama, calib_ids, tmp_path):
    out = quantize_checkpoint(
        tiny_llama, preset("fp8").with_kv_cache("fp8"), tmp_path / "kv", calib_ids, progress=False
    )
    model, _ = load_model(out.output)
    attn = model.model.layers[0].self_attn
    assert attn.k_quantizer.amax.numel() == 1 and attn.v_quantizer.amax > 0
    ids = calib_ids[:1, :12]
    with torch.no_grad():
        full = model(ids).logits[0, -1]
        past = model(ids[:, :-1], use_cache=True).past_key_values
        step = model(ids[:, -1:], past_key_values=past, use_cache=True).logits[0, -1]
    assert torch.allclose(full, step, atol=1e-4)
    attn.k_quantizer.amax = attn.k_quantizer.amax / 64  # the quantizer really sits in the attention path
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits[0, -1], full, atol=1e-3)


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen3"])
def test_families_quantize_layerwise(tiny_factory, calib_ids, tmp_path, model_type):
    path: Path = tiny_factory(model_type, 2)
    out = quantize_checkpoint(path, preset("nvfp4"), tmp_path / model_type, calib_ids, progress=False)
    model, manifest = load_model(out.output)
    assert len(manifest["modules"]) == 14
    with torch.no_grad():
        assert torch.isfinite(model(calib_ids[:2]).logits).all()


def test_tied_embeddings_are_stored_once_and_tied_on_load(tiny_factory, calib_ids, tmp_path):
    from safetensors.torch import load_file

    path = tiny_factory("qwen3", 1, tie_word_embeddings=True)
    out = quantize_checkpoint(path, preset("fp8"), tmp_path / "tied", calib_ids, progress=False).output
    assert "lm_head.weight" not in load_file(str(out / "model-shell.safetensors"))
    model, _ = load_model(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_bf16_calibration_forwards_match_fp32_ones_closely(tiny_llama, calib_ids, tmp_path):
    """calib_dtype "auto" on a BF16 checkpoint runs the layers' products in bf16 (autocast); the statistics it
    gathers are those of fp32 forwards to bf16 precision, and weights stay exactly what fp32 makes of them."""
    amaxes, weights = [], []
    for dtype in ("float32", "bfloat16"):
        recipe = preset("fp8").with_params(calib_dtype=dtype)
        out = quantize_checkpoint(tiny_llama, recipe, tmp_path / dtype, calib_ids, batch_size=4, progress=False)
        model, manifest = load_model(out.output)
        assert manifest["calibration_matmul_dtype"] == dtype
        layer = model.model.layers[1]
        pair = [layer.self_attn.q_proj.input_quantizer.amax, layer.mlp.down_proj.input_quantizer.amax]
        amaxes.append(torch.stack(pair))
        weights.append(model.model.layers[0].mlp.gate_proj.weight)
    assert not torch.equal(amaxes[0], amaxes[1])  # the bf16 products did run
    assert torch.allclose(amaxes[0], amaxes[1], rtol=0.03)
    assert torch.equal(weights[0], weights[1])  # max weight scales need no forward pass


@pytest.mark.parametrize(
    ("choice", "stored", "expected"),
    [("float32", torch.bfloat16, None), ("bfloat16", torch.float32, torch.bfloat16),
     ("auto", torch.float32, None), ("auto", torch.float16, None)],
)  # fmt: skip
def test_calibration_matmul_dtype(choice, stored, expected):
    assert matmul_dtype(choice, stored, torch.device("cpu")) == expected


def test_calib_dtype_must_be_known():
    expected = r"unknown calib_dtype 'bf16' \(did you mean 'bfloat16'\?\); use one of auto, float32, bfloat16"
    with pytest.raises(LowbitError, match=expected):
        preset("fp8").with_params(calib_dtype="bf16")
    with pytest.raises(LowbitError, match=r"gptq_rounds 0: use 1 or more"):
        preset("int4_awq").with_params(gptq_rounds=0)
    with pytest.raises(LowbitError, match=r"unknown moe_weighting 'route' \(did you mean 'routed'\?\)"):
        preset("int4_awq").with_params(moe_weighting="route")
    with pytest.raises(LowbitError, match=r"moe_weight_floor 0: use a positive number"):
        preset("int4_awq").with_params(moe_weight_floor=0)


def test_gptq_stores_refitted_group_scales(tiny_llama, calib_ids, tmp_path):
    """After GPTQ each row's INT4 group scales are refitted to its codes: they differ from the max scales of
    the float weight (which GPTQ's static groups start from), and the stored weight lies on them."""
    from lowbit.formats.scaled import fake_quant, reduce_amax

    out = quantize_checkpoint(
        tiny_llama, preset("int4_awq").with_algorithm("gptq"), tmp_path / "q", calib_ids, batch_size=4,
        progress=False,
    )  # fmt: skip
    model, _ = load_model(out.output)
    original = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    lin = model.model.layers[1].mlp.down_proj
    quantizer = lin.weight_quantizer.quantizers()[0]
    max_amax = reduce_amax(original.model.layers[1].mlp.down_proj.weight, quantizer.fmt)
    refitted = ~torch.isclose(quantizer.amax, max_amax, rtol=1e-6).all(-1)
    assert refitted.float().mean() > 0.5  # most rows took the least-squares fit
    w = lin.weight_quantizer(lin.weight.float())
    assert torch.equal(fake_quant(w, quantizer.fmt, amax=quantizer.amax), w)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="glibc / Linux page-fault counters")
def test_calibration_batches_reuse_their_temporaries_instead_of_faulting_fresh_pages():
    import resource

    from lowbit.models.loading import bound_heap, reused_heap

    def faults_of_batches(n: int = 16) -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(n):
            t = torch.ones(1 << 20)  # a 4 MB temporary, written once, as a batch's activations are
            del t
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    bound_heap()  # the layer-by-layer driver's setting: blocks of 1 MB and more are mapped per use
    outside = faults_of_batches()
    with reused_heap():
        inside = faults_of_batches()
    assert outside > 16 * 500  # each 4 MB block faults its pages in again
    assert inside < outside / 4


def test_non_finite_calibration_activations_are_refused_and_large_finite_ones_are_not():
    from lowbit.algorithms.layer_inputs import LayerInputs

    big = torch.full((2, 8, 4), 3e38)  # finite, but their sum overflows to inf
    LayerInputs([big, torch.randn(2, 8, 4)], [{}, {}]).check_finite("model.layers.0")
    for bad in (float("nan"), float("inf"), -float("inf")):
        h = torch.randn(2, 8, 4)
        h[1, 3, 2] = bad
        with pytest.raises(LowbitError, match="NaN or Inf"):
            LayerInputs([torch.randn(2, 8, 4), h], [{}, {}]).check_finite("model.layers.3")


@pytest.mark.parametrize(
    ("name", "algorithm", "kv", "expected"),
    [("fp8", "max", None, False), ("int8_sq", "smoothquant", None, False), ("int8_sq", "smoothquant", "fp8", True),
     ("int4_awq", "awq_full+gptq", None, False), ("nvfp4", "max", "fp8", False),
     ("int4_awq", "gptq:true_sequential", None, True), ("int4_awq", "gptaq:sequential=False", None, False)],
)  # fmt: skip
def test_a_second_pass_over_the_inputs_is_foreseen(tiny_llama, name, algorithm, kv, expected):
    """A smoothed V feeding a quantized KV cache takes a second pass over the layer's inputs, as true-sequential
    GPTQ's stage passes do: only then must a non-sequential run keep the inputs beside the float outputs
    (non-sequential GPTAQ has no float inputs to be true-sequential with)."""
    from lowbit.algorithms.calibrate import LayerInfo, reads_inputs_again
    from lowbit.models.families import find_family
    from lowbit.quant.convert import convert

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    algorithm, _, option = algorithm.partition(":")
    recipe = preset(name).with_algorithm(algorithm)
    if option:
        key, _, value = option.partition("=")
        recipe = recipe.with_params(**{key: value != "False"})
    recipe = recipe.with_kv_cache(kv) if kv else recipe
    layer = model.model.layers[0]
    convert(layer, recipe, "model.layers.0")
    info = LayerInfo("model.layers.0", find_family("llama"), 4, 2)
    assert reads_inputs_again(layer, info, algorithm, recipe.params) is expected


@pytest.mark.parametrize("kv", [None, "fp8"])
def test_float_outputs_replace_the_inputs_in_place_where_no_second_pass_reads_them(
    tiny_llama, calib_ids, tmp_path, monkeypatch, kv
):
    """Not sequential, each batch's float output replaces its input during the statistics pass (one copy of
    the activations) unless a second pass is foreseen. Without a KV cache that gives the statistics of keeping
    both copies; with one (SmoothQuant's second pass for the smoothed V) replacing them would change them."""
    from safetensors.torch import load_file

    from lowbit.algorithms import layerwise

    recipe = preset("int8_sq").with_kv_cache(kv) if kv else preset("int8_sq")
    runs = {}
    for forced in (None, not kv):  # the foreseen choice, then the other one
        if forced is not None:
            monkeypatch.setattr(layerwise, "reads_inputs_again", lambda *args, keep=forced: keep)
        out = quantize_checkpoint(tiny_llama, recipe, tmp_path / f"run{forced}", calib_ids, batch_size=4,
                                  progress=False)  # fmt: skip
        files = sorted(out.output.glob("quantizers-layer-*.safetensors"))
        runs[forced] = {k: t for p in files for k, t in load_file(p).items()}
    default, other = runs[None], runs[not kv]
    assert default.keys() == other.keys() and any(".1." in k for k in default)
    same = all(torch.equal(t, other[k]) for k, t in default.items())
    assert same is (kv is None)


def test_stage_passes_end_after_the_stage_and_change_nothing(tiny_llama, calib_ids, tmp_path, monkeypatch):
    """True-sequential GPTAQ's stage passes stop each forward after the stage's last Linear: down_proj (the
    last module) runs in fewer forwards than when every pass runs to the end, and the checkpoint is the same."""
    import contextlib

    from safetensors.torch import load_file

    from lowbit.algorithms import layer_inputs

    config = AutoModelForCausalLM.from_pretrained(tiny_llama).config
    runs = {}
    for stop in (True, False):
        if not stop:
            monkeypatch.setattr(layer_inputs, "stopping_after", lambda module: contextlib.nullcontext())
        calls = [0]

        def count(module, args, out, calls=calls):
            if isinstance(module, torch.nn.Linear) and module.in_features == config.intermediate_size:
                calls[0] += 1

        handle = torch.nn.modules.module.register_module_forward_hook(count)
        try:
            out = quantize_checkpoint(tiny_llama, preset("int4_awq").with_algorithm("gptaq"), tmp_path / str(stop),
                                      calib_ids, batch_size=4, progress=False)  # fmt: skip
        finally:
            handle.remove()
        files = sorted(out.output.glob("*-layer-*.safetensors"))
        runs[stop] = (calls[0], {k: t for p in files for k, t in load_file(p).items()})
    (stopped, a), (full, b) = runs[True], runs[False]
    assert 0 < stopped < full
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

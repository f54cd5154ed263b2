"""Each calibration algorithm, run by the layer-by-layer pipeline on the built-in trained model, lowers the
KL from the float model below what max calibration of the same preset gives."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from lowbit.algorithms.layerwise import quantize_checkpoint
from lowbit.cli import DEFAULT_MODEL
from lowbit.data.text import DEFAULT_CALIB, DEFAULT_EVAL, calibration_windows, eval_windows
from lowbit.eval.metrics import MetricSums
from lowbit.loader import load_model
from lowbit.quant.recipe import preset


@pytest.fixture(scope="module")
def data():
    tok = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    calib = calibration_windows(DEFAULT_CALIB, tok, 32, 256, seed=0)
    windows = eval_windows(DEFAULT_EVAL, tok, 256)[:12]
    base, _ = load_model(DEFAULT_MODEL)
    with torch.no_grad():
        logits = base(windows, use_cache=False).logits
    return calib, windows, logits


def _kl(tmp_path, data, name: str, algorithm: str, **params) -> tuple[float, dict]:
    calib, windows, base_logits = data
    recipe = preset(name).with_algorithm(algorithm).with_params(**params)
    out = quantize_checkpoint(DEFAULT_MODEL, recipe, tmp_path / f"{name}-{algorithm}", calib, progress=False)
    model, manifest = load_model(out.output)
    sums = MetricSums()
    with torch.no_grad():
        sums.add(model(windows, use_cache=False).logits, windows, base_logits)
    return sums.result()["kl"], manifest or {}


@pytest.mark.parametrize(
    ("name", "algorithm", "factor"),
    [
        ("int8_sq", "smoothquant", 0.95),
        ("int4_awq", "awq_full", 0.95),
        ("int4_awq", "gptq", 0.8),
        ("int4_awq", "awq_full+gptq", 0.8),
        ("int4_awq", "awq_full+gptaq", 0.8),
        ("nvfp4_wo", "mse", 0.99),
        ("nvfp4_wo", "gptq", 0.8),
    ],
)
def test_algorithm_lowers_kl_against_max(tmp_path, data, name, algorithm, factor):
    base_kl, _ = _kl(tmp_path, data, name, "max")
    kl, manifest = _kl(tmp_path, data, name, algorithm)
    assert manifest["algorithm"] == algorithm
    assert kl < factor * base_kl, f"{name} {algorithm}: KL {kl:.5g} vs max {base_kl:.5g}"


def test_percentile_clips_activations_below_their_max(tmp_path, data):
    """Percentile calibration is there for the users who ask for it; on LLM activations it clips outlier
    channels and raises KL (measured in docs/experiments, the 2026-11-23 calibration-algorithms entry), so it
    only has to do what it says."""
    _kl(tmp_path, data, "fp8", "max")
    _, manifest = _kl(tmp_path, data, "fp8", "percentile", percentile=99.9)
    assert manifest["recipe"]["algorithm_params"]["percentile"] == 99.9
    ckpt = tmp_path / "fp8-percentile"
    ref = tmp_path / "fp8-max"
    from safetensors.torch import load_file

    a = load_file(str(ckpt / "quantizers-layer-00000.safetensors"))
    b = load_file(str(ref / "quantizers-layer-00000.safetensors"))
    key = "model.layers.0.mlp.down_proj.input_quantizer.amax"
    assert 0 < float(a[key]) < float(b[key])
    weight_key = "model.layers.0.mlp.down_proj.weight_quantizer.0.amax"
    assert torch.equal(a[weight_key], b[weight_key])


def test_error_report_is_in_the_manifest_and_gptq_lowers_every_output_error(tmp_path, data):
    _, manifest = _kl(tmp_path, data, "int4_awq", "gptq")
    errors = manifest["errors"]
    assert set(errors) == set(manifest["modules"])
    for name, e in errors.items():
        assert e["tokens"] == 32 * 256
        assert 0 < e["after"] < e["before"], name
    json.dumps(errors)


def test_smoothed_input_amax_equals_a_fresh_pass_over_the_smoothed_model(tiny_llama, calib_ids):
    """SmoothQuant sets per-tensor input amax to max_j(amax_j / s_j) instead of a second pass: the same."""
    from transformers import AutoModelForCausalLM

    from lowbit.algorithms.whole_model import quantize
    from lowbit.quant.convert import quant_linears, set_calibrating

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    quantize(model, preset("int8_sq").with_algorithm("smoothquant"), lambda m: m(calib_ids))
    derived = {n: lin.input_quantizer.amax.clone() for n, lin in quant_linears(model)}
    for _, lin in quant_linears(model):
        lin.input_quantizer.amax = None
    set_calibrating(model, True)
    with torch.no_grad():
        model(calib_ids)
    set_calibrating(model, False)
    for name, lin in quant_linears(model):
        torch.testing.assert_close(derived[name], lin.input_quantizer.amax, rtol=1e-4, atol=0, msg=name)


@pytest.mark.parametrize("name", ["fp8", "nvfp4", "int8_sq"])
def test_input_statistics_from_the_input_hooks_equal_the_quantizers_own(tiny_llama, calib_ids, monkeypatch, name):
    """The statistics pass takes per-tensor input amax (NVFP4: the global amax) from the hooks' per-channel
    amax instead of letting each input quantizer observe its input again: bit-identical."""
    from transformers import AutoModelForCausalLM

    from lowbit.algorithms import calibrate
    from lowbit.algorithms.whole_model import quantize
    from lowbit.quant.convert import quant_linears

    def input_stats(derive: bool) -> dict[str, dict[str, torch.Tensor]]:
        if not derive:
            monkeypatch.setattr(calibrate, "_derivable", lambda q: False)
        model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
        quantize(model, preset(name).with_algorithm("max"), lambda m: m(calib_ids))
        return {n: lin.input_quantizer.stats() for n, lin in quant_linears(model)}

    derived, observed = input_stats(True), input_stats(False)
    assert derived.keys() == observed.keys() and all(derived.values())
    for n in derived:
        assert derived[n].keys() == observed[n].keys(), n
        for stat, value in derived[n].items():
            assert torch.equal(value, observed[n][stat]), (n, stat)


def test_non_sequential_calibration_differs_and_stays_close(tmp_path, data):
    kl_seq, _ = _kl(tmp_path, data, "int4_awq", "gptq")
    kl_par, manifest = _kl(tmp_path / "par", data, "int4_awq", "gptq", sequential=False)
    assert manifest["recipe"]["algorithm_params"]["sequential"] is False
    assert kl_par != kl_seq and kl_par < 2 * kl_seq


def test_gptaq_equals_gptq_on_layer_0_and_leaves_the_activation_statistics_alone(tmp_path, data):
    """Before layer 0 nothing is quantized yet (float and quantized activations are the same tensors), so
    GPTAQ's layer 0 is GPTQ's; from layer 1 on it reads the float model's activations and differs. True
    sequential (GPTAQ's default), only layer 0's first stage (q/k/v) is GPTQ's: o, gate/up and down read inputs
    computed with q/k/v (then gate/up) quantized. The reference and stage passes change no activation
    statistic: W4A8's FP8 input scales of layer 0 are GPTQ's."""
    from safetensors.torch import load_file

    _kl(tmp_path, data, "w4a8_awq", "gptq")
    _, manifest = _kl(tmp_path / "plain", data, "w4a8_awq", "gptaq", true_sequential=False)
    assert manifest["algorithm"] == "gptaq" and manifest["gptq_true_sequential"] is False
    _, manifest = _kl(tmp_path / "staged", data, "w4a8_awq", "gptaq")
    assert manifest["gptq_true_sequential"] is True

    def tensors(run: str, kind: str, layer: int) -> dict[str, torch.Tensor]:
        return load_file(str(tmp_path / run / f"{kind}-layer-{layer:05d}.safetensors"))

    gptq = {layer: tensors("w4a8_awq-gptq", "model", layer) for layer in (0, 1)}
    for layer in (0, 1):
        plain = tensors("plain/w4a8_awq-gptaq", "model", layer)
        assert all(torch.equal(plain[k], gptq[layer][k]) for k in plain) == (layer == 0), layer
    staged = tensors("staged/w4a8_awq-gptaq", "model", 0)
    weights = [k for k in staged if k.endswith("proj.weight")]
    assert len(weights) == 7
    for k in weights:
        assert torch.equal(staged[k], gptq[0][k]) == any(p in k for p in ("q_proj", "k_proj", "v_proj")), k
    reference = tensors("w4a8_awq-gptq", "quantizers", 0)
    for run in ("plain/w4a8_awq-gptaq", "staged/w4a8_awq-gptaq"):
        got = tensors(run, "quantizers", 0)
        assert got.keys() == reference.keys() and all(torch.equal(got[k], reference[k]) for k in got), run


def test_true_sequential_gptaq_lowers_kl_against_gptaq_at_once(tmp_path, data):
    """GPTAQ module by module in forward order, each towards the float layer's output, corrects the error of
    the modules before it in its layer too (docs/experiments, the 2026-12-03 GPTQ entry: -10% KL on pydocs-llama)."""
    at_once, _ = _kl(tmp_path / "at-once", data, "int4_awq", "awq_full+gptaq", true_sequential=False)
    staged, manifest = _kl(tmp_path / "staged", data, "int4_awq", "awq_full+gptaq")
    assert manifest["gptq_true_sequential"] is True
    assert staged < 0.95 * at_once, f"true sequential {staged:.5g} vs at once {at_once:.5g}"

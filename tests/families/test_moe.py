"""Mixture-of-experts models: experts as one Linear per projection compute what transformers' fused experts
compute; calibration reaches every expert, reports the ones the router skipped, and ties the scales that
engines share across experts."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lowbit.cli import main
from lowbit.loader import load_model
from lowbit.models.moe import ExpertList, unfuse_known

pytestmark = pytest.mark.slow

IDS = torch.randint(1, 512, (2, 24), generator=torch.Generator().manual_seed(1))


def _quantize(src: Path, out: Path, text_file: Path, preset: str) -> dict:
    args = ["quantize", "--model", str(src), "--qformat", preset, "--calib-data", str(text_file),
            "--calib-size", "8", "--calib-seq-len", "32", "--output", str(out), "-q"]  # fmt: skip
    assert main(args) == 0
    return dict(json.loads((out / "lowbit.json").read_text()))


def _stats(ckpt: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(ckpt.glob("quantizers-*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
def test_expert_list_computes_the_fused_experts(tiny_factory, model_type):
    src = tiny_factory(model_type, 2)
    fused = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    split = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    assert unfuse_known(split) == 2
    assert isinstance(split.model.layers[0].mlp.experts, ExpertList)
    assert not any(p.dim() == 3 for p in split.parameters())
    with torch.no_grad():
        torch.testing.assert_close(split(IDS).logits, fused(IDS).logits, rtol=0, atol=1e-5)
        # in BF16 the experts return BF16, as the fused ones do (the routing weights are fp32)
        split.to(torch.bfloat16), fused.to(torch.bfloat16)
        block = split.model.layers[0].mlp
        x = torch.randn(2, 5, 128, dtype=torch.bfloat16)
        assert block(x).dtype == torch.bfloat16 == fused.model.layers[0].mlp(x).dtype


def test_every_expert_calibrated_with_engine_shared_scales(tiny_factory, text_file, tmp_path):
    src = tiny_factory("mixtral", 2)
    manifest = _quantize(src, tmp_path / "q", text_file, "fp8")
    stats = _stats(tmp_path / "q")
    for layer in range(2):
        experts = [f"model.layers.{layer}.mlp.experts.{e}" for e in range(4)]
        for e in experts:
            for proj in ("w1", "w2", "w3"):
                assert f"{e}.{proj}" in manifest["modules"]
                assert torch.isfinite(stats[f"{e}.{proj}.input_quantizer.amax"]).all()
            # an expert's gate and up are one GEMM in the engines: one weight scale
            assert torch.equal(stats[f"{e}.w1.weight_quantizer.0.amax"], stats[f"{e}.w3.weight_quantizer.0.amax"])
        # vLLM's fused MoE runs every expert with one w13 and one w2 input scale
        for projs in (("w1", "w3"), ("w2",)):
            values = {float(stats[f"{e}.{p}.input_quantizer.amax"]) for e in experts for p in projs}
            assert len(values) == 1, values
        routed = [manifest["errors"][f"{e}.w1"]["routed_tokens"] for e in experts]
        assert sum(routed) == 8 * 32 * 2  # every calibration token goes to its top-2 experts


def test_expert_the_router_never_picks_is_reported_and_calibrated(
    tiny_factory, text_file, tmp_path, caplog, capsys
):
    src = tiny_factory("mixtral", 2, num_experts_per_tok=1)
    model = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():  # experts 2 and 3 get router logit 0; one of experts 0 and 1 is always above it
        for layer in model.model.layers:
            w = layer.mlp.gate.weight
            w[1] = -w[0]
            w[2:] = 0
    skewed = tmp_path / "skewed"
    model.save_pretrained(skewed)
    for f in src.glob("tokenizer*"):
        (skewed / f.name).write_bytes(f.read_bytes())
    with caplog.at_level(logging.WARNING, logger="lowbit"):
        manifest = _quantize(skewed, tmp_path / "q", text_file, "nvfp4")
    assert "model.layers.0.mlp.experts: experts 2, 3 routed no calibration tokens" in caplog.text
    stats = _stats(tmp_path / "q")
    for e in (2, 3):
        name = f"model.layers.0.mlp.experts.{e}"
        assert manifest["errors"][f"{name}.w1"]["routed_tokens"] == 0
        for key in (f"{name}.w2.input_quantizer.global_amax", f"{name}.w1.weight_quantizer.0.amax"):
            assert torch.isfinite(stats[key]).all() and float(stats[key].abs().max()) > 0
    quantized, _ = load_model(tmp_path / "q")
    with torch.no_grad():
        assert torch.isfinite(quantized(IDS).logits).all()
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "q")]) == 0
    routed = capsys.readouterr().out.split("router sent to each expert")[1]
    assert "<- expert 2, 3 got none" in routed.split("model.layers.0.mlp.experts: ")[1].splitlines()[0]


@pytest.mark.parametrize(
    ("model_type", "router", "algorithm"),
    [
        ("mixtral", "model.layers.0.mlp.gate", "awq_full"),
        ("mixtral", "model.layers.0.mlp.gate", "smoothquant"),
        ("qwen2_moe", "model.layers.0.mlp.gate", "awq_full"),
        ("nemotron_h", "model.layers.3.mixer.gate", "awq_full"),
    ],
)
def test_smoothing_into_experts_keeps_the_float_model(tiny_factory, text_file, tmp_path, model_type, router,
                                                      algorithm):  # fmt: skip
    """AWQ / SmoothQuant fold scales into the norm before the experts; the router reads that norm too and
    takes the scales, so the checkpoint's float weights compute the original model (up to BF16 rounding).
    The scales of a fold that reaches a router are powers of two, so the router's input and weight change by
    exact factors and it routes every token as before. Nemotron-H also folds into Mamba-2's gated norm
    (before out_proj) and the shared expert."""
    norm = router.rsplit(".", 2)[0] + (".norm" if model_type == "nemotron_h" else ".post_attention_layernorm")
    model = AutoModelForCausalLM.from_pretrained(tiny_factory(model_type, 4 if model_type == "nemotron_h" else 2))
    with torch.no_grad():  # outlier channels before the experts, for the scales to move
        model.get_submodule(norm).weight[:8] *= 16
    src = tmp_path / "src"
    model.save_pretrained(src)
    for f in tiny_factory(model_type, 2).glob("tokenizer*"):
        (src / f.name).write_bytes(f.read_bytes())
    preset = "int4_awq" if algorithm == "awq_full" else "int8_sq"
    out = str(tmp_path / "q")
    args = ["quantize", "--model", str(src), "--qformat", preset, "--algorithm", algorithm, "--calib-data",
            str(text_file), "--calib-size", "8", "--calib-seq-len", "32", "--output", out, "-q"]  # fmt: skip
    assert main(args) == 0
    smoothed = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32).eval()
    original = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    n_s, n_o = smoothed.get_submodule(norm).weight, original.get_submodule(norm).weight
    assert not torch.equal(n_s, n_o)  # smoothed
    r_s, r_o = smoothed.get_submodule(router).weight, original.get_submodule(router).weight
    ratio = n_o / n_s  # the folded scale per channel: a power of two, exactly what the router took
    assert torch.equal(ratio, torch.exp2(torch.log2(ratio).round()))
    assert torch.equal(r_s, r_o * ratio)
    with torch.no_grad():
        a, b = smoothed(IDS).logits, original(IDS).logits
    assert float((a - b).abs().max()) < 0.02 * float(b.abs().max())


@pytest.mark.parametrize(
    ("model_type", "norm"),
    [("gemma", "post_attention_layernorm"), ("gemma2", "pre_feedforward_layernorm"),
     ("gemma3_text", "pre_feedforward_layernorm"), ("phi3", "post_attention_layernorm"),
     ("starcoder2", "post_attention_layernorm")],
)  # fmt: skip
def test_awq_smooths_dense_families_and_keeps_the_float_model(tiny_factory, text_file, tmp_path, model_type, norm):
    """Gemma (folds into its 1 + w norms), Phi-3 (fused qkv_proj / gate_up_proj) and StarCoder2 (LayerNorms with
    bias) have smoothing groups; the folds keep the float model up to BF16 rounding."""
    src = tiny_factory(model_type, 2)
    manifest = _quantize(src, tmp_path / "q", text_file, "int4_awq")
    assert manifest["algorithm"] == "awq_full"
    smoothed = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32).eval()
    original = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    assert not torch.equal(
        getattr(smoothed.model.layers[0], norm).weight, getattr(original.model.layers[0], norm).weight
    )
    with torch.no_grad():
        a, b = smoothed(IDS).logits, original(IDS).logits
    assert float((a - b).abs().max()) < 0.02 * float(b.abs().max())
    mlp_in = {"phi3": "mlp.gate_up_proj", "starcoder2": "mlp.c_fc"}.get(model_type, "mlp.gate_proj")
    errors = manifest["errors"][f"model.layers.0.{mlp_in}"]
    assert errors["after"] < errors["before"]


def test_in_memory_quantize_reaches_every_expert(tiny_factory):
    """The in-memory API splits the fused experts too (else they would stay unquantized), and ties the engine
    scales across the experts with full module names."""
    import lowbit.quant as lq
    from lowbit.algorithms.whole_model import quantize
    from lowbit.quant.linear import QuantLinear

    model = AutoModelForCausalLM.from_pretrained(tiny_factory("mixtral", 2), dtype=torch.float32).eval()
    specs = quantize(model, lq.preset("fp8"), forward_loop=lambda m: m(IDS))
    assert sum(".experts." in n for n in specs) == 2 * 4 * 3
    experts = model.model.layers[0].mlp.experts
    amaxes = {float(getattr(e, p).input_quantizer.amax) for e in experts for p in ("w1", "w3")}
    assert len(amaxes) == 1 and all(isinstance(e.w2, QuantLinear) for e in experts)


def test_gptaq_reference_passes_leave_the_routed_counts_and_input_scales(tiny_factory, text_file, tmp_path):
    """GPTAQ runs every batch of the float model's activations through each layer too, and true-sequential
    passes one stage at a time; what calibration reports and stores for the quantized model's own tokens
    stays that of a GPTQ run (in every layer at once; true-sequential, whose layer 0 differs from GPTQ's and
    so changes the inputs of layer 1, in layer 0)."""
    src = tiny_factory("mixtral", 2)
    runs = {}
    for run, algorithm, flags in (("gptq", "gptq", []), ("at-once", "gptaq", ["--no-true-sequential"]),
                                  ("staged", "gptaq", [])):  # fmt: skip
        out = tmp_path / run
        args = ["quantize", "--model", str(src), "--qformat", "w4a8_awq", "--algorithm", algorithm, *flags,
                "--calib-data", str(text_file), "--calib-size", "8", "--calib-seq-len", "32",
                "--output", str(out), "-q"]  # fmt: skip
        assert main(args) == 0
        runs[run] = (json.loads((out / "lowbit.json").read_text()), _stats(out))
    m_q, s_q = runs["gptq"]
    layer0 = [k for k in s_q if k.startswith("model.layers.0.") and "input_quantizer" in k]
    assert layer0
    for run, layers in (("at-once", ("0", "1")), ("staged", ("0",))):
        m_a, s_a = runs[run]
        for name, e in m_q["errors"].items():
            if name.split(".")[2] in layers:
                assert m_a["errors"][name].get("routed_tokens") == e.get("routed_tokens"), (run, name)
        assert all(torch.equal(s_q[k], s_a[k]) for k in layer0), run
        routed = sum(m_a["errors"][f"model.layers.0.mlp.experts.{e}.w1"]["routed_tokens"] for e in range(4))
        assert routed == 8 * 32 * 2, run


def test_gptaq_refits_the_routers_to_the_float_model_logits(tiny_factory, text_file, tokenizer_dir, tmp_path):
    """With GPTAQ each router (kept in high precision) is refitted so that on the quantized model's own
    hidden states it gives logits closer to the float model's; --no-gptaq-routers keeps the source's. The
    forwards run bf16 products on every machine (the refit's own statistics stay fp32 products)."""
    from transformers import AutoTokenizer

    from lowbit.data.text import calibration_windows

    src = tiny_factory("mixtral", 2)
    runs = {}
    for flag in ("--gptaq-routers", "--no-gptaq-routers"):
        out = tmp_path / flag
        args = ["quantize", "--model", str(src), "--qformat", "int4_awq", "--algorithm", "gptaq", flag,
                "--calib-data", str(text_file), "--calib-size", "8", "--calib-seq-len", "32",
                "--calib-dtype", "bfloat16", "--output", str(out), "-q"]  # fmt: skip
        assert main(args) == 0
        runs[flag] = (json.loads((out / "lowbit.json").read_text()), load_model(out)[0].eval())
    ids = calibration_windows(text_file, AutoTokenizer.from_pretrained(tokenizer_dir), 8, 32)
    original = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    routers = [f"model.layers.{i}.mlp.gate" for i in range(2)]

    def router_logits(model):
        got = {}
        hooks = [model.get_submodule(r).register_forward_hook(lambda m, a, out, r=r: got.update({r: out[0]}))
                 for r in routers]  # fmt: skip
        with torch.no_grad():
            model(ids)
        for h in hooks:
            h.remove()
        return got

    ref = router_logits(original)
    fitted, kept = (router_logits(runs[f][1]) for f in ("--gptaq-routers", "--no-gptaq-routers"))
    manifest = runs["--gptaq-routers"][0]
    for r in routers:
        err = {k: float((v[r] - ref[r]).pow(2).sum() / ref[r].pow(2).sum()) for k, v in (("fit", fitted),
                                                                                          ("kept", kept))}  # fmt: skip
        assert err["fit"] < 0.8 * err["kept"], (r, err)
        report = manifest["errors"][r]
        assert report["after"] < report["before"] and report["tokens"] == 8 * 32
        assert report["after"] == pytest.approx(err["fit"], rel=0.05)  # the report measures what it did
        src_weight = original.get_submodule(r).weight
        assert torch.equal(runs["--no-gptaq-routers"][1].get_submodule(r).weight, src_weight)
        assert r not in runs["--no-gptaq-routers"][0]["errors"]


@pytest.mark.parametrize("model_type", ["llama", "mixtral"])
def test_true_sequential_gptaq_quantizes_each_layer_in_forward_stages(tiny_factory, text_file, tmp_path,
                                                                      monkeypatch, model_type):  # fmt: skip
    """q/k/v first, then o, then the gate/up of every expert, then every expert's down: each stage one GPTQ
    call, on inputs from a pass with the stages before it quantized."""
    from lowbit.algorithms import calibrate

    calls: list[list[str]] = []
    original = calibrate._gptq

    def recording(linears, *args, **kwargs):
        calls.append(sorted(linears))
        return original(linears, *args, **kwargs)

    monkeypatch.setattr(calibrate, "_gptq", recording)
    src = tiny_factory(model_type, 2)
    args = ["quantize", "--model", str(src), "--qformat", "int4_awq", "--algorithm", "gptaq",
            "--calib-data", str(text_file), "--calib-size", "8", "--calib-seq-len", "32",
            "--output", str(tmp_path / "q"), "-q"]  # fmt: skip
    assert main(args) == 0
    mlp = ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]
    if model_type == "mixtral":
        mlp = ([f"mlp.experts.{e}.{p}" for e in range(4) for p in ("w1", "w3")],
               [f"mlp.experts.{e}.w2" for e in range(4)])  # fmt: skip
    attention = [f"self_attn.{p}_proj" for p in "kqv"], ["self_attn.o_proj"]
    assert calls == 2 * [sorted(names) for names in (*attention, *mlp)]


def _routing_of(block: torch.nn.Module, x: torch.Tensor, floor: float | None):
    """(the expert Linears' statistics, the experts' inputs, top-k indices, top-k weights) of one calibrating
    forward of a MoE block with the given weighting floor."""
    from lowbit.algorithms.stats import CalibrationContext, collect_inputs
    from lowbit.models import moe

    experts = block.experts
    seen = {}
    hook = experts.register_forward_pre_hook(lambda m, a: seen.update(args=a))
    linears = {n: m for n, m in experts.named_modules() if isinstance(m, torch.nn.Linear)}
    context = CalibrationContext()
    with collect_inputs(linears, None, context=context) as stats, torch.no_grad():
        moe.set_calibrating(block, True, floor, context.token_weights)
        try:
            calibrating = block(x)
        finally:
            moe.set_calibrating(block, False)
    hook.remove()
    with torch.no_grad():
        torch.testing.assert_close(calibrating, block(x))  # the output stays the routed one
    return stats, *seen["args"]


def test_routed_weighting_weights_each_token_by_its_routing_weight_squared(tiny_factory):
    """Under routed weighting an expert's statistics weight every token by (its routing weight to the expert)^2
    plus the floor (relative to the mean routed weight squared): the expert's share of the block's squared
    output error. Gate and up of one expert share
    statistics, experts do not; under uniform weighting all experts' gate/up share one."""
    model = AutoModelForCausalLM.from_pretrained(tiny_factory("qwen3_moe", 1), dtype=torch.float32).eval()
    unfuse_known(model)
    block = model.model.layers[0].mlp
    x = torch.randn(2, 12, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    stats, h, idx, weights = _routing_of(block, x, 0.01)
    for e, expert in enumerate(block.experts):
        w = torch.zeros(len(h))
        tok, pos = torch.where(idx == e)
        w[tok] = weights[tok, pos].square()
        w += 0.01 * weights.square().mean()  # the floor is relative to the mean routed weight squared
        inter = torch.nn.functional.silu(expert.gate_proj(h)) * expert.up_proj(h)
        for name, inputs in ((f"{e}.gate_proj", h), (f"{e}.down_proj", inter)):
            expected = (inputs * w[:, None]).t() @ inputs / w.sum()
            torch.testing.assert_close(stats[name].hessian, expected.detach(), rtol=1e-4, atol=1e-6)
        assert stats[f"{e}.gate_proj"] is stats[f"{e}.up_proj"]
        assert stats[f"{e}.gate_proj"].n == len(h)  # every token, weighted
    assert stats["0.gate_proj"] is not stats["1.gate_proj"]
    uniform, *_ = _routing_of(block, x, None)
    assert (
        len({id(uniform[f"{e}.{p}"]) for e in range(len(block.experts)) for p in ("gate_proj", "up_proj")})
        == 1
    )


def test_routed_weighting_lowers_the_blocks_output_error(tiny_factory, calib_ids):
    """GPTQ on routing-weighted statistics fits each expert to the tokens the router sends it, so the MoE
    block's routed output error on the calibration tokens is lower than with every token alike (attention
    kept in float, so both runs route the same tokens)."""
    import lowbit.quant as lq
    from lowbit.algorithms.whole_model import quantize

    src = tiny_factory("qwen3_moe", 1)
    ids = calib_ids[:8]
    outputs = {}
    for run in ("float", "routed", "uniform"):
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        if run != "float":
            recipe = lq.preset("int4_awq").with_algorithm("gptq").with_exclude("*self_attn*")
            quantize(model, recipe.with_params(moe_weighting=run), forward_loop=lambda m: m(ids))
        block = model.model.layers[0].mlp
        block.register_forward_hook(lambda m, a, out, r=run: outputs.update({r: out}))
        with torch.no_grad():
            model(ids)
    err = {run: float((outputs[run] - outputs["float"]).pow(2).sum()) for run in ("routed", "uniform")}
    assert err["routed"] < 0.9 * err["uniform"], err

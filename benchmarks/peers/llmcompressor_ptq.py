"""vLLM llm-compressor (llmcompressor 0.14.0.1 / compressed-tensors): PTQ under lowbit's protocol.

Runs in the llmcompressor venv made by setup.sh, e.g.
    ~/.cache/lowbit-peers/llmcompressor/bin/python benchmarks/peers/llmcompressor_ptq.py --out results.jsonl --isolate
    ~/.cache/lowbit-peers/llmcompressor/bin/python benchmarks/peers/llmcompressor_ptq.py --out results.jsonl \
        --isolate --runs int4_awq:gptq,int8_sq:smoothquant+gptq     # or --algorithm-runs for all ALGORITHM_RUNS

A "max" run (--formats) is one QuantizationModifier(targets="Linear", ignore=["lm_head"]) with a compressed-tensors
scheme (min-max observers: round-to-nearest, no GPTQ/AWQ/SmoothQuant). An algorithm run (--runs PRESET:ALGO) is the
recipe of ALGORITHMS[(preset, algo)]: SmoothQuantModifier / AWQModifier followed by QuantizationModifier or
GPTQModifier with the same targets, scheme and ignore list. Both run by oneshot() on the in-memory float32 model
with lowbit's calibration windows as an already-tokenized datasets.Dataset (batch 16, no shuffling). oneshot leaves
the model in the FROZEN fake-quant state (no output_dir, nothing saved), which is evaluated.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import torch

# lowbit preset -> a compressed-tensors preset scheme name, or a custom scheme (weights / input_activations
# QuantizationArgs as dicts) where no preset matches lowbit's format.
_STATIC = {"dynamic": False, "observer": "static_minmax"}
SCHEMES: dict[str, str | dict[str, Any]] = {
    "fp8": "FP8",                # W fp8 per-tensor, A fp8 static per-tensor
    "fp8_pc_pt": "FP8_DYNAMIC",  # W fp8 per-channel, A fp8 dynamic per-token
    "int4_awq": "W4A16",         # W int4 symmetric group 128 (RTN; lowbit's int4_awq preset run with max)
    "int8_wo": "W8A16",          # W int8 symmetric *group 128* (compressed-tensors' W8A16 preset)
    "nvfp4": "NVFP4",            # W nvfp4 (fp8 block scales + per-tensor global), A nvfp4 dynamic blocks
    "nvfp4_wo": "NVFP4A16",
    "mxfp4": "MXFP4",
    "mxfp8": "MXFP8",
    # W int4 symmetric g128 + A fp8 *dynamic per-token*: llmc's W4A8-with-FP8-activations preset. Not lowbit's /
    # ModelOpt's w4a8_awq exactly (those: FP8 static per-tensor activations, FP8-quantized int4 group scales)
    "w4a8_awq": "W4AFP8",
    # custom schemes that match lowbit's formats exactly
    "int8_wo_channel": {"weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}},
    "int8_sq": {"weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"},
                "input_activations": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "tensor",
                                      **_STATIC}},
    "fp8_pb_wo": {"weights": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "block",
                              "block_structure": [128, 128]}},
}
PIPELINE = os.environ.get("LLMC_PIPELINE") or None  # None: llmcompressor's own choice ("sequential")

# Algorithm runs: (lowbit preset, algorithm) -> recipe, a list of (modifier class name, its kwargs). A quantizing
# modifier (QuantizationModifier, GPTQModifier) takes "scheme": a SCHEMES key or a compressed-tensors preset name,
# and gets targets="Linear", ignore=["lm_head"]. GPTQModifier defaults in 0.14: block_size 128, dampening_frac 0.01,
# actorder "static" (= "weight"; "group"/"dynamic" raise in 0.14's GPTQ); they are spelled out here.
_GPTQ = {"block_size": 128, "dampening_frac": 0.01, "actorder": "static"}
_GPTQ_NO_ACTORDER = {**_GPTQ, "actorder": None}
_AWQ = {"duo_scaling": True, "n_grid": 20}  # AWQModifier defaults (mappings inferred from the model)
ALGORITHMS: dict[tuple[str, str], list[tuple[str, dict[str, Any]]]] = {
    # int4 symmetric group 128 (W4A16); llmc's own default GPTQ has activation ordering ("static")
    ("int4_awq", "gptq"): [("GPTQModifier", {**_GPTQ, "scheme": "W4A16"})],
    ("int4_awq", "gptq_no_actorder"): [("GPTQModifier", {**_GPTQ_NO_ACTORDER, "scheme": "W4A16"})],
    # AWQModifier defaults (mappings inferred for Llama, duo_scaling True, n_grid 20) + RTN W4A16
    ("int4_awq", "awq"): [("AWQModifier", _AWQ), ("QuantizationModifier", {"scheme": "W4A16"})],
    # the custom int8_sq scheme (W int8 per-channel, A int8 static per-tensor) after SmoothQuant, as in llmc's W8A8
    # examples (SmoothQuantModifier(smoothing_strength=0.8) + GPTQModifier); 0.5 is SmoothQuantModifier's default
    ("int8_sq", "smoothquant"): [("SmoothQuantModifier", {"smoothing_strength": 0.5}),
                                 ("QuantizationModifier", {"scheme": "int8_sq"})],
    ("int8_sq", "smoothquant+gptq"): [("SmoothQuantModifier", {"smoothing_strength": 0.5}),
                                      ("GPTQModifier", {**_GPTQ, "scheme": "int8_sq"})],
    ("int8_sq", "smoothquant0.8+gptq"): [("SmoothQuantModifier", {"smoothing_strength": 0.8}),
                                         ("GPTQModifier", {**_GPTQ, "scheme": "int8_sq"})],
    # W4AFP8 preset (SCHEMES["w4a8_awq"]): see there
    ("w4a8_awq", "gptq"): [("GPTQModifier", {**_GPTQ, "scheme": "W4AFP8"})],
    ("nvfp4", "gptq"): [("GPTQModifier", {**_GPTQ, "scheme": "NVFP4"})],
    ("nvfp4_awq", "awq"): [("AWQModifier", _AWQ), ("QuantizationModifier", {"scheme": "NVFP4"})],
    # the same AWQ recipes with the CPU patch of NOPIN_PATCH (AWQ as shipped fails on a machine without accelerator)
    ("int4_awq", "awq_nopin"): [("AWQModifier", _AWQ), ("QuantizationModifier", {"scheme": "W4A16"})],
    ("nvfp4_awq", "awq_nopin"): [("AWQModifier", _AWQ), ("QuantizationModifier", {"scheme": "NVFP4"})],
}
# AWQModifier._apply_smoothing pins its cached layer inputs (IntermediatesCache.pin_memory, "for faster onloading
# during grid search"); Tensor.pin_memory() raises "Cannot access accelerator device when none is available" on a
# CPU-only machine. The *_nopin runs make IntermediatesCache.pin_memory a no-op: pinning only speeds up
# host-to-device copies, so the numerics are AWQ's own.
NOPIN_PATCH = "llmcompressor.pipelines.cache.IntermediatesCache.pin_memory -> no-op"
NOPIN_RUNS = {("int4_awq", "awq_nopin"), ("nvfp4_awq", "awq_nopin")}
# --algorithm-runs, most important first
ALGORITHM_RUNS: list[tuple[str, str]] = [
    ("int4_awq", "gptq"),
    ("int4_awq", "gptq_no_actorder"),
    ("int8_sq", "smoothquant+gptq"),
    ("nvfp4", "gptq"),
    ("int4_awq", "awq"),
    ("int4_awq", "awq_nopin"),
    ("int8_sq", "smoothquant0.8+gptq"),
    ("int8_sq", "smoothquant"),
    ("w4a8_awq", "max"),
    ("w4a8_awq", "gptq"),
    ("nvfp4_awq", "awq"),
    ("nvfp4_awq", "awq_nopin"),
]
_QUANTIZERS = ("QuantizationModifier", "GPTQModifier")


def _algorithms() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for preset, algo in ALGORITHMS:
        out.setdefault(preset, []).append(algo)
    return out


def _recipe_spec(preset: str, algorithm: str) -> list[tuple[str, dict[str, Any]]]:
    if algorithm == "max" and (preset, algorithm) not in ALGORITHMS:
        return [("QuantizationModifier", {"scheme": preset})]
    return ALGORITHMS[(preset, algorithm)]


def _scheme_of(spec: list[tuple[str, dict[str, Any]]]) -> str:
    return next(kw["scheme"] for name, kw in spec if name in _QUANTIZERS)


def _quant_kwargs(scheme_key: str) -> dict[str, Any]:
    """targets/scheme/ignore (or config_groups/ignore for a custom scheme) of a quantizing modifier."""
    from compressed_tensors.quantization import QuantizationScheme

    scheme = SCHEMES.get(scheme_key, scheme_key)  # a SCHEMES key, or a compressed-tensors preset name
    if isinstance(scheme, str):
        return {"targets": "Linear", "scheme": scheme, "ignore": ["lm_head"]}
    group = QuantizationScheme(targets=["Linear"], **scheme)
    return {"config_groups": {"group_0": group}, "ignore": ["lm_head"]}


def _modifiers(preset: str, algorithm: str) -> list:
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform import AWQModifier, SmoothQuantModifier

    classes = {"QuantizationModifier": QuantizationModifier, "GPTQModifier": GPTQModifier,
               "AWQModifier": AWQModifier, "SmoothQuantModifier": SmoothQuantModifier}
    mods = []
    for name, kwargs in _recipe_spec(preset, algorithm):
        kw = dict(kwargs)
        if name in _QUANTIZERS:
            kw.update(_quant_kwargs(kw.pop("scheme")))
        mods.append(classes[name](**kw))
    return mods


def _resolved_scheme(scheme_key: str) -> dict[str, Any]:
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

    scheme = SCHEMES.get(scheme_key, scheme_key)
    return PRESET_SCHEMES[scheme] if isinstance(scheme, str) else scheme


def describe(preset: str, algorithm: str = "max") -> dict[str, Any]:
    spec = _recipe_spec(preset, algorithm)
    scheme_key = _scheme_of(spec)
    scheme = SCHEMES.get(scheme_key, scheme_key)
    resolved = _resolved_scheme(scheme_key)
    args = {k: common.jsonable(v) for k, v in resolved.items()}
    for v in args.values():  # drop the noise
        if isinstance(v, dict):
            for key in ("zp_dtype", "observer_kwargs", "actorder", "block_structure", "scale_dtype"):
                if v.get(key) in (None, {}, "None") or key == "zp_dtype":
                    v.pop(key, None)
    out: dict[str, Any] = {"scheme": scheme if isinstance(scheme, str) else "custom", "targets": "Linear",
                           "ignore": ["lm_head"], **args}
    if algorithm != "max" or len(spec) > 1 or spec[0][0] != "QuantizationModifier":
        out["recipe"] = [{"modifier": name, **{k: v for k, v in kw.items() if k != "scheme"}} for name, kw in spec]
        calib = True  # SmoothQuant, AWQ and GPTQ all need calibration data
        if (preset, algorithm) in NOPIN_RUNS:
            out["patch"] = NOPIN_PATCH
    else:
        calib = None
    out["pipeline"] = PIPELINE or _auto_pipeline(resolved, calib)
    return out


def _auto_pipeline(resolved: dict[str, Any], needs_data: bool | None = None) -> str:
    """What oneshot picks by itself: a calibration pass when a modifier needs data (SmoothQuant, AWQ, GPTQ) or some
    activation scale is static."""
    if needs_data:
        return "sequential (auto)"
    act = resolved.get("input_activations")
    act = act.model_dump() if hasattr(act, "model_dump") else act
    static = bool(act) and act.get("dynamic") is not True  # False (static) or "local" (NVFP4 global scale)
    return "sequential (auto)" if static else "datafree (auto)"


def quantize(model, preset: str, algorithm: str, calib: torch.Tensor) -> dict[str, Any]:
    from datasets import Dataset
    from llmcompressor import oneshot
    from loguru import logger

    ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    kwargs: dict[str, Any] = {"pipeline": PIPELINE} if PIPELINE else {}
    recipe = _modifiers(preset, algorithm)
    if (preset, algorithm) in NOPIN_RUNS:
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None  # see NOPIN_PATCH
    logged: list[str] = []  # llmcompressor's loguru WARNING/ERROR lines, kept in the row (e.g. a GPTQ RTN fallback)
    gptq_losses: list[float] = []  # its per-module GPTQ loss METRIC lines: one per module GPTQ compressed

    def sink(message) -> None:
        rec = message.record
        text = rec["message"].strip()
        if rec["level"].name in ("WARNING", "ERROR", "CRITICAL") and text:
            logged.append(f"{rec['level'].name}: {text.splitlines()[0][:300]}")
        elif rec["level"].name == "METRIC" and text.startswith("error "):
            gptq_losses.append(float(text.split()[1]))

    sink_id = logger.add(sink, level=0)
    try:
        oneshot(
            model=model,
            dataset=ds,
            recipe=recipe,
            num_calibration_samples=len(calib),
            max_seq_length=calib.shape[1],
            batch_size=common.CALIB_BATCH,
            shuffle_calibration_samples=False,
            **kwargs,
        )
    finally:
        logger.remove(sink_id)
    extra = _summary(model)
    if any(type(mod).__name__ == "GPTQModifier" for mod in recipe):
        # 28 expected; a Hessian-inversion RTN fallback is a "Hessian inversion failed" warning in log_warnings
        extra["gptq_modules"] = len(gptq_losses)
        extra["gptq_loss_sum"] = round(sum(gptq_losses), 4)
    extra["log_warnings"] = list(dict.fromkeys(logged))[:30]
    return extra


def _summary(model) -> dict[str, Any]:
    quantized, skipped, status = [], [], set()
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        scheme = getattr(mod, "quantization_scheme", None)
        (quantized if scheme is not None else skipped).append(name)
        if scheme is not None:
            status.add(str(getattr(mod, "quantization_status", "?")))
    return {"quantized_linears": len(quantized), "skipped_linears": skipped, "quantization_status": sorted(status)}


if __name__ == "__main__":
    common.run("llmcompressor", importlib.metadata.version("llmcompressor"), list(SCHEMES), describe, quantize,
               algorithms=_algorithms(), algorithm_runs=ALGORITHM_RUNS)

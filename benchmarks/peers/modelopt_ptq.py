"""NVIDIA Model Optimizer (nvidia-modelopt 0.47.0): PTQ under lowbit's data/eval protocol.

Runs in the modelopt venv made by setup.sh, e.g.
    ~/.cache/lowbit-peers/modelopt/bin/python benchmarks/peers/modelopt_ptq.py --out results.jsonl --isolate
    ~/.cache/lowbit-peers/modelopt/bin/python benchmarks/peers/modelopt_ptq.py --out results.jsonl --isolate \
        --runs int8_sq:smoothquant,int4_awq:awq_full      # or --algorithm-runs for all of ALGORITHM_RUNS

A "max" run (--formats) takes ModelOpt's own config dict, deep-copies it and forces cfg["algorithm"] = "max" (plain
round-to-nearest with amax calibration; no SmoothQuant / AWQ search). An algorithm run (--runs PRESET:ALGO) takes
the config of ALGORITHMS[(preset, algo)] with its own algorithm or the one given there (SmoothQuant, AWQ lite /
clip / full, GPTQ). Then mtq.quantize(model, cfg, loop) where loop feeds lowbit's calibration windows in batches of
16. Evaluation is on the fake-quantized model.
"""

from __future__ import annotations

import copy
import importlib.metadata
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import torch

# lowbit preset -> ModelOpt config name (all run with algorithm "max")
CONFIGS = {
    "fp8": "FP8_DEFAULT_CFG",
    "fp8_pc_pt": "FP8_PER_CHANNEL_PER_TOKEN_CFG",
    "fp8_pb_wo": "FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG",
    "int8_sq": "INT8_SMOOTHQUANT_CFG",
    "int8_wo": "INT8_WEIGHT_ONLY_CFG",
    "int4_awq": "INT4_AWQ_CFG",
    "w4a8_awq": "W4A8_AWQ_BETA_CFG",
    "nvfp4": "NVFP4_DEFAULT_CFG",
    "nvfp4_wo": "W4A16_NVFP4_CFG",
    "mxfp8": "MXFP8_DEFAULT_CFG",
    "mxfp4": "MXFP4_DEFAULT_CFG",
}


# (lowbit preset, algorithm) -> (ModelOpt config name, cfg["algorithm"]; None = the config's own algorithm)
ALGORITHMS: dict[tuple[str, str], tuple[str, Any]] = {
    # own algorithm "smoothquant" = SmoothQuantCalibConfig defaults: alpha 1.0, per-Linear pre_quant_scale
    ("int8_sq", "smoothquant"): ("INT8_SMOOTHQUANT_CFG", None),
    ("int8_sq", "smoothquant_a0.5"): ("INT8_SMOOTHQUANT_CFG", {"method": "smoothquant", "alpha": 0.5}),
    # INT4_AWQ_CFG = int4 block 128 static weight quantizer; own algorithm {"method": "awq_lite", "alpha_step": 0.1}
    ("int4_awq", "awq_lite"): ("INT4_AWQ_CFG", None),
    ("int4_awq", "awq_clip"): ("INT4_AWQ_CFG", {"method": "awq_clip"}),
    ("int4_awq", "awq_full"): ("INT4_AWQ_CFG", {"method": "awq_full", "alpha_step": 0.1}),
    # GPTQ (GPTQCalibConfig: perc_damp 0.01, block_size 128) on the same int4 g128 weights (the RTN config), one
    # decoder layer at a time with QDQ inputs from the earlier layers, as in ModelOpt's gptq recipe
    # (modelopt_recipes/general/ptq/nvfp4_default-kv_none-gptq.yaml: layerwise.enable true)
    ("int4_awq", "gptq"): ("INT4_BLOCKWISE_WEIGHT_ONLY_CFG",
                           {"method": "gptq", "perc_damp": 0.01, "block_size": 128, "layerwise": {"enable": True}}),
    # W4A8_AWQ_BETA_CFG: own algorithm "awq_lite" (AWQLiteCalibConfig defaults: alpha_step 0.1)
    ("w4a8_awq", "awq_lite"): ("W4A8_AWQ_BETA_CFG", None),
    # NVFP4 W4A4 + AWQ presets (own algorithms awq_lite / {"method": "awq_clip"} / {"method": "awq_full", ...})
    ("nvfp4_awq", "awq_lite"): ("NVFP4_AWQ_LITE_CFG", None),
    ("nvfp4_awq", "awq_clip"): ("NVFP4_AWQ_CLIP_CFG", None),
    ("nvfp4_awq", "awq_full"): ("NVFP4_AWQ_FULL_CFG", None),
}
# --algorithm-runs, most important first
ALGORITHM_RUNS: list[tuple[str, str]] = [
    ("int8_sq", "smoothquant"),
    ("int4_awq", "awq_lite"),
    ("int4_awq", "awq_full"),
    ("w4a8_awq", "awq_lite"),
    ("int4_awq", "gptq"),
    ("int4_awq", "awq_clip"),
    ("int8_sq", "smoothquant_a0.5"),
    ("nvfp4_awq", "awq_lite"),
    ("nvfp4_awq", "awq_full"),
]


def _algorithms() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for preset, algo in ALGORITHMS:
        out.setdefault(preset, []).append(algo)
    return out


def _mtq():
    import modelopt.torch.quantization as mtq

    return mtq


def _name_and_algorithm(preset: str, algorithm: str) -> tuple[str, Any]:
    if algorithm == "max":
        return CONFIGS[preset], "max"
    name, algo = ALGORITHMS[(preset, algorithm)]
    return name, copy.deepcopy(getattr(_mtq(), name)["algorithm"]) if algo is None else copy.deepcopy(algo)


def config(preset: str, algorithm: str = "max") -> dict[str, Any]:
    name, algo = _name_and_algorithm(preset, algorithm)
    cfg = copy.deepcopy(getattr(_mtq(), name))
    cfg["algorithm"] = algo
    return cfg


def describe(preset: str, algorithm: str = "max") -> dict[str, Any]:
    """The config name, its original and the used algorithm, and the weight/input quantizer entries (not the skip
    list)."""
    name, algo = _name_and_algorithm(preset, algorithm)
    orig = getattr(_mtq(), name)
    entries = orig["quant_cfg"]
    if isinstance(entries, dict):  # older dict-style configs
        entries = [{"quantizer_name": k, **(v if isinstance(v, dict) else {"cfg": v})} for k, v in entries.items()]
    keep = {"*weight_quantizer", "*input_quantizer", "*output_quantizer"}
    return {
        "config": name,
        "original_algorithm": common.jsonable(orig.get("algorithm")),
        "algorithm": common.jsonable(algo),
        "quantizers": [common.jsonable(e) for e in entries if e.get("quantizer_name") in keep],
    }


def quantize(model, preset: str, algorithm: str, calib: torch.Tensor) -> dict[str, Any]:
    mtq = _mtq()

    @torch.no_grad()
    def forward_loop(m) -> None:
        for i in range(0, len(calib), common.CALIB_BATCH):
            m(input_ids=calib[i : i + common.CALIB_BATCH], use_cache=False)

    mtq.quantize(model, config(preset, algorithm), forward_loop)
    return _summary(model)


def _summary(model) -> dict[str, Any]:
    """Which Linear layers ended up with an enabled weight / input quantizer, and how many carry a SmoothQuant / AWQ
    pre_quant_scale (0 after an AWQ or SmoothQuant run would mean it silently fell back to max)."""
    quantized, skipped, input_q, pqs = [], [], [], []
    for name, mod in model.named_modules():
        wq = getattr(mod, "weight_quantizer", None)
        if wq is None or not isinstance(mod, torch.nn.Linear):
            continue
        (quantized if getattr(wq, "is_enabled", False) else skipped).append(name)
        iq = getattr(mod, "input_quantizer", None)
        if iq is not None and getattr(iq, "is_enabled", False):
            input_q.append(name)
        if iq is not None and getattr(iq, "pre_quant_scale", None) is not None:
            pqs.append(name)
    return {"quantized_linears": len(quantized), "input_quantized_linears": len(input_q),
            "skipped_linears": skipped, "pre_quant_scaled_linears": len(pqs)}


if __name__ == "__main__":
    common.run("modelopt", importlib.metadata.version("nvidia-modelopt"), list(CONFIGS), describe, quantize,
               algorithms=_algorithms(), algorithm_runs=ALGORITHM_RUNS)

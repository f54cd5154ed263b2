"""NVIDIA Model Optimizer (nvidia-modelopt 0.47.0): max-calibrated PTQ under lowbit's data/eval protocol.

Runs in the modelopt venv made by setup.sh, e.g.
    ~/.cache/lowbit-peers/modelopt/bin/python benchmarks/peers/modelopt_ptq.py --out results.jsonl --isolate

Each preset takes ModelOpt's own config dict, deep-copies it and forces cfg["algorithm"] = "max" (plain
round-to-nearest with amax calibration; no SmoothQuant / AWQ search), then mtq.quantize(model, cfg, loop)
where loop feeds lowbit's calibration windows in batches of 16. Evaluation is on the fake-quantized model.
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


def _mtq():
    import modelopt.torch.quantization as mtq

    return mtq


def config(preset: str) -> dict[str, Any]:
    cfg = copy.deepcopy(getattr(_mtq(), CONFIGS[preset]))
    cfg["algorithm"] = "max"
    return cfg


def describe(preset: str) -> dict[str, Any]:
    """The config name, its original algorithm, and the weight/input quantizer entries (not the skip list)."""
    name = CONFIGS[preset]
    orig = getattr(_mtq(), name)
    entries = orig["quant_cfg"]
    if isinstance(entries, dict):  # older dict-style configs
        entries = [{"quantizer_name": k, **(v if isinstance(v, dict) else {"cfg": v})} for k, v in entries.items()]
    keep = {"*weight_quantizer", "*input_quantizer", "*output_quantizer"}
    return {
        "config": name,
        "original_algorithm": common.jsonable(orig.get("algorithm")),
        "algorithm": "max",
        "quantizers": [common.jsonable(e) for e in entries if e.get("quantizer_name") in keep],
    }


def quantize(model, preset: str, calib: torch.Tensor) -> dict[str, Any]:
    mtq = _mtq()

    @torch.no_grad()
    def forward_loop(m) -> None:
        for i in range(0, len(calib), common.CALIB_BATCH):
            m(input_ids=calib[i : i + common.CALIB_BATCH], use_cache=False)

    mtq.quantize(model, config(preset), forward_loop)
    return _summary(model)


def _summary(model) -> dict[str, Any]:
    """Which Linear layers ended up with an enabled weight / input quantizer."""
    quantized, skipped, input_q = [], [], []
    for name, mod in model.named_modules():
        wq = getattr(mod, "weight_quantizer", None)
        if wq is None or not isinstance(mod, torch.nn.Linear):
            continue
        (quantized if getattr(wq, "is_enabled", False) else skipped).append(name)
        iq = getattr(mod, "input_quantizer", None)
        if iq is not None and getattr(iq, "is_enabled", False):
            input_q.append(name)
    return {"quantized_linears": len(quantized), "input_quantized_linears": len(input_q),
            "skipped_linears": skipped}


if __name__ == "__main__":
    common.run("modelopt", importlib.metadata.version("nvidia-modelopt"), list(CONFIGS), describe, quantize)

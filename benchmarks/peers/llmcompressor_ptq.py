"""vLLM llm-compressor (llmcompressor 0.14.0.1 / compressed-tensors): RTN PTQ under lowbit's protocol.

Runs in the llmcompressor venv made by setup.sh, e.g.
    ~/.cache/lowbit-peers/llmcompressor/bin/python benchmarks/peers/llmcompressor_ptq.py --out results.jsonl --isolate

Each preset is one QuantizationModifier(targets="Linear", ignore=["lm_head"]) with a compressed-tensors scheme
(min-max observers: round-to-nearest, no GPTQ/AWQ/SmoothQuant), run by oneshot() on the in-memory float32
model with lowbit's calibration windows as an already-tokenized datasets.Dataset (batch 16, no shuffling).
oneshot leaves the model in the FROZEN fake-quant state (no output_dir, nothing saved), which is evaluated.
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
    # custom schemes that match lowbit's formats exactly
    "int8_wo_channel": {"weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}},
    "int8_sq": {"weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"},
                "input_activations": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "tensor",
                                      **_STATIC}},
    "fp8_pb_wo": {"weights": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "block",
                              "block_structure": [128, 128]}},
}
PIPELINE = os.environ.get("LLMC_PIPELINE") or None  # None: llmcompressor's own choice ("sequential")


def _modifier(preset: str):
    from compressed_tensors.quantization import QuantizationScheme
    from llmcompressor.modifiers.quantization import QuantizationModifier

    scheme = SCHEMES[preset]
    if isinstance(scheme, str):
        return QuantizationModifier(targets="Linear", scheme=scheme, ignore=["lm_head"])
    group = QuantizationScheme(targets=["Linear"], **scheme)
    return QuantizationModifier(config_groups={"group_0": group}, ignore=["lm_head"])


def describe(preset: str) -> dict[str, Any]:
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

    scheme = SCHEMES[preset]
    resolved = PRESET_SCHEMES[scheme] if isinstance(scheme, str) else scheme
    args = {k: common.jsonable(v) for k, v in resolved.items()}
    for v in args.values():  # drop the noise
        if isinstance(v, dict):
            for key in ("zp_dtype", "observer_kwargs", "actorder", "block_structure", "scale_dtype"):
                if v.get(key) in (None, {}, "None") or key == "zp_dtype":
                    v.pop(key, None)
    return {"scheme": scheme if isinstance(scheme, str) else "custom", "targets": "Linear", "ignore": ["lm_head"],
            **args, "pipeline": PIPELINE or _auto_pipeline(resolved)}


def _auto_pipeline(resolved: dict[str, Any]) -> str:
    """What oneshot picks by itself: a calibration pass only when some activation scale is static."""
    act = resolved.get("input_activations")
    act = act.model_dump() if hasattr(act, "model_dump") else act
    static = bool(act) and act.get("dynamic") is not True  # False (static) or "local" (NVFP4 global scale)
    return "sequential (auto)" if static else "datafree (auto)"


def quantize(model, preset: str, calib: torch.Tensor) -> dict[str, Any]:
    from datasets import Dataset
    from llmcompressor import oneshot

    ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    kwargs: dict[str, Any] = {"pipeline": PIPELINE} if PIPELINE else {}
    oneshot(
        model=model,
        dataset=ds,
        recipe=_modifier(preset),
        num_calibration_samples=len(calib),
        max_seq_length=calib.shape[1],
        batch_size=common.CALIB_BATCH,
        shuffle_calibration_samples=False,
        **kwargs,
    )
    return _summary(model)


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
    common.run("llmcompressor", importlib.metadata.version("llmcompressor"), list(SCHEMES), describe, quantize)

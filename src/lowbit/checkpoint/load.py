"""Loading a model for generate / eval / inspect: a lowbit quantized checkpoint or a plain HF model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from lowbit.checkpoint.store import MANIFEST
from lowbit.errors import LowbitError
from lowbit.quant.convert import KV_QUANTIZERS
from lowbit.quant.kv import is_attention, use_kv_attention
from lowbit.quant.linear import QuantLinear
from lowbit.quant.quantizer import Quantizer
from lowbit.quant.recipe import format_from_data, spec_from_dict


def is_lowbit_checkpoint(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(path: str | Path) -> dict[str, Any]:
    return dict(json.loads((Path(path) / MANIFEST).read_text()))


def load_checkpoint(
    path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, dict[str, Any] | None]:
    """(model, manifest): a lowbit checkpoint with its quantization applied, or a plain Hugging Face model
    (manifest None). Exports are read by `lowbit.loader.load_model`."""
    from lowbit.models.loading import auto_model_class, load_config, resolve_model

    model_dir = resolve_model(str(path))
    try:
        model = auto_model_class(load_config(model_dir)).from_pretrained(model_dir, dtype=dtype)
    except (OSError, ValueError) as e:
        raise LowbitError(f"{model_dir}: cannot load the model ({str(e).splitlines()[0]})") from None
    model.eval()
    manifest = read_manifest(model_dir) if is_lowbit_checkpoint(model_dir) else None
    if manifest is not None:
        apply_quantization(model, model_dir, manifest)
    model.to(device)
    return model, manifest


def apply_quantization(model: nn.Module, ckpt: Path, manifest: dict[str, Any]) -> None:
    """Wrap the modules named in the manifest and load their quantizer statistics (MoE experts first become
    one Linear per projection, as they were quantized)."""
    from lowbit.models.conv1d import conv1d_names, linearize
    from lowbit.models.moe import unfuse_known

    unfuse_known(model)
    linearize(model, conv1d_names(model) & set(manifest["modules"]))  # GPT-2's quantized Conv1D layers
    for name, spec_data in manifest["modules"].items():
        spec = spec_from_dict(spec_data)
        linear = model.get_submodule(name)
        if spec is None or not isinstance(linear, nn.Linear):
            raise LowbitError(
                f"{ckpt}: {MANIFEST} names {name} as a quantized Linear; the checkpoint is damaged"
            )
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, QuantLinear(linear, spec))
    kv = manifest["recipe"].get("kv_cache")
    if kv:
        fmt = format_from_data(kv, "kv_cache")
        for module in model.modules():
            if is_attention(module):
                for attr in KV_QUANTIZERS:
                    module.add_module(attr, Quantizer(fmt))
        use_kv_attention(model)
    for file in sorted(ckpt.glob("quantizers-*.safetensors")):
        load_quantizer_stats(model, load_file(str(file)))


def load_quantizer_stats(root: nn.Module, tensors: dict[str, torch.Tensor], prefix: str = "") -> None:
    """Set quantizer statistics from {full name of quantizer.stat: tensor}."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        qname, _, stat = key.rpartition(".")
        grouped.setdefault(qname, {})[stat] = value
    for qname, stats in grouped.items():
        local = qname[len(prefix) + 1 :] if prefix else qname
        q = root.get_submodule(local)
        if not isinstance(q, Quantizer):
            raise LowbitError(
                f"quantizer statistics for {qname}, which is not a quantizer; the checkpoint is damaged"
            )
        q.load_stats(stats)

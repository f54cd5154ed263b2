"""`load_model(path)`: whatever lowbit can compute with, ready to run.

A lowbit quantized checkpoint (`checkpoint.load`), lowbit's own hf or compressed-tensors export
(`export.readback`), or a plain Hugging Face model. This sits above both `checkpoint` and `export`, so that
neither needs to know the other (docs/architecture.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.checkpoint.load import is_lowbit_checkpoint, load_checkpoint
from lowbit.export.readback import export_format, load_export
from lowbit.models.loading import resolve_model


def load_model(
    path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, dict[str, Any] | None]:
    """(model, manifest): the model with its quantization applied; manifest None for a plain model, a short
    summary for an export."""
    model_dir = resolve_model(str(path))
    exported = export_format(model_dir) if not is_lowbit_checkpoint(model_dir) else None
    if exported is not None:
        model, summary = load_export(model_dir, exported, dtype)
        model.to(device)
        return model, summary
    return load_checkpoint(model_dir, device, dtype)

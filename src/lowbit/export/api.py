"""`export(source, format, output)`: pick the exporter, stream the source through it, publish atomically."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from lowbit.errors import LowbitError
from lowbit.export.source import Source
from lowbit.export.writer import DEFAULT_SHARD_BYTES, ExportWriter


@dataclass(frozen=True)
class ExportOptions:
    dtype: torch.dtype | None = None  # unquantized tensors (None: the model's own dtype)
    decoder_type: str | None = None  # TensorRT-LLM decoder type override
    tp: int = 1  # TensorRT-LLM inference tensor parallelism
    pp: int = 1  # TensorRT-LLM inference pipeline parallelism
    overwrite: bool = False
    max_shard_bytes: int = DEFAULT_SHARD_BYTES
    progress: bool = True


Exporter = Callable[[Source, ExportWriter, ExportOptions], None]


EXPORTERS = {
    "hf": ("lowbit.export.hf", "export_hf"),
    "compressed-tensors": ("lowbit.export.compressed_tensors", "export_ct"),
    "trtllm": ("lowbit.export.trtllm", "export_trtllm"),
}
EXPORT_FORMATS = tuple(EXPORTERS)


def _exporter(fmt: str) -> Exporter:
    module, func = EXPORTERS[fmt]
    return getattr(importlib.import_module(module), func)


def export(
    source: str | Path | Source, fmt: str, output: str | Path, options: ExportOptions | None = None
) -> Path:
    """Export a lowbit checkpoint (or a plain model directory, as no_quant) to `fmt` in `output`."""
    options = options or ExportOptions()
    if fmt not in EXPORT_FORMATS:
        raise LowbitError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    if options.tp < 1 or options.pp < 1:
        raise LowbitError("--inference-tp and --inference-pp must be >= 1")
    if fmt != "trtllm" and (options.tp, options.pp) != (1, 1):
        raise LowbitError(f"--inference-tp/--inference-pp apply to --format trtllm only, not {fmt}")
    src = source if isinstance(source, Source) else Source(source)
    out = Path(output)
    if out.resolve() == src.dir.resolve():
        raise LowbitError("--output is the checkpoint itself; choose another directory")
    exporter = _exporter(fmt)
    rename = src.checkpoint_name if fmt != "trtllm" else None
    with ExportWriter(
        out, overwrite=options.overwrite, max_shard_bytes=options.max_shard_bytes, rename=rename
    ) as writer:
        exporter(src, writer, options)
        return writer.finish()

"""Writing the quantized checkpoint so that a crash never leaves a directory that looks complete.

Layout of OUTPUT (safetensors and JSON only):
    config.json, generation_config.json, tokenizer files   copied from the source model
    model-shell.safetensors                                 weights outside the decoder layers
    model-layer-00000.safetensors ...                       each decoder layer's weights (original dtype)
    quantizers-layer-00000.safetensors ...                  each layer's quantizer statistics (fp32)
    model.safetensors.index.json                            HF index over the weight files
    lowbit.json                                             version, source, recipe, algorithm, modules

Work happens in OUTPUT.partial; `lowbit-progress.json` there records the finished layers (each written to
a temporary name and renamed). `finish()` renames OUTPUT.partial to OUTPUT, so OUTPUT exists only when
complete. An existing OUTPUT is replaced only with `overwrite`, and only after the new one is complete.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lowbit.errors import LowbitError

MANIFEST = "lowbit.json"
PROGRESS = "lowbit-progress.json"
SHELL = "model-shell.safetensors"


def layer_file(i: int) -> str:
    return f"model-layer-{i:05d}.safetensors"


def quantizer_file(i: int) -> str:
    return f"quantizers-layer-{i:05d}.safetensors"


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"}
    )
    os.replace(tmp, path)


class CheckpointWriter:
    """Builds OUTPUT in OUTPUT.partial; `fingerprint` identifies the run so that --resume continues only
    the same model, recipe and calibration data."""

    def __init__(
        self, output: Path, fingerprint: dict[str, Any], resume: bool = False, overwrite: bool = False
    ):
        self.output = output
        self.partial = output.with_name(output.name + ".partial")
        self.fingerprint = fingerprint
        self.overwrite = overwrite
        if output.exists() and not overwrite:
            raise LowbitError(
                f"output {str(output)!r} already exists; pass --overwrite or choose another --output"
            )
        if self.partial.exists() and not resume:
            raise LowbitError(
                f"an interrupted run left {str(self.partial)!r}; "
                "pass --resume to continue it, or delete it to start over"
            )
        if resume and self.partial.exists():
            progress = self._progress()
            if progress.get("fingerprint") != fingerprint:
                raise LowbitError(
                    f"{self.partial} was made with other settings (model, recipe or calibration data); "
                    "rerun with the same settings, or delete it to start over"
                )
        self.created = not self.partial.exists()
        if self.created:
            self.partial.mkdir(parents=True)
            write_json(self.partial / PROGRESS, {"fingerprint": fingerprint, "layers_done": 0})

    def abandon(self) -> None:
        """Remove the partial output of a run that failed on bad input (a rerun would fail the same way).
        A partial directory that an earlier run left for --resume is kept."""
        if self.created:
            shutil.rmtree(self.partial, ignore_errors=True)

    def _progress(self) -> dict[str, Any]:
        try:
            return dict(json.loads((self.partial / PROGRESS).read_text()))
        except (OSError, ValueError):
            raise LowbitError(
                f"{self.partial}: no readable {PROGRESS}; delete the directory to start over"
            ) from None

    @property
    def progress_extra(self) -> dict[str, Any]:
        """What write_layer recorded with the last finished layer ({} for a new run)."""
        return dict(self._progress().get("extra", {}))

    @property
    def layers_done(self) -> int:
        return int(self._progress()["layers_done"])

    def write_shell(self, weights: dict[str, torch.Tensor]) -> None:
        save_tensors(self.partial / SHELL, weights)

    def write_layer(
        self,
        i: int,
        weights: dict[str, torch.Tensor],
        quantizers: dict[str, torch.Tensor],
        extra: dict[str, Any] | None = None,
    ) -> None:
        """Write layer i's files, then record it as done (with `extra`, e.g. the error report so far)."""
        if i != self.layers_done:
            raise RuntimeError(f"layer {i} written out of order (expected {self.layers_done})")
        save_tensors(self.partial / layer_file(i), weights)
        save_tensors(self.partial / quantizer_file(i), quantizers)
        progress = self._progress()
        progress["layers_done"] = i + 1
        progress["extra"] = extra or {}
        write_json(self.partial / PROGRESS, progress)

    def read_layer(self, i: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        return load_file(str(self.partial / layer_file(i))), load_file(str(self.partial / quantizer_file(i)))

    def finish(self, manifest: dict[str, Any], config: dict[str, Any], copy_files: list[Path]) -> Path:
        """Write the index, manifest, config and tokenizer files, then publish OUTPUT."""
        from safetensors import safe_open

        weight_map: dict[str, str] = {}
        total = 0
        for path in sorted(self.partial.glob("model-*.safetensors")):
            with safe_open(path, "pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    weight_map[key] = path.name
                    sl = f.get_slice(key)
                    total += _nbytes(sl.get_shape(), sl.get_dtype())
        write_json(
            self.partial / "model.safetensors.index.json",
            {"metadata": {"total_size": total}, "weight_map": weight_map},
        )
        write_json(self.partial / "config.json", config)
        for src in copy_files:
            shutil.copy2(src, self.partial / src.name)
        manifest = {**manifest, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        write_json(self.partial / MANIFEST, manifest)
        (self.partial / PROGRESS).unlink()
        return publish(self.partial, self.output)


def publish(partial: Path, output: Path) -> Path:
    """Rename the complete `partial` directory to `output`, replacing an existing output only now."""
    if output.exists():
        old = output.with_name(output.name + ".replaced")
        if old.exists():
            shutil.rmtree(old)
        os.replace(output, old)
        os.replace(partial, output)
        shutil.rmtree(old)
    else:
        os.replace(partial, output)
    return output


_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "BOOL": 1,
}


def _nbytes(shape: list[int], dtype: str) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * _DTYPE_BYTES.get(dtype, 4)

"""Writing an export directory: every tensor checked before it is written, the directory published only when
complete.

Work happens in OUTPUT.partial; tensors are buffered and flushed to shard files of at most `max_shard_bytes`.
`finish()` renames the shards to the Hugging Face convention (`model-00001-of-00003.safetensors`, or
`model.safetensors` for one), writes the index and the JSON files, then renames OUTPUT.partial to OUTPUT. A
failure anywhere removes OUTPUT.partial, so OUTPUT exists only when complete. An existing OUTPUT is
replaced only with `overwrite`, and only once the new one is complete.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from lowbit.checkpoint.store import publish
from lowbit.errors import LowbitError

DEFAULT_SHARD_BYTES = 5 * 2**30


def check_tensor(
    name: str, t: Tensor, dtype: torch.dtype | None = None, shape: tuple[int, ...] | None = None
) -> None:
    """Raise if t is not finite (floating dtypes) or differs from the declared dtype / shape."""
    if dtype is not None and t.dtype != dtype:
        raise LowbitError(
            f"export: {name} has dtype {t.dtype}, the format declares {dtype}; this is a lowbit bug"
        )
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise LowbitError(
            f"export: {name} has shape {tuple(t.shape)}, the format declares {tuple(shape)}; this is a lowbit bug"
        )
    if t.is_floating_point() and t.numel():
        finite = torch.isfinite(t.float()) if t.element_size() == 1 else torch.isfinite(t)
        if not bool(finite.all()):
            raise LowbitError(
                f"export: {name} has NaN or Inf values; the checkpoint is damaged (re-run quantize)"
            )


SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}  # fmt: skip


class StreamingSafetensors:
    """A safetensors file written one tensor at a time: data goes to a side file as it comes, and `close`
    writes the header and then the data, so memory holds one tensor, not the file's contents."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data_path = path.with_name(path.name + ".data")
        self._data = self.data_path.open("wb")
        self._entries: dict[str, dict[str, Any]] = {}
        self._offset = 0

    def add(self, name: str, t: Tensor) -> None:
        if name in self._entries:
            raise LowbitError(
                f"export: tensor {name} written twice to {self.path.name}; this is a lowbit bug"
            )
        check_tensor(f"{self.path.name}:{name}", t)
        flat = t.detach().contiguous().cpu().reshape(-1)
        raw = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
        self._data.write(raw)
        dtype = SAFETENSORS_DTYPES[t.dtype]
        self._entries[name] = {
            "dtype": dtype,
            "shape": list(t.shape),
            "data_offsets": [self._offset, self._offset + len(raw)],
        }
        self._offset += len(raw)

    def close(self) -> None:
        self._data.close()
        header = json.dumps({"__metadata__": {"format": "pt"}, **dict(sorted(self._entries.items()))},
                            separators=(",", ":")).encode()  # fmt: skip
        header += b" " * (-len(header) % 8)
        with self.path.open("wb") as out, self.data_path.open("rb") as data:
            out.write(len(header).to_bytes(8, "little"))
            out.write(header)
            shutil.copyfileobj(data, out, 1 << 24)
        self.data_path.unlink()


class ExportWriter:
    """Context manager building OUTPUT; `add` tensors, `write_json` / `copy` files, then `finish`."""

    def __init__(self, output: str | Path, overwrite: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 shard_prefix: str = "model", rename: Callable[[str], str] | None = None) -> None:  # fmt: skip
        self.output = Path(output)
        self.rename = rename  # module names -> the names the original checkpoint (and engines) use
        self.partial = self.output.with_name(self.output.name + ".partial")
        if self.output.exists() and not overwrite:
            raise LowbitError(
                f"output {str(self.output)!r} already exists; pass --overwrite or choose another --output"
            )
        self.max_shard_bytes = max_shard_bytes
        self.shard_prefix = shard_prefix
        self._buffer: dict[str, Tensor] = {}
        self._buffer_bytes = 0
        self._shards: list[tuple[str, list[str], int]] = []  # (temporary file name, keys, bytes)
        self._names: set[str] = set()

    def __enter__(self) -> ExportWriter:
        if self.partial.exists():
            shutil.rmtree(self.partial)  # an export is cheap to redo; a stale partial one is never resumed
        self.partial.mkdir(parents=True)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            shutil.rmtree(self.partial, ignore_errors=True)

    def add(
        self, name: str, t: Tensor, dtype: torch.dtype | None = None, shape: tuple[int, ...] | None = None
    ) -> None:
        """Queue one tensor for the sharded weights (checked first)."""
        if self.rename is not None:
            name = self.rename(name)
        if name in self._names:
            raise LowbitError(f"export: tensor {name} written twice; this is a lowbit bug")
        check_tensor(name, t, dtype, shape)
        t = t.detach().contiguous().cpu()
        self._names.add(name)
        self._buffer[name] = t
        self._buffer_bytes += t.numel() * t.element_size()
        if self._buffer_bytes >= self.max_shard_bytes:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        tmp = f"shard-{len(self._shards):05d}.tmp"
        save_file(self._buffer, str(self.partial / tmp), metadata={"format": "pt"})
        self._shards.append((tmp, list(self._buffer), self._buffer_bytes))
        self._buffer, self._buffer_bytes = {}, 0

    def stream_file(self, file_name: str) -> StreamingSafetensors:
        """A safetensors file outside the sharded set, written tensor by tensor (TensorRT-LLM rank files)."""
        return StreamingSafetensors(self.partial / file_name)

    def write_json(self, file_name: str, data: Any) -> None:
        (self.partial / file_name).write_text(json.dumps(data, indent=2) + "\n")

    def copy(self, files: list[Path]) -> None:
        for src in files:
            shutil.copy2(src, self.partial / src.name)

    def finish(self) -> Path:
        """Name the shards, write the index, publish OUTPUT."""
        self.flush()
        n = len(self._shards)
        if n:
            weight_map: dict[str, str] = {}
            total = 0
            for i, (tmp, keys, nbytes) in enumerate(self._shards):
                final = (
                    f"{self.shard_prefix}.safetensors"
                    if n == 1
                    else f"{self.shard_prefix}-{i + 1:05d}-of-{n:05d}.safetensors"
                )
                os.replace(self.partial / tmp, self.partial / final)
                weight_map.update(dict.fromkeys(keys, final))
                total += nbytes
            if n > 1:
                self.write_json(
                    f"{self.shard_prefix}.safetensors.index.json",
                    {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
                )
        return publish(self.partial, self.output)

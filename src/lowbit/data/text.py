"""Text sources -> token windows.

Sources: a local `.txt` (one document), `.jsonl` (a `text` field per line), `.parquet` (a `text` column),
or a `datasets` name present in the local cache. Documents are tokenized without special tokens, joined
with the EOS token into one stream, and cut into consecutive non-overlapping windows of `seq_len` tokens.
Calibration takes `n` windows chosen by a seeded permutation (same seed, same samples); evaluation takes
the first `max_samples` windows in order.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lowbit.errors import LowbitError

log = logging.getLogger(__name__)
DEFAULT_CALIB = Path(__file__).resolve().parent.parent / "assets" / "text" / "calib.txt"
DEFAULT_EVAL = Path(__file__).resolve().parent.parent / "assets" / "text" / "eval.txt"
# C0 control characters and DEL, less tab, newlines, vertical tab and form feed (which text does hold)
CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]")
MAX_CONTROL_SHARE = 0.1  # more than one character in ten a control character: binary data, not text
NOT_TEXT_FIX = "pass a .txt/.jsonl/.parquet file of UTF-8 text"


def read_texts(source: str | Path) -> list[str]:
    """Documents of a text source (see module docstring)."""
    path = Path(source)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return _read_jsonl(path)
        if suffix == ".parquet":
            return _read_parquet(path)
        return [read_utf8(path)]
    if path.suffix.lower() in {".txt", ".jsonl", ".parquet", ".json"} or (
        "/" in str(source) and path.parent.exists()
    ):
        raise LowbitError(f"data file {str(source)!r} does not exist; pass a .txt, .jsonl or .parquet file")
    return _read_dataset(str(source))


def read_utf8(path: Path) -> str:
    """The file as text; a LowbitError where its bytes are not UTF-8 text (binary data, another encoding)."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LowbitError(f"{path}: not text (invalid UTF-8 at byte {e.start}); {NOT_TEXT_FIX}") from None
    nul = data.find(b"\0")
    if nul >= 0:
        raise LowbitError(f"{path}: not text (NUL byte at byte {nul}); {NOT_TEXT_FIX}")
    controls = len(CONTROL.findall(text))
    if controls > MAX_CONTROL_SHARE * len(text):
        raise LowbitError(
            f"{path}: not text ({controls} of {len(text)} characters are control characters); {NOT_TEXT_FIX}"
        )
    return text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as read_text gives


def _read_jsonl(path: Path) -> list[str]:
    texts = []
    for i, line in enumerate(read_utf8(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise LowbitError(
                f"{path}:{i}: not valid JSON; each line of a .jsonl file is one JSON object"
            ) from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise LowbitError(f"{path}:{i}: no 'text' string field; each line needs {{\"text\": ...}}")
        texts.append(row["text"])
    return texts


def _read_parquet(path: Path) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise LowbitError("reading .parquet needs pyarrow; pip install 'lowbit[data]'") from None
    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise LowbitError(
            f"{path}: not a readable .parquet file ({str(e).splitlines()[0]}); {NOT_TEXT_FIX}"
        ) from None
    if "text" not in table.column_names:
        raise LowbitError(f"{path}: no 'text' column (columns: {', '.join(table.column_names)}); rename it")
    return [str(t) for t in table.column("text").to_pylist() if t]


def _read_dataset(name: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise LowbitError(
            f"{name!r} is not a file, and reading dataset names needs the datasets package; "
            "pass a local .txt/.jsonl/.parquet file or pip install 'lowbit[data]'"
        ) from None
    dataset_name, _, config = name.partition(":")
    try:
        ds: Any = datasets.load_dataset(
            dataset_name, config or None, split="train", download_mode="reuse_cache_if_exists"
        )
    except Exception as e:  # the datasets library raises many types for "not cached / offline"
        raise LowbitError(
            f"dataset {name!r} is neither a local file nor in the local datasets cache ({type(e).__name__}); "
            "pass a local .txt/.jsonl/.parquet file"
        ) from None
    if "text" not in ds.column_names:
        raise LowbitError(f"dataset {name!r} has no 'text' column (columns: {', '.join(ds.column_names)})")
    return [t for t in ds["text"] if t]


def token_stream(texts: list[str], tokenizer: Any) -> Tensor:
    """All documents as one int64 stream: tokens of each document (no special tokens), EOS between them."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for i, text in enumerate(texts):
        if i and eos is not None:
            ids.append(eos)
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
    return torch.tensor(ids, dtype=torch.long)


def windows(stream: Tensor, seq_len: int) -> Tensor:
    """Consecutive non-overlapping windows (n, seq_len); the remainder is dropped."""
    n = stream.numel() // seq_len
    return stream[: n * seq_len].reshape(n, seq_len)


def calibration_windows(source: str | Path, tokenizer: Any, n: int, seq_len: int, seed: int = 0) -> Tensor:
    """`n` windows of `seq_len` tokens chosen by a seeded permutation, kept in stream order."""
    if n < 1 or seq_len < 2:
        raise LowbitError(f"--calib-size ({n}) must be >= 1 and --calib-seq-len ({seq_len}) >= 2")
    all_windows = windows(token_stream(read_texts(source), tokenizer), seq_len)
    if len(all_windows) == 0:
        raise LowbitError(
            f"calibration data {str(source)!r} is shorter than one window of {seq_len} tokens; "
            "give more text or lower --calib-seq-len"
        )
    if len(all_windows) < n:
        log.warning(
            "calibration data has %d windows of %d tokens, fewer than --calib-size %d: using all",
            len(all_windows),
            seq_len,
            n,
        )
        return all_windows
    generator = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(all_windows), generator=generator)[:n].sort().values
    return all_windows[pick]


def eval_windows(source: str | Path, tokenizer: Any, seq_len: int, max_samples: int | None = None) -> Tensor:
    """The first `max_samples` consecutive windows of `seq_len` tokens of the source."""
    all_windows = windows(token_stream(read_texts(source), tokenizer), seq_len)
    if len(all_windows) == 0:
        raise LowbitError(
            f"evaluation data {str(source)!r} is shorter than one window of {seq_len} tokens; "
            "give more text or lower --seq-len"
        )
    return all_windows if max_samples is None else all_windows[:max_samples]

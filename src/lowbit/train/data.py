"""Training windows and their order.

The order depends only on (data, seq_length, seed, global batch size), never on the number of processes:
epoch e is a permutation of the windows seeded by (seed, e), the samples are that endless sequence, and
iteration i trains on samples [i * G, (i + 1) * G). Rank r of W takes the contiguous slice r of that global
batch. A resumed run therefore sees exactly the batches the uninterrupted run would have.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lowbit.data.text import DEFAULT_CALIB, read_texts, token_stream, windows
from lowbit.errors import LowbitError


@dataclass
class TrainData:
    train: Tensor  # (n, seq_length) int64
    eval: Tensor  # (m, seq_length)
    source: str


def load_data(
    path: str | None, eval_path: str | None, tokenizer: Any, seq_length: int, n_eval: int
) -> TrainData:
    """Windows of `path` (default: the built-in text); eval windows from `eval_path`, or else the last
    `n_eval` windows of `path`, which are then not trained on."""
    source = path or str(DEFAULT_CALIB)
    all_windows = windows(token_stream(read_texts(source), tokenizer), seq_length)
    if eval_path is not None:
        held_out = windows(token_stream(read_texts(eval_path), tokenizer), seq_length)[:n_eval]
        train = all_windows
    else:
        train, held_out = all_windows[: len(all_windows) - n_eval], all_windows[len(all_windows) - n_eval :]
    if len(train) == 0:
        raise LowbitError(
            f"data.path {source!r} gives {len(all_windows)} windows of {seq_length} tokens, none left to train "
            f"on after {n_eval} held out for eval; give more text, lower data.seq_length or set data.eval_path"
        )
    if n_eval and len(held_out) == 0:
        raise LowbitError(
            f"data.eval_path {eval_path!r} is shorter than one window of {seq_length} tokens; give more text"
        )
    return TrainData(train, held_out, str(Path(source)))


class Order:
    """Which windows iteration i trains on (see the module docstring)."""

    def __init__(self, n: int, global_batch: int, seed: int) -> None:
        self.n, self.global_batch, self.seed = n, global_batch, seed
        self._perms: dict[int, Tensor] = {}

    def _perm(self, epoch: int) -> Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=g)}  # one epoch at a time is enough
        return self._perms[epoch]

    def batch(self, iteration: int) -> Tensor:
        """Indices of the global batch of `iteration` (0-based)."""
        start = iteration * self.global_batch
        idx = [self._perm(k // self.n)[k % self.n] for k in range(start, start + self.global_batch)]
        return torch.stack(idx)

    def rank_batch(self, iteration: int, rank: int, world: int) -> Tensor:
        per_rank = self.global_batch // world
        return self.batch(iteration)[rank * per_rank : (rank + 1) * per_rank]

    def epoch_of(self, iteration: int) -> float:
        return iteration * self.global_batch / self.n

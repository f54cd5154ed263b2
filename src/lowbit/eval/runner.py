"""Running models over evaluation windows."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lowbit.eval.metrics import MetricSums


@torch.no_grad()
def evaluate(
    model: nn.Module,
    windows: Tensor,
    base: nn.Module | None = None,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> dict[str, float | int | None]:
    """ppl of `model` on `windows` (n, T); with `base`, also base_ppl, KL(base || model) and top-1 agreement."""
    sums = MetricSums()
    for batch in tqdm(windows.split(batch_size), desc="eval", unit="batch", disable=not progress):
        ids = batch.to(device)
        logits = model(input_ids=ids, use_cache=False).logits
        base_logits = base(input_ids=ids, use_cache=False).logits if base is not None else None
        sums.add(logits, ids, base_logits)
    return sums.result()

"""Running models over evaluation windows."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lowbit.eval.metrics import BaseBatch, MetricSums, base_batch


@dataclass
class BaseOutputs:
    """The base model's side of the metrics on every batch of `windows` (`base_outputs`): evaluating several
    models against it runs the base model once. Holds windows x (T - 1) x vocab float32 log-probabilities."""

    windows: Tensor
    batch_size: int
    batches: list[BaseBatch]

    @property
    def ppl(self) -> float:
        """The base model's perplexity: what `evaluate(base, windows)["ppl"]` gives."""
        nll = 0.0
        for b in self.batches:
            nll -= b.log_likelihood
        return math.exp(nll / max(sum(b.top1.numel() for b in self.batches), 1))


@torch.no_grad()
def base_outputs(
    base: nn.Module,
    windows: Tensor,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> BaseOutputs:
    """Run `base` once over `windows` (n, T) in batches of `batch_size`, keeping what `evaluate` compares with."""
    batches = []
    with _inference(base):
        for batch in tqdm(windows.split(batch_size), desc="base", unit="batch", disable=not progress):
            ids = batch.to(device)
            batches.append(base_batch(base(input_ids=ids, use_cache=False).logits, ids))
    return BaseOutputs(windows, batch_size, batches)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    windows: Tensor,
    base: nn.Module | BaseOutputs | None = None,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> dict[str, float | int | None]:
    """ppl of `model` on `windows` (n, T); with `base` (a model, or its `base_outputs` on these windows), also
    base_ppl, KL(base || model) and top-1 agreement. Models run in eval mode (their modes are restored after)."""
    kept = base if isinstance(base, BaseOutputs) else None
    if kept is not None and (kept.batch_size != batch_size or not torch.equal(kept.windows, windows)):
        raise ValueError(
            f"base_outputs were computed on other windows or batch size ({kept.batch_size}, not {batch_size}); "
            "compute them on the windows evaluated here"
        )
    base_model = base if isinstance(base, nn.Module) else None
    sums = MetricSums()
    batches = tqdm(windows.split(batch_size), desc="eval", unit="batch", disable=not progress)
    with _inference(model), _inference(base_model):
        for i, batch in enumerate(batches):
            ids = batch.to(device)
            logits = model(input_ids=ids, use_cache=False).logits
            if kept is not None:
                sums.add(logits, ids, kept.batches[i])
            elif base_model is not None:
                sums.add(logits, ids, base_model(input_ids=ids, use_cache=False).logits)
            else:
                sums.add(logits, ids)
    return sums.result()


@contextlib.contextmanager
def _inference(model: nn.Module | None) -> Iterator[None]:
    """Every module of `model` in eval mode inside (no dropout; a QuantLinear caches its fake-quantized weight
    instead of computing it again each batch); each module's own mode back after."""
    modes = [(m, m.training) for m in model.modules()] if model is not None else []
    for m, _ in modes:
        m.training = False
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode

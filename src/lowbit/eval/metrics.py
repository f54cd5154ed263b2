"""Language-model quality metrics over token windows (pure torch; importable without transformers).

For a window of T tokens the model predicts tokens 1..T-1 from their prefixes.
- ppl        = exp(mean NLL of the true next token)                        over all predicted tokens
- kl         = mean KL(P_base || P_quant) = sum_v p_base (log p_base - log p_quant), nats per token
- top1_agree = fraction of positions where argmax P_quant == argmax P_base
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class BaseBatch:
    """The base model's side of the metrics on one batch, computed once (`base_batch`) and compared against by
    any number of models: log P_base of positions 0..T-2, the summed log-likelihood of the true next tokens
    under it, and its argmax."""

    log_probs: Tensor  # (B, T-1, V) float32
    log_likelihood: float
    top1: Tensor  # (B, T-1)


@torch.no_grad()
def base_batch(base_logits: Tensor, input_ids: Tensor) -> BaseBatch:
    """base_logits (B, T, V), input_ids (B, T) -> their BaseBatch."""
    base_logp = F.log_softmax(base_logits[:, :-1].float(), dim=-1)
    labels = input_ids[:, 1:].unsqueeze(-1)
    return BaseBatch(base_logp, float(base_logp.gather(-1, labels).sum()), base_logp.argmax(-1))


@dataclass
class MetricSums:
    """Running sums; `result()` turns them into the reported metrics."""

    nll: float = 0.0
    base_nll: float = 0.0
    kl: float = 0.0
    agree: int = 0
    tokens: int = 0
    has_base: bool = False

    @torch.no_grad()
    def add(self, logits: Tensor, input_ids: Tensor, base: Tensor | BaseBatch | None = None) -> None:
        """logits: (B, T, V); input_ids: (B, T); base: the base model's logits (B, T, V), or what `base_batch`
        kept of them (the same sums, without computing the base side again)."""
        logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
        labels = input_ids[:, 1:].unsqueeze(-1)
        self.nll -= float(logp.gather(-1, labels).sum())
        self.tokens += labels.numel()
        if base is None:
            return
        self.has_base = True
        ref = base if isinstance(base, BaseBatch) else base_batch(base, input_ids)
        self.base_nll -= ref.log_likelihood
        kl = ref.log_probs.exp()
        self.kl += float(kl.mul_(ref.log_probs - logp).sum())  # p_base (log p_base - log p_quant)
        self.agree += int((ref.top1 == logp.argmax(-1)).sum())

    def result(self) -> dict[str, float | int | None]:
        has_base = self.has_base
        n = max(self.tokens, 1)
        return {
            "ppl": math.exp(self.nll / n),
            "base_ppl": math.exp(self.base_nll / n) if has_base else None,
            "kl": self.kl / n if has_base else None,
            "top1_agree": self.agree / n if has_base else None,
            "tokens": self.tokens,
        }

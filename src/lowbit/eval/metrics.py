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
    def add(self, logits: Tensor, input_ids: Tensor, base_logits: Tensor | None = None) -> None:
        """logits, base_logits: (B, T, V); input_ids: (B, T)."""
        logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
        labels = input_ids[:, 1:].unsqueeze(-1)
        self.nll -= float(logp.gather(-1, labels).sum())
        self.tokens += labels.numel()
        if base_logits is None:
            return
        self.has_base = True
        base_logp = F.log_softmax(base_logits[:, :-1].float(), dim=-1)
        self.base_nll -= float(base_logp.gather(-1, labels).sum())
        self.kl += float((base_logp.exp() * (base_logp - logp)).sum())
        self.agree += int((base_logp.argmax(-1) == logp.argmax(-1)).sum())

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

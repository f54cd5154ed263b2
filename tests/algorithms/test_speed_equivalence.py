"""Reused and trimmed computations give what the plain ones give, bit for bit: GPTQ with one Hessian factor
for several calls, its column loop against the textbook loop, evaluation against kept base outputs."""

from types import SimpleNamespace

import torch
from torch import nn

from lowbit.algorithms import gptq
from lowbit.eval.runner import base_outputs, evaluate
from lowbit.formats.scaled import INT4_G128, NVFP4, scale_map


def _reference_gptq(w, h, quantize_columns, block_size=128, damp=0.01):
    """GPTQ's column loop as published (every column of the block updated, the inverse factor per call)."""
    w, h = w.float().clone(), h.float().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    perm = torch.argsort(torch.diagonal(h), descending=True)
    w, h = w[:, perm], h[perm[:, None], perm]
    u, _ = gptq.inverse_hessian_factor(h, damp)
    n = w.shape[1]
    q = torch.zeros_like(w)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        w1, err, u1 = w[:, i1:i2].clone(), torch.zeros(w.shape[0], i2 - i1), u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i : i + 1]
            qc = quantize_columns(col, perm[i1 + i : i1 + i + 1])
            q[:, i1 + i] = qc[:, 0]
            e = (col[:, 0] - qc[:, 0]) / u1[i, i]
            w1[:, i:] -= e[:, None] * u1[i : i + 1, i:]
            err[:, i] = e
        w[:, i2:] -= err @ u[i1:i2, i2:]
    out = torch.empty_like(q)
    out[:, perm] = q
    return out


def _problem(seed, out=48, n=384):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2048, n, generator=g) @ (torch.eye(n) + 0.2 * torch.randn(n, n, generator=g))
    x[:, 7] = 0.0  # an input that is always zero
    return torch.randn(out, n, generator=g) * 0.05, x.t() @ x / len(x)


def test_gptq_loop_equals_the_textbook_loop():
    for fmt in (INT4_G128, NVFP4):
        w, h = _problem(0)
        m = scale_map(w, fmt)
        ours, _ = gptq.gptq_quantize(w, h, m.fake_quant, block_size=64)
        assert torch.equal(ours, _reference_gptq(w, h, m.fake_quant, block_size=64))


def test_one_hessian_factor_serves_every_weight_and_round():
    w, h = _problem(1)
    factor = gptq.factor_hessian(h, 0.01, act_order=True)
    for weight in (w, w * 0.5 + 0.01, torch.flip(w, (0,))):
        m = scale_map(weight, INT4_G128)
        fresh = gptq.gptq_quantize(weight, h, m.fake_quant)
        shared = gptq.gptq_quantize(weight, h, m.fake_quant, factor=factor)
        assert torch.equal(fresh[0], shared[0]) and fresh[1] == shared[1]


class _TinyLM(nn.Module):
    """Logits from an embedding, a Linear and dropout; records the mode of each forward."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed, self.head, self.drop = nn.Embedding(50, 16), nn.Linear(16, 50), nn.Dropout(0.5)
        self.modes: list[bool] = []

    def forward(self, input_ids, use_cache=False):
        self.modes.append(self.training)
        return SimpleNamespace(logits=self.head(self.drop(self.embed(input_ids))))


def test_evaluate_against_kept_base_outputs_equals_evaluate_against_the_base_model():
    windows = torch.randint(0, 50, (20, 12), generator=torch.Generator().manual_seed(0))
    base, model = _TinyLM(0), _TinyLM(1)
    base.train()  # evaluation runs in eval mode and leaves each module's mode as it was
    kept = base_outputs(base, windows, batch_size=8, progress=False)
    direct = evaluate(model, windows, base, batch_size=8, progress=False)
    assert evaluate(model, windows, kept, batch_size=8, progress=False) == direct
    assert kept.ppl == evaluate(base, windows, batch_size=8, progress=False)["ppl"] == direct["base_ppl"]
    assert base.training and base.drop.training and model.training
    assert not any(base.modes) and not any(model.modes)

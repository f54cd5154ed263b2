"""Perplexity, KL and top-1 agreement against hand computations."""

import math

import torch

from lowbit.eval.metrics import MetricSums


def test_identical_models_have_zero_kl_full_agreement():
    logits = torch.randn(2, 5, 11)
    ids = torch.randint(0, 11, (2, 5))
    s = MetricSums()
    s.add(logits, ids, logits.clone())
    r = s.result()
    assert abs(r["kl"]) < 1e-6 and r["top1_agree"] == 1.0 and r["tokens"] == 8
    assert math.isclose(r["ppl"], r["base_ppl"])


def test_against_hand_computation():
    base = torch.tensor([[[2.0, 0.0], [0.0, 0.0]]])
    quant = torch.tensor([[[0.0, 1.0], [5.0, 0.0]]])
    ids = torch.tensor([[0, 1]])  # one predicted token: position 0 predicts id 1
    s = MetricSums()
    s.add(quant, ids, base)
    r = s.result()
    p = torch.softmax(base[0, 0], -1)
    q = torch.softmax(quant[0, 0], -1)
    assert math.isclose(r["kl"], float((p * (p / q).log()).sum()), rel_tol=1e-6)
    assert math.isclose(r["ppl"], float(1 / q[1]), rel_tol=1e-6)
    assert math.isclose(r["base_ppl"], float(1 / p[1]), rel_tol=1e-6)
    assert r["top1_agree"] == 0.0

"""On the trained pydocs-llama from ../shared (skipped where ../shared is absent): real quality checks."""

import pytest
import torch
from transformers import AutoTokenizer

from lowbit.algorithms.layerwise import quantize_checkpoint
from lowbit.data.text import calibration_windows, eval_windows
from lowbit.eval.runner import evaluate
from lowbit.loader import load_model
from lowbit.quant import preset

from .conftest import SHARED

MODEL = SHARED / "models" / "pydocs-llama"
DATA = SHARED / "data" / "pydocs"
pytestmark = [pytest.mark.shared, pytest.mark.skipif(not MODEL.is_dir(), reason="../shared is absent")]


@pytest.fixture(scope="module")
def setup():
    tok = AutoTokenizer.from_pretrained(MODEL)
    calib = calibration_windows(DATA / "calib.txt", tok, 32, 256)
    windows = eval_windows(DATA / "eval.txt", tok, 256, 16)
    base, _ = load_model(MODEL)
    return calib, windows, base


def test_quality_order_follows_bit_width_on_a_trained_model(setup, tmp_path):
    calib, windows, base = setup
    kl = {}
    for name in ("int8_wo", "fp8", "nvfp4", "int4_awq"):
        out = quantize_checkpoint(MODEL, preset(name), tmp_path / name, calib, progress=False).output
        model, _ = load_model(out)
        result = evaluate(model, windows, base, progress=False)
        kl[name] = result["kl"]
        assert result["top1_agree"] > 0.7, (name, result)
    assert kl["int8_wo"] < kl["fp8"] < kl["nvfp4"]
    assert kl["int8_wo"] < kl["int4_awq"]
    assert kl["nvfp4"] < 0.1 and kl["int4_awq"] < 0.1
    with torch.no_grad():
        assert evaluate(base, windows, progress=False)["ppl"] < 60

"""StarCoder / SantaCoder (gpt_bigcode): decoder layers called with positional arguments, LayerNorm with bias
as the smoothing fold target, fused c_attn; quantize -> AWQ / SmoothQuant -> export -> read back."""

import pytest
import torch

from lowbit.cli import main
from lowbit.loader import load_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bigcode(tiny_factory):
    return tiny_factory("gpt_bigcode", 2, multi_query=True)


@pytest.mark.parametrize(("preset", "algorithm"), [("int4_awq", "awq_full"), ("int8_sq", "smoothquant")])
def test_gpt_bigcode_smooths_exports_and_reads_back(bigcode, text_file, tmp_path, capsys, preset, algorithm):
    ckpt = tmp_path / "q"
    args = ["quantize", "--model", str(bigcode), "--qformat", preset, "--algorithm", algorithm, "--calib-data",
            str(text_file), "--calib-size", "8", "--calib-seq-len", "64", "--output", str(ckpt), "-q"]  # fmt: skip
    assert main(args) == 0
    manifest = (ckpt / "lowbit.json").read_text()
    assert f'"algorithm": "{algorithm}"' in manifest  # smoothing ran (an unknown family would skip it)
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    model, _ = load_model(ckpt)
    base, _ = load_model(bigcode)
    with torch.no_grad():
        logits, base_logits = model(ids).logits, base(ids).logits
    assert torch.isfinite(logits).all()
    kl = torch.nn.functional.kl_div(logits.log_softmax(-1), base_logits.log_softmax(-1), log_target=True,
                                    reduction="batchmean")  # fmt: skip
    assert float(kl) / ids.shape[1] < 0.05
    for fmt in ("hf", "compressed-tensors"):
        out = tmp_path / fmt
        assert main(["export", "--checkpoint", str(ckpt), "--format", fmt, "--output", str(out), "-q"]) == 0
        exported, _ = load_model(out)
        with torch.no_grad():
            torch.testing.assert_close(
                exported(ids).logits, logits, rtol=0, atol=1e-4 * float(logits.abs().max())
            )
    capsys.readouterr()
    assert (
        main(["export", "--checkpoint", str(ckpt), "--format", "trtllm", "--output", str(tmp_path / "t")])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert "no TensorRT-LLM tensor names" in err and "--format hf" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "t").exists()

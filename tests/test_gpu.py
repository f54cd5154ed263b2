"""On a CUDA GPU (skipped without one): the pipeline gives the CPU's result."""

import pytest
import torch

from lowbit.algorithms.layerwise import quantize_checkpoint
from lowbit.loader import load_model
from lowbit.quant import preset

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("name", ["fp8", "nvfp4", "int4_awq"])
def test_cuda_matches_cpu(tiny_llama, calib_ids, tmp_path, name):
    cpu = quantize_checkpoint(
        tiny_llama, preset(name), tmp_path / "cpu", calib_ids, device="cpu", progress=False
    )
    gpu = quantize_checkpoint(
        tiny_llama, preset(name), tmp_path / "gpu", calib_ids, device="cuda", progress=False
    )
    a, _ = load_model(cpu.output)
    b, _ = load_model(gpu.output, "cuda")
    ids = calib_ids[:2]
    with torch.no_grad():
        assert torch.allclose(a(ids).logits, b(ids.cuda()).logits.cpu(), atol=1e-3, rtol=1e-3)

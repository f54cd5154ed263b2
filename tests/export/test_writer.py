"""ExportWriter and StreamingSafetensors: what they write is what safetensors reads; failures leave nothing."""

import pytest
import torch
from safetensors.torch import load_file

from lowbit.errors import LowbitError
from lowbit.export.writer import ExportWriter, StreamingSafetensors


def test_streamed_file_reads_back_with_safetensors(tmp_path):
    tensors = {
        "b.weight": torch.randn(5, 3, dtype=torch.bfloat16),
        "a.scale": torch.tensor(0.25),
        "c.fp8": torch.randn(4, 4).to(torch.float8_e4m3fn),
        "d.packed": torch.randint(-(2**31), 2**31 - 1, (2, 3), dtype=torch.int32),
        "e.u8": torch.randint(0, 255, (7,), dtype=torch.uint8),
        "f.shape": torch.tensor([2, 8], dtype=torch.int64),
    }
    f = StreamingSafetensors(tmp_path / "x.safetensors")
    for k, v in tensors.items():
        f.add(k, v)
    f.close()
    got = load_file(str(tmp_path / "x.safetensors"))
    assert set(got) == set(tensors)
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype and torch.equal(
            got[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)
        ), k
    assert not (tmp_path / "x.safetensors.data").exists()


def test_writer_refuses_non_finite_and_wrong_declarations(tmp_path):
    out = tmp_path / "o"
    with pytest.raises(LowbitError, match="NaN or Inf"), ExportWriter(out) as w:
        w.add("ok", torch.ones(2))
        w.add("bad", torch.tensor([1.0, float("inf")]))
    assert not out.exists() and not (tmp_path / "o.partial").exists()
    with pytest.raises(LowbitError, match="declares"), ExportWriter(out) as w:
        w.add("x", torch.ones(2, 2), torch.float32, (4,))
    assert not out.exists() and not (tmp_path / "o.partial").exists()


def test_writer_publishes_only_on_finish(tmp_path):
    out = tmp_path / "o"
    with ExportWriter(out, max_shard_bytes=16) as w:
        for i in range(3):
            w.add(f"t{i}", torch.full((4,), float(i)))
        assert not out.exists()
        w.finish()
    assert sorted(p.name for p in out.iterdir()) == [
        "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors", "model.safetensors.index.json",
    ]  # fmt: skip

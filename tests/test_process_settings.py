"""Process-wide settings (glibc's allocator bounds) are the entry point's: a library call leaves them alone."""

import ctypes

import torch

from lowbit.models import loading

_LIBC = ctypes.CDLL("libc.so.6")


class _Recorder:
    """libc with mallopt recorded (and still applied)."""

    def __init__(self, calls: list) -> None:
        self._libc = _LIBC
        self._calls = calls

    def mallopt(self, param: int, value: int) -> int:
        self._calls.append((param, value))
        return int(self._libc.mallopt(param, value))

    def __getattr__(self, name: str):
        return getattr(self._libc, name)


def test_quantize_checkpoint_changes_no_allocator_setting_of_an_unbounded_process(
    tiny_llama, calib_ids, tmp_path, monkeypatch
):
    from lowbit.algorithms.layerwise import quantize_checkpoint
    from lowbit.quant import preset

    calls: list = []
    monkeypatch.setattr(loading.ctypes, "CDLL", lambda name: _Recorder(calls))
    monkeypatch.setattr(loading._Heap, "bounded", False)  # a Python program that never called bound_heap
    quantize_checkpoint(tiny_llama, preset("int8_sq"), tmp_path / "o", calib_ids[:4], progress=False)
    assert calls == []
    monkeypatch.setattr(loading._Heap, "bounded", True)  # the command line's process: bounds restored on exit
    with loading.reused_heap():
        torch.ones(4)
    assert calls[-2:] == [(loading.M_MMAP_THRESHOLD, loading.MMAP_THRESHOLD),
                          (loading.M_TRIM_THRESHOLD, loading.TRIM_THRESHOLD)]  # fmt: skip

"""Where the memory of lowbit's layer-by-layer quantization goes: RSS per phase and per decoder layer.

Runs `quantize_checkpoint` in this process with the arguments `lowbit quantize --qformat fp8 --device cpu`
uses, and wraps, from outside (lowbit's code is not changed), the phases that `layerwise.py` calls:
`_capture_inputs`, `materialize`, `calibrate_layer`, `_advance` and `CheckpointWriter.write_layer`. A thread
samples this process's RSS every few milliseconds; for each phase it prints the RSS before and after and
the highest sample during it. At the start of each decoder layer it also prints the bytes of all live CPU
tensors (found with `gc`, each storage counted once): if RSS grows from layer to layer while live tensor
bytes stay flat, nothing is leaked by lowbit and the growth is memory the allocator keeps.

    python benchmarks/memory/diagnose.py --model .bench/memory/llama-8L
    MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/memory/diagnose.py --model .bench/memory/llama-8L
    python benchmarks/memory/diagnose.py --model .bench/memory/llama-8L --calib-batch-size 4
    python benchmarks/memory/diagnose.py --model .bench/memory/llama-8L --drop-previous

--drop-previous empties, in place, the dicts `state`, `weights` and `stats` that `_run` keeps from the
previous layer until it reassigns them after the next layer's calibration (what `del` after
`write_layer` would do), to measure what holding them costs.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lowbit.algorithms import layerwise
from lowbit.checkpoint.store import CheckpointWriter
from lowbit.data.text import DEFAULT_CALIB, calibration_windows
from lowbit.quant.recipe import preset

GB = 1e9
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class Sampler(threading.Thread):
    """Keeps the highest RSS seen since the last `reset`."""

    def __init__(self, interval: float) -> None:
        super().__init__(daemon=True)
        self.interval, self.high = interval, rss()

    def run(self) -> None:
        while True:
            self.high = max(self.high, rss())
            time.sleep(self.interval)

    def reset(self) -> int:
        now = rss()
        self.high = now
        return now


def live_tensor_bytes() -> int:
    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
                st = obj.untyped_storage()
                seen[st.data_ptr()] = st.nbytes()
        except Exception:  # odd tensor subclasses, freed storages
            continue
    return sum(seen.values())


def held_by_run(frame: Any, clear: bool) -> str:
    """Bytes of the dicts of tensors that `_run` (the caller's frame) still holds from the previous layer
    (`state`, `weights`, `stats`); with `clear`, empty them in place so that their tensors are freed."""
    while frame is not None and frame.f_code.co_name != "_run":
        frame = frame.f_back
    if frame is None:
        return ""
    parts = []
    for name in ("state", "weights", "stats"):
        d = frame.f_locals.get(name)
        if isinstance(d, dict) and d:
            ptrs = {
                t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in d.values()
                if isinstance(t, torch.Tensor) and t.device.type == "cpu"
            }
            dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in d.values()})
            parts.append(f"{name} {sum(ptrs.values()) / GB:.3f} GB ({len(d)} tensors, {'/'.join(dtypes)})")
            if clear:
                d.clear()
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--calib-data", default=str(DEFAULT_CALIB))
    p.add_argument("--calib-size", type=int, default=32)
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--calib-batch-size", type=int, default=None, help="default: lowbit's automatic choice")
    p.add_argument(
        "--drop-previous",
        action="store_true",
        help="empty _run's state/weights/stats dicts of the previous layer when the next one starts",
    )
    p.add_argument("--interval", type=float, default=0.005, help="seconds between RSS samples")
    args = p.parse_args(argv)

    from transformers import AutoTokenizer

    from lowbit.models.loading import bound_heap

    bound_heap()  # as the lowbit command line does at start

    sampler = Sampler(args.interval)
    sampler.start()
    print(
        f"after imports: rss {rss() / GB:.2f} GB; MALLOC env: "
        f"{ {k: v for k, v in os.environ.items() if k.startswith('MALLOC_')} }",
        flush=True,
    )
    calib = calibration_windows(
        args.calib_data, AutoTokenizer.from_pretrained(args.model), args.calib_size, args.calib_seq_len
    )
    phases: dict[str, float] = {}  # phase name -> highest RSS seen during it, over the run
    layer_no = [-1]

    def traced(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*a: Any, **kw: Any) -> Any:
            if name == "materialize" and a and a[2] == "":
                label = "materialize shell"
            elif name == "materialize":
                layer_no[0] += 1
                held = held_by_run(sys._getframe(1), clear=args.drop_previous)
                if held:
                    verb = "dropped" if args.drop_previous else "still held"
                    print(f"    previous layer's tensors {verb} in _run's locals: {held}", flush=True)
                live = live_tensor_bytes()
                print(
                    f"layer {layer_no[0]:3d} start: rss {rss() / GB:5.2f} GB, live CPU tensors {live / GB:5.2f} GB",
                    flush=True,
                )
                label = "materialize layer"
            else:
                label = name
            before = sampler.reset()
            out = fn(*a, **kw)
            high, after = sampler.high, rss()
            phases[label] = max(phases.get(label, 0), high)
            print(
                f"    {label:18s} rss {before / GB:5.2f} -> {after / GB:5.2f} GB, high {high / GB:5.2f} GB "
                f"(+{(high - before) / GB:.2f})",
                flush=True,
            )
            return out

        return wrapper

    for name in ("_capture_inputs", "materialize", "calibrate_layer", "_advance"):
        setattr(layerwise, name, traced(name, getattr(layerwise, name)))
    CheckpointWriter.write_layer = traced("write_layer", CheckpointWriter.write_layer)  # type: ignore[method-assign]

    out = Path(tempfile.mkdtemp(prefix="lowbit-diag-")) / "out"
    start = time.perf_counter()
    try:
        layerwise.quantize_checkpoint(
            args.model,
            preset("fp8"),
            out,
            calib,
            device="cpu",
            batch_size=args.calib_batch_size,
            progress=False,
        )
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        f"end after {time.perf_counter() - start:.0f}s: rss {rss() / GB:.2f} GB, live CPU tensors "
        f"{live_tensor_bytes() / GB:.2f} GB, peak (ru_maxrss) {peak / GB:.2f} GB"
    )
    print("highest RSS per phase: " + ", ".join(f"{k} {v / GB:.2f}" for k, v in phases.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

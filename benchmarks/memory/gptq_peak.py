"""Peak memory that GPTQ adds for one down_proj-sized weight (2048 x 5632, H 5632 x 5632), in this process
(`ru_maxrss` before and after the call), and a checksum of its result (the same before and after a change that
should only move memory):

    OMP_NUM_THREADS=1 python benchmarks/memory/gptq_peak.py
"""

from __future__ import annotations

import resource
import time

import torch

from lowbit.algorithms import gptq
from lowbit.formats.scaled import INT4_G128, scale_map


def main() -> None:
    torch.manual_seed(0)
    k = 5632
    x = torch.randn(8192, k)
    h = x.t() @ x / 8192
    del x
    w = torch.randn(2048, k)
    m = scale_map(w, INT4_G128)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    t = time.time()
    q, _ = gptq.gptq_quantize(w, h, lambda c, i: m.fake_quant(c, i))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"before the call {base / 1e6:.3f} GB, peak {peak / 1e6:.3f} GB, GPTQ added {(peak - base) / 1e6:.3f} GB, "
          f"{time.time() - t:.1f} s, checksum {float(q.double().sum()):.6f}")


if __name__ == "__main__":
    main()

"""One-thread time of pydocs-llama-sized products in fp32 and bf16 (why calib_dtype "auto" picks bf16 here):
a Linear of 8192 tokens x 256 -> 768 and causal SDPA of 16 x 4 heads x 512 tokens x 64.

    OMP_NUM_THREADS=1 python benchmarks/bf16_products.py
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F


def timed(fn, reps: int) -> float:
    fn()  # warm-up (oneDNN picks its kernels)
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


def main() -> None:
    torch.set_num_threads(1)
    x, w, q = torch.randn(8192, 256), torch.randn(768, 256), torch.randn(16, 4, 512, 64)
    for dtype in (torch.float32, torch.bfloat16):
        a, b, qq = x.to(dtype), w.to(dtype), q.to(dtype)
        lin = timed(lambda: F.linear(a, b), 20)  # noqa: B023
        att = timed(lambda: F.scaled_dot_product_attention(qq, qq, qq, is_causal=True), 5)  # noqa: B023
        print(f"{dtype!s:15s} linear {lin * 1e3:6.1f} ms ({2 * 8192 * 256 * 768 / lin / 1e9:5.0f} GFLOPS)  "
              f"sdpa {att * 1e3:6.1f} ms")


if __name__ == "__main__":
    main()

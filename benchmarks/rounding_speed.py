"""Speed of lowbit's element rounding against the implementations it replaced, on one activation-sized tensor.

    OMP_NUM_THREADS=1 python benchmarks/rounding_speed.py [--rows 2048 --cols 768 --reps 20]

E4M3: torch's float8 cast round trip (clamp, .to(float8_e4m3fn), .to(float32)), which this CPU build of torch
converts back element by element; E2M1: the step chosen by torch.where (0.5 below 2, 1 below 4, else 2);
NVFP4: lowbit's fake quantization of an activation (dynamic 16-element blocks). Checks the results are equal.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from lowbit.formats.elements import E2M1, E4M3, round_to_grid
from lowbit.formats.scaled import NVFP4_DYNAMIC, fake_quant


def fp8_cast(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-E4M3.max_norm, E4M3.max_norm).to(torch.float8_e4m3fn).to(x.dtype)


def e2m1_where(x: torch.Tensor) -> torch.Tensor:
    mag = x.abs()
    step = torch.where(mag < 2, 0.5, torch.where(mag < 4, 1.0, 2.0)).to(x.dtype)
    return torch.copysign((torch.round(mag / step) * step).clamp_(max=6.0), x)


def ms(f: Callable[[], torch.Tensor], reps: int) -> float:
    f()
    start = time.perf_counter()
    for _ in range(reps):
        f()
    return (time.perf_counter() - start) / reps * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--cols", type=int, default=768)
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.rows, args.cols) * 3
    y = x * 50
    assert torch.equal(round_to_grid(y, E4M3), fp8_cast(y))
    assert torch.equal(round_to_grid(x, E2M1), e2m1_where(x))
    print(f"{args.rows} x {args.cols} float32, {torch.get_num_threads()} thread(s), ms per call")
    rows = [
        ("E4M3", "float8 cast", lambda: fp8_cast(y), lambda: round_to_grid(y, E4M3)),
        ("E2M1", "torch.where", lambda: e2m1_where(x), lambda: round_to_grid(x, E2M1)),
    ]
    for name, old, before, now in rows:
        print(f"{name}  {old} {ms(before, args.reps):7.2f}   lowbit {ms(now, args.reps):7.2f}")
    ga = x.abs().amax()
    nvfp4 = ms(lambda: fake_quant(x, NVFP4_DYNAMIC, global_amax=ga), args.reps)
    print(f"NVFP4 activation fake quant, lowbit {nvfp4:7.2f}")

if __name__ == "__main__":
    main()

"""QAT and QAD against PTQ on one model: how much of the PTQ perplexity gap training recovers.

For each preset: PTQ with `lowbit quantize` (the preset's own algorithm), then `lowbit qat` from that
checkpoint (language-modelling loss), and `lowbit qat distill.enabled=true` (KL from the BF16 model), each
for --iters iterations on the training text; a `no_quant` run with the same settings shows what the same
continued training does to the BF16 model itself. Every checkpoint is evaluated as saved (BF16 weights) on
all consecutive 512-token windows of the eval text: perplexity, KL from the BF16 model, top-1 agreement.
`recovered` = (ppl_PTQ - ppl) / (ppl_PTQ - ppl_BF16).

    python benchmarks/qat/run.py --model ../shared/models/pydocs-llama \
        --calib ../shared/data/pydocs/calib.txt --train ../shared/data/pydocs/train.txt \
        --eval ../shared/data/pydocs/eval.txt --presets int4_awq,nvfp4 --iters 200 \
        --out benchmarks/results/qat-pydocs.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from lowbit.data.text import eval_windows
from lowbit.eval.metrics import MetricSums
from lowbit.loader import load_model
from lowbit.models.loading import load_tokenizer


def sh(cmd: list[str], threads: int) -> float:
    print("+", " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    return time.perf_counter() - start


@torch.no_grad()
def evaluate(ckpt: Path, base_logits: list[torch.Tensor], windows: torch.Tensor, batch: int) -> dict:
    model, _ = load_model(ckpt)
    sums = MetricSums()
    for ids, base in zip(windows.split(batch), base_logits, strict=True):
        sums.add(model(input_ids=ids, use_cache=False).logits, ids, base)
    return sums.result()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--calib", required=True)
    p.add_argument("--train", required=True)
    p.add_argument("--eval", required=True)
    p.add_argument("--presets", default="int4_awq,nvfp4")
    p.add_argument("--modes", default="qat,qad", help="comma-separated: qat, qad")
    p.add_argument("--control", action=argparse.BooleanOptionalAction, default=True,
                   help="also fine-tune the BF16 model (no_quant) with the same settings")  # fmt: skip
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--calib-size", type=int, default=128)
    p.add_argument("--eval-samples", type=int, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default="/tmp/lowbit-qat-bench")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    lowbit = [sys.executable, "-m", "lowbit"]

    tok = load_tokenizer(Path(args.model))
    windows = eval_windows(args.eval, tok, args.seq_len, args.eval_samples)
    base, _ = load_model(args.model)
    with torch.no_grad():
        base_logits = [base(input_ids=ids, use_cache=False).logits for ids in windows.split(8)]
    del base

    def record(row: dict) -> None:
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")

    presets = args.presets.split(",") + (["no_quant"] if args.control else [])
    for preset in presets:
        ptq = work / f"ptq-{preset}"
        seconds = None
        if not ptq.exists():
            seconds = sh([*lowbit, "quantize", "--model", args.model, "--qformat", preset, "--calib-data",
                          args.calib, "--calib-size", str(args.calib_size), "--calib-seq-len", str(args.seq_len),
                          "--output", str(ptq), "-q"], args.threads)  # fmt: skip
        ptq_metrics = evaluate(ptq, base_logits, windows, 8)
        record({"preset": preset, "mode": "ptq", **ptq_metrics, "seconds": seconds})
        modes = ["qat"] if preset == "no_quant" else args.modes.split(",")
        for mode in modes:
            run = work / f"{mode}-{preset}-{args.iters}-{args.lr:g}"
            overrides = [
                f"checkpoint.pretrained_checkpoint={ptq}", f"checkpoint.save={run}", f"data.path={args.train}",
                f"data.eval_path={args.eval}", f"data.seq_length={args.seq_len}", f"train.train_iters={args.iters}",
                f"train.global_batch_size={args.global_batch}", f"train.micro_batch_size={args.micro_batch}",
                "train.eval_iters=2", f"optimizer.lr={args.lr}", f"logger.log_interval={max(args.iters // 10, 1)}",
            ]  # fmt: skip
            if mode == "qad":
                overrides += ["distill.enabled=true", f"distill.teacher={args.model}"]
            seconds = sh([*lowbit, "qat", *overrides, "-q"], args.threads)
            metrics = evaluate(run / "latest", base_logits, windows, 8)
            gap = ptq_metrics["ppl"] - metrics["base_ppl"]
            recovered = (ptq_metrics["ppl"] - metrics["ppl"]) / gap if gap > 0 else None
            record({"preset": preset, "mode": mode, **metrics, "seconds": seconds, "iters": args.iters,
                    "lr": args.lr, "global_batch": args.global_batch, "seq_len": args.seq_len,
                    "ptq_ppl": ptq_metrics["ppl"], "recovered": recovered})  # fmt: skip


if __name__ == "__main__":
    main()

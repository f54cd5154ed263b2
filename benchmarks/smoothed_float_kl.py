"""KL of a checkpoint's stored float weights (smoothed by AWQ / SmoothQuant, in the source's dtype, nothing
quantized) against its source model: what the folds' rounding to the stored dtype costs by itself.

    python benchmarks/smoothed_float_kl.py --model /tmp/train/pydocs-qwen3_moe_top2-1200 \
        --checkpoint /tmp/dec/moe-pow2 --eval ../shared/data/pydocs/eval.txt
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import AutoModelForCausalLM

from lowbit.data.text import eval_windows
from lowbit.eval.runner import evaluate
from lowbit.models.loading import load_tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the source model")
    p.add_argument("--checkpoint", required=True, help="a lowbit checkpoint of it (read as a plain HF model)")
    p.add_argument("--eval", required=True)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    windows = eval_windows(args.eval, load_tokenizer(args.model), args.seq_len)
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).eval()
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.bfloat16).eval()
    print(json.dumps({"checkpoint": args.checkpoint, **evaluate(model, windows, base, progress=False)}))


if __name__ == "__main__":
    main()

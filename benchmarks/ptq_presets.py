"""Every lowbit preset on one model: perplexity, KL from the BF16 model, top-1 agreement, time.

`peak_rss_mb` is ru_maxrss right after the quantize call (with --isolate: that run's own, before the base
model and its logits are loaded for evaluation); `quant_seconds` its wall time (reading and writing the
checkpoint included).

Protocol (shared with benchmarks/peers/): calibration = `calibration_windows(calib, tok, 512, 512, seed 0)`;
evaluation = every consecutive 512-token window of the eval text, base and quantized model both run in
float32 from the BF16 checkpoint.

    python benchmarks/ptq_presets.py --model ../shared/models/pydocs-llama \
        --calib ../shared/data/pydocs/calib.txt --eval ../shared/data/pydocs/eval.txt \
        --out benchmarks/results/lowbit-pydocs-max.jsonl
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from lowbit.algorithms.layerwise import quantize_checkpoint
from lowbit.data.text import calibration_windows, eval_windows
from lowbit.eval.metrics import MetricSums
from lowbit.loader import load_model
from lowbit.models.loading import bound_heap
from lowbit.quant.recipe import PRESETS, preset


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--calib", required=True)
    p.add_argument("--eval", default=None, help="evaluation text (required unless --no-eval)")
    p.add_argument("--no-eval", action="store_true", help="quantize and time only (no KL, no base model)")
    p.add_argument(
        "--presets",
        default=",".join(n for n in PRESETS if n != "no_quant"),
        help="comma-separated presets, each optionally PRESET:ALGORITHM (int4_awq:awq_full+gptq)",
    )
    p.add_argument(
        "--param", action="append", default=[], help="algorithm parameter KEY=VALUE (sq_alpha=0.8)"
    )
    p.add_argument("--eval-samples", type=int, default=None, help="first N eval windows only (quick runs)")
    p.add_argument("--isolate", action="store_true", help="one subprocess per run (peak RSS per run)")
    p.add_argument("--kv-cache", default=None)
    p.add_argument("--calib-size", type=int, default=512)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    bound_heap()  # as the lowbit command line does at start (models.loading.bound_heap)
    if not args.no_eval and not args.eval:
        p.error("--eval is required unless --no-eval")
    if args.isolate:
        isolate(args)
        return
    if args.threads:
        torch.set_num_threads(args.threads)

    tok = AutoTokenizer.from_pretrained(args.model)
    calib = calibration_windows(args.calib, tok, args.calib_size, args.calib_seq_len, seed=0)
    windows = eval_windows(args.eval, tok, args.seq_len) if args.eval else torch.zeros(0, args.seq_len)
    if args.eval_samples:
        windows = windows[: args.eval_samples]
    base_logits: list[torch.Tensor] = []  # after the first quantization, so its peak RSS is its own
    work = Path(tempfile.mkdtemp(prefix="lowbit-bench-"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with out.open("w") as f:
            for entry in args.presets.split(","):
                name, _, algorithm = entry.partition(":")
                recipe = preset(name).with_kv_cache(args.kv_cache) if args.kv_cache else preset(name)
                if algorithm:
                    recipe = recipe.with_algorithm(algorithm)
                if args.param:
                    recipe = recipe.with_params(**dict(_param(kv) for kv in args.param))
                start = time.perf_counter()
                res = quantize_checkpoint(args.model, recipe, work / name, calib, progress=False)
                seconds = time.perf_counter() - start
                quant_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                if args.no_eval:
                    row = {"tool": "lowbit", "preset": name, "algorithm": res.algorithm, "kv_cache": args.kv_cache,
                           "params": recipe.params.to_dict(), "quant_seconds": round(seconds, 2),
                           "peak_rss_mb": round(quant_rss)}  # fmt: skip
                    print(json.dumps(row), flush=True)
                    f.write(json.dumps(row) + "\n")
                    shutil.rmtree(work / name)
                    continue
                if not base_logits:
                    base, _ = load_model(args.model)
                    with torch.no_grad():
                        base_logits = [
                            base(b, use_cache=False).logits for b in windows.split(args.batch_size)
                        ]
                    del base
                model, _ = load_model(res.output)
                sums = MetricSums()
                with torch.no_grad():
                    for b, bl in zip(windows.split(args.batch_size), base_logits, strict=True):
                        sums.add(model(b, use_cache=False).logits, b, bl)
                row = {
                    "tool": "lowbit",
                    "preset": name,
                    "algorithm": res.algorithm,
                    "kv_cache": args.kv_cache,
                    "params": recipe.params.to_dict(),
                    **sums.result(),
                    "quant_seconds": round(seconds, 2),
                    "peak_rss_mb": round(quant_rss),
                    "peak_rss_mb_with_eval": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                }
                print(json.dumps(row), flush=True)
                f.write(json.dumps(row) + "\n")
                shutil.rmtree(work / name)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _param(kv: str) -> tuple[str, object]:
    key, _, value = kv.partition("=")
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    return key, {"true": True, "false": False}.get(value.lower(), value)


def isolate(args: argparse.Namespace) -> None:
    """Run each entry in its own process (so ru_maxrss is that run's) and gather the rows into --out."""
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    argv = [a for a in sys.argv[1:] if a != "--isolate"]
    rows = []
    for entry in args.presets.split(","):
        part = Path(tempfile.mkstemp(suffix=".jsonl")[1])
        cmd = [sys.executable, __file__, *_replace(argv, {"--presets": entry, "--out": str(part)})]
        subprocess.run(cmd, check=False)
        rows += [line for line in part.read_text().splitlines() if line.strip()]
        part.unlink()
        out.write_text("".join(r + "\n" for r in rows))


def _replace(argv: list[str], values: dict[str, str]) -> list[str]:
    res, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        key = a.split("=", 1)[0]
        if key in values:
            skip = "=" not in a
            continue
        res.append(a)
    for k, v in values.items():
        res += [k, v]
    return res


if __name__ == "__main__":
    main()

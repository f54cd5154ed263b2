"""Shared harness of the peer benchmarks (modelopt_ptq.py, llmcompressor_ptq.py).

Runs inside the peers' own venvs, so it needs only torch + transformers; the data and metric code is
lowbit's own (src/lowbit/data/text.py, src/lowbit/eval/metrics.py import only torch), taken from the
repository's src/ folder so both peers see exactly lowbit's calibration samples and evaluation protocol.

Per format: load the BF16 checkpoint in float32 (not timed) -> quantize with calibration (timed: quant_seconds;
peak_rss_mb = the process high-water mark right after it) -> evaluate the quantized model against the
unquantized float32 model batch by batch (batch 8, use_cache=False) with lowbit's MetricSums.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402

from lowbit.data.text import calibration_windows, eval_windows  # noqa: E402
from lowbit.eval.metrics import MetricSums  # noqa: E402

CALIB_BATCH = 16
EVAL_BATCH = 8


def parse_args(tool: str, formats: list[str], argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=f"{tool} max-calibrated PTQ benchmark with lowbit's eval protocol")
    p.add_argument("--model", default="/work/shared/models/pydocs-llama")
    p.add_argument("--calib", default="/work/shared/data/pydocs/calib.txt")
    p.add_argument("--eval", default="/work/shared/data/pydocs/eval.txt")
    p.add_argument("--formats", default=",".join(formats), help=f"comma list of: {', '.join(formats)}")
    p.add_argument("--calib-size", type=int, default=512)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--seq-len", type=int, default=512, help="evaluation window length")
    p.add_argument("--eval-samples", type=int, default=None, help="evaluate the first N windows (default all)")
    p.add_argument("--out", required=True, help="JSONL file; one line per format is appended")
    p.add_argument("--isolate", action="store_true", help="one subprocess per format (clean peak RSS)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--no-base-cache", action="store_true",
                   help="recompute the base model's eval logits for every format instead of caching them on disk")
    args = p.parse_args(argv)
    args.formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    unknown = [f for f in args.formats if f not in formats]
    if unknown:
        p.error(f"unknown format(s) {unknown}; choose from {formats}")
    return args


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def load_model(model_dir: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    return model


def load_data(args: argparse.Namespace):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    calib = calibration_windows(args.calib, tok, n=args.calib_size, seq_len=args.calib_seq_len, seed=0)
    ev = eval_windows(args.eval, tok, seq_len=args.seq_len, max_samples=args.eval_samples)
    return tok, calib, ev


@torch.no_grad()
def evaluate(qmodel, base_model, ids: torch.Tensor, cache_dir: Path | None = None) -> dict[str, Any]:
    """lowbit's protocol: float32 models, batch 8, use_cache=False, MetricSums(q_logits, ids, base_logits).

    The base logits of each batch are computed next to the quantized ones, or read from `cache_dir` where an
    earlier format of the same run (same model, data, torch and transformers) saved them.
    """
    sums = MetricSums()
    for i in range(0, len(ids), EVAL_BATCH):
        batch = ids[i : i + EVAL_BATCH]
        base_logits = _base_logits(base_model, batch, cache_dir / f"batch{i:05d}.pt" if cache_dir else None)
        q_logits = qmodel(input_ids=batch, use_cache=False).logits.float()
        sums.add(q_logits, batch, base_logits)
    return sums.result()


def _base_logits(base_model, batch: torch.Tensor, path: Path | None) -> torch.Tensor:
    if path is not None and path.exists():
        saved = torch.load(path)
        if torch.equal(saved["ids"], batch):
            return saved["logits"]
    logits = base_model(input_ids=batch, use_cache=False).logits.float()
    if path is not None:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save({"ids": batch.clone(), "logits": logits}, tmp)
        os.replace(tmp, path)
    return logits


def base_cache_dir(args: argparse.Namespace, ids: torch.Tensor) -> Path | None:
    """A folder for the base model's eval logits, keyed by everything they depend on; None with --no-base-cache."""
    if args.no_base_cache:
        return None
    import hashlib

    import transformers

    st = Path(args.model) / "model.safetensors"
    key = "|".join([str(Path(args.model).resolve()), str(st.stat().st_mtime_ns) if st.exists() else "",
                    torch.__version__, transformers.__version__, str(EVAL_BATCH),
                    hashlib.sha256(ids.numpy().tobytes()).hexdigest()])
    root = Path(os.environ.get("LOWBIT_PEERS_CACHE", Path.home() / ".cache" / "lowbit-peers" / "base-logits"))
    path = root / hashlib.sha256(key.encode()).hexdigest()[:16]
    path.mkdir(parents=True, exist_ok=True)
    return path


def first_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"


def run(
    tool: str,
    tool_version: str,
    formats: list[str],
    describe: Callable[[str], Any],
    quantize: Callable[[Any, str, torch.Tensor], dict[str, Any] | None],
    argv: list[str] | None = None,
) -> None:
    """describe(preset) -> peer_config (JSON-able); quantize(model, preset, calib_ids) -> extra fields."""
    args = parse_args(tool, formats, argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    if args.isolate and len(args.formats) > 1:
        rc = 0
        for fmt in args.formats:
            cmd = [sys.executable, sys.argv[0], *_argv_without(argv if argv is not None else sys.argv[1:]),
                   "--formats", fmt]
            print(f"[{tool}] isolate: {fmt}", flush=True)
            r = subprocess.run(cmd)
            if r.returncode != 0:
                rc = r.returncode
                _append(out, _row(tool, tool_version, fmt, _safe(describe, fmt),
                                  error=f"subprocess exited with code {r.returncode}"))
        sys.exit(rc)

    _, calib, ev = load_data(args)
    base = load_model(args.model)
    for fmt in args.formats:
        print(f"[{tool}] {fmt}: calib {tuple(calib.shape)} eval {tuple(ev.shape)} threads {args.threads}", flush=True)
        row = _row(tool, tool_version, fmt, _safe(describe, fmt))
        model = load_model(args.model)
        stage = "quantize"
        try:
            t0 = time.perf_counter()
            extra = quantize(model, fmt, calib) or {}
            row["quant_seconds"] = round(time.perf_counter() - t0, 3)
            row["peak_rss_mb"] = round(peak_rss_mb(), 1)
            row.update(extra)
            stage = "eval"
            t1 = time.perf_counter()
            row.update(evaluate(model, base, ev, base_cache_dir(args, ev)))
            row["eval_seconds"] = round(time.perf_counter() - t1, 3)
            row["peak_rss_mb_with_eval"] = round(peak_rss_mb(), 1)
        except Exception as e:
            traceback.print_exc()
            row["error"] = first_line(e)
            row["error_stage"] = stage
            row["peak_rss_mb"] = round(peak_rss_mb(), 1)
        print(f"[{tool}] {fmt}: {json.dumps(row)}", flush=True)
        _append(out, row)
        del model


def _row(tool: str, version: str, preset: str, peer_config: Any, error: str | None = None) -> dict[str, Any]:
    return {
        "tool": tool, "tool_version": version, "preset": preset, "peer_config": peer_config,
        "algorithm": "max", "ppl": None, "base_ppl": None, "kl": None, "top1_agree": None, "tokens": None,
        "quant_seconds": None, "peak_rss_mb": None, "error": error,
    }


def _safe(describe: Callable[[str], Any], fmt: str) -> Any:
    try:
        return describe(fmt)
    except Exception as e:
        return f"<{first_line(e)}>"


def _append(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def _argv_without(argv: list[str]) -> list[str]:
    """argv less --isolate and --formats X / --formats=X."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--isolate" or a.startswith("--formats="):
            continue
        if a == "--formats":
            skip = True
            continue
        out.append(a)
    return out


def jsonable(obj: Any) -> Any:
    """A config dict as JSON (tuples -> lists, classes/callables -> their names)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if hasattr(obj, "model_dump"):
        return jsonable(obj.model_dump(exclude_none=True))
    return repr(obj)


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

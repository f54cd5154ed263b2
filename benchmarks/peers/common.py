"""Shared harness of the peer benchmarks (modelopt_ptq.py, llmcompressor_ptq.py).

Runs inside the peers' own venvs, so it needs only torch + transformers; the data and metric code is
lowbit's own (src/lowbit/data/text.py, src/lowbit/eval/metrics.py import only torch), taken from the
repository's src/ folder so both peers see exactly lowbit's calibration samples and evaluation protocol.

Per run (a preset and a calibration algorithm: "max" = round to nearest with amax calibration, or one of the
tool's own algorithms such as SmoothQuant, AWQ, GPTQ): load the BF16 checkpoint in float32 (not timed) -> quantize
with calibration (timed: quant_seconds; peak_rss_mb = the process high-water mark right after it) -> evaluate the
quantized model against the unquantized float32 model batch by batch (batch 8, use_cache=False) with lowbit's
MetricSums.
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
import warnings
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


Run = tuple[str, str]  # (preset, algorithm)


def parse_args(
    tool: str,
    formats: list[str],
    argv: list[str] | None = None,
    algorithms: dict[str, list[str]] | None = None,
    algorithm_runs: list[Run] | None = None,
) -> argparse.Namespace:
    """`formats`: the presets this tool runs with "max"; `algorithms`: preset -> the tool's other algorithms for it;
    `algorithm_runs`: the default list of algorithm runs (--algorithm-runs)."""
    algorithms = algorithms or {}
    algorithm_runs = algorithm_runs or []
    choices = [f"{p}:{a}" for p, algos in algorithms.items() for a in algos]
    p = argparse.ArgumentParser(description=f"{tool} PTQ benchmark with lowbit's eval protocol")
    p.add_argument("--model", default="/work/shared/models/pydocs-llama")
    p.add_argument("--calib", default="/work/shared/data/pydocs/calib.txt")
    p.add_argument("--eval", default="/work/shared/data/pydocs/eval.txt")
    p.add_argument("--formats", default=None,
                   help=f"comma list of presets run with algorithm max: {', '.join(formats)} "
                        "(default: all of them, unless --runs or --algorithm-runs is given)")
    p.add_argument("--runs", default=None,
                   help="comma list of PRESET:ALGORITHM (PRESET alone or PRESET:max = a --formats entry); "
                        f"algorithms: {', '.join(choices) or '-'}")
    p.add_argument("--algorithm-runs", action="store_true",
                   help="add the default algorithm runs: " + ",".join(f"{a}:{b}" for a, b in algorithm_runs))
    p.add_argument("--calib-size", type=int, default=512)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--seq-len", type=int, default=512, help="evaluation window length")
    p.add_argument("--eval-samples", type=int, default=None, help="evaluate the first N windows (default all)")
    p.add_argument("--out", required=True, help="JSONL file; one line per run is appended")
    p.add_argument("--isolate", action="store_true", help="one subprocess per run (clean peak RSS)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--no-eval", action="store_true",
                   help="quantize only (memory runs): no base model, no weight snapshot, no evaluation")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="dtype the model is loaded in (float32: the evaluation protocol; bfloat16: as users "
                        "load a BF16 checkpoint, for memory runs)")
    p.add_argument("--no-base-cache", action="store_true",
                   help="recompute the base model's eval logits for every run instead of caching them on disk")
    args = p.parse_args(argv)

    runs: list[Run] = []
    if args.formats is None and args.runs is None and not args.algorithm_runs:
        args.formats = ",".join(formats)
    for f in (args.formats or "").split(","):
        if f.strip():
            runs.append((f.strip(), "max"))
    for r in (args.runs or "").split(","):
        if r.strip():
            preset, _, algo = r.strip().partition(":")
            runs.append((preset.strip(), algo.strip() or "max"))
    if args.algorithm_runs:
        runs.extend(algorithm_runs)
    bad = [f"{a}:{b}" for a, b in runs
           if not ((b == "max" and a in formats) or (b != "max" and b in algorithms.get(a, [])))]
    if bad:
        p.error(f"unknown run(s) {bad}; choose from max formats {formats} or {choices}")
    args.runs = list(dict.fromkeys(runs))  # dedupe, keep order
    return args


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def load_model(model_dir: str, dtype: str = "float32"):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    model.eval()
    return model


def load_data(args: argparse.Namespace):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    calib = calibration_windows(args.calib, tok, n=args.calib_size, seq_len=args.calib_seq_len, seed=0)
    if args.no_eval:
        return tok, calib, None
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
    describe: Callable[[str, str], Any],
    quantize: Callable[[Any, str, str, torch.Tensor], dict[str, Any] | None],
    argv: list[str] | None = None,
    algorithms: dict[str, list[str]] | None = None,
    algorithm_runs: list[Run] | None = None,
) -> None:
    """describe(preset, algorithm) -> peer_config (JSON-able); quantize(model, preset, algorithm, calib_ids) ->
    extra fields. Python warnings raised inside quantize are recorded (deduplicated) in the row's "warnings"."""
    args = parse_args(tool, formats, argv, algorithms, algorithm_runs)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    if args.isolate and len(args.runs) > 1:
        rc = 0
        for preset, algo in args.runs:
            cmd = [sys.executable, sys.argv[0], *_argv_without(argv if argv is not None else sys.argv[1:]),
                   "--runs", f"{preset}:{algo}"]
            print(f"[{tool}] isolate: {preset}:{algo}", flush=True)
            r = subprocess.run(cmd)
            if r.returncode != 0:
                rc = r.returncode
                _append(out, _row(tool, tool_version, preset, algo, _safe(describe, preset, algo),
                                  error=f"subprocess exited with code {r.returncode}"))
        sys.exit(rc)

    _, calib, ev = load_data(args)
    base = None if args.no_eval else load_model(args.model)
    for preset, algo in args.runs:
        label = f"{preset}:{algo}"
        shape = "none" if ev is None else tuple(ev.shape)
        print(f"[{tool}] {label}: calib {tuple(calib.shape)} eval {shape} threads {args.threads}", flush=True)
        row = _row(tool, tool_version, preset, algo, _safe(describe, preset, algo))
        row["model_dtype"] = args.dtype
        model = load_model(args.model, args.dtype)
        stage = "quantize"
        caught: list[warnings.WarningMessage] = []
        before = {} if args.no_eval else _linear_weights(model)
        try:
            t0 = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                extra = quantize(model, preset, algo, calib) or {}
            row["quant_seconds"] = round(time.perf_counter() - t0, 3)
            row["peak_rss_mb"] = round(peak_rss_mb(), 1)
            row.update(extra)
            if before:
                row["weights_modified_linears"] = _count_modified(model, before)
            row["warnings"] = _dedupe_warnings(caught)
            if ev is None:
                print(f"[{tool}] {label}: {json.dumps(row)}", flush=True)
                _append(out, row)
                continue
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
            if stage == "quantize":  # how long the quantize call ran before it raised
                row["failed_after_seconds"] = round(time.perf_counter() - t0, 3)
                row["warnings"] = _dedupe_warnings(caught)
        print(f"[{tool}] {label}: {json.dumps(row)}", flush=True)
        _append(out, row)
        del model


def _linear_weights(model) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and isinstance(getattr(m, "weight", None), torch.Tensor)}


@torch.no_grad()
def _count_modified(model, before: dict[str, torch.Tensor]) -> int:
    """How many Linear weights the quantize call rewrote in place (0 for max/RTN fake quantization, which keeps the
    float weights; SmoothQuant/AWQ fold scales into them, GPTQ writes its updated weights)."""
    mods = dict(model.named_modules())
    n = 0
    for name, w in before.items():
        cur = getattr(mods.get(name), "weight", None)
        same = isinstance(cur, torch.Tensor) and cur.shape == w.shape and torch.equal(cur.detach().float(), w.float())
        if not same:
            n += 1
    return n


def _dedupe_warnings(caught: list[warnings.WarningMessage], limit: int = 30) -> list[str]:
    """Unique warning messages (category: first line, xN when repeated), also echoed to stderr."""
    counts: dict[str, int] = {}
    for w in caught:
        lines = str(w.message).strip().splitlines()
        key = f"{w.category.__name__}: {lines[0][:300] if lines else ''}"
        counts[key] = counts.get(key, 0) + 1
    for key, n in counts.items():
        print(f"[warning x{n}] {key}", file=sys.stderr, flush=True)
    return [k if n == 1 else f"{k} (x{n})" for k, n in list(counts.items())[:limit]]


def _row(tool: str, version: str, preset: str, algorithm: str, peer_config: Any,
         error: str | None = None) -> dict[str, Any]:
    return {
        "tool": tool, "tool_version": version, "preset": preset, "peer_config": peer_config,
        "algorithm": algorithm, "ppl": None, "base_ppl": None, "kl": None, "top1_agree": None, "tokens": None,
        "quant_seconds": None, "peak_rss_mb": None, "error": error,
    }


def _safe(describe: Callable[[str, str], Any], preset: str, algorithm: str) -> Any:
    try:
        return describe(preset, algorithm)
    except Exception as e:
        return f"<{first_line(e)}>"


def _append(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def _argv_without(argv: list[str]) -> list[str]:
    """argv less --isolate, --algorithm-runs and --formats X / --runs X (or =X)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--isolate", "--algorithm-runs") or a.startswith(("--formats=", "--runs=")):
            continue
        if a in ("--formats", "--runs"):
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

"""Peak resident memory of `lowbit quantize` (default `--qformat fp8`) on two synthetic Llama models of the
same width.

Goal (lowbit's issue): from the 8-layer to the 32-layer model (~3.2 GB of BF16 weights) the peak RSS grows
by less than 20%, and on the 32-layer model it stays under half the model's size on disk.

For each model: build it with make_synthetic.py unless already there, then run `lowbit quantize` as a child
process and reap it with os.wait4, whose rusage is that one child's own (ru_maxrss: the kernel's high-water
mark of its resident set, file-backed pages included). While it runs, the child's RSS is also sampled with
psutil for a coarse timeline. Writes benchmarks/results/memory.json and memory.txt (the table).

    python benchmarks/memory/run.py                                  # 8 and 32 layers, calib 32 x 256
    python benchmarks/memory/run.py --calib-size 128 --calib-seq-len 512 \
        --out benchmarks/results/memory-calib128x512.json
    python benchmarks/memory/run.py --layers 8 32 --qformat int4_awq --algorithm gptq \
        --out benchmarks/results/memory-int4-gptq.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import make_synthetic  # noqa: E402

REPO = HERE.parents[1]
BUILTIN_CALIB = REPO / "src" / "lowbit" / "assets" / "text" / "calib.txt"
SHARED_CALIB = Path("/work/shared/data/pydocs/calib.txt")
GROWTH_GOAL = 0.20  # peak(32 layers) / peak(8 layers) - 1 must stay below this
PEAK_OVER_MODEL_GOAL = 0.5  # peak(32 layers) / size of the 32-layer model must stay below this
GB = 1e9


def default_calib() -> Path:
    return BUILTIN_CALIB if BUILTIN_CALIB.is_file() else SHARED_CALIB


def model_dir(work: Path, layers: int) -> Path:
    return work / f"llama-{layers}L"


def model_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def complete(path: Path) -> bool:
    """Every shard the index names is there (make_synthetic.py moves a model into place only when done)."""
    index = path / "model.safetensors.index.json"
    if not index.is_file():
        return False
    return all((path / f).is_file() for f in set(json.loads(index.read_text())["weight_map"].values()))


def ensure_model(work: Path, layers: int, args: argparse.Namespace) -> Path:
    """Build the synthetic model unless a complete one with the same settings is there."""
    path = model_dir(work, layers)
    wanted = {"layers": layers, "hidden": args.hidden, "intermediate": args.intermediate, "seed": args.seed}
    made_file = path / "synthetic.json"
    if not args.rebuild and made_file.is_file():
        made = json.loads(made_file.read_text())
        same = all(made.get(k) == v for k, v in wanted.items())
        same = same and made.get("tokenizer_source") == str(make_synthetic.tokenizer_source())
        if same and complete(path):
            print(f"using {path} ({model_bytes(path) / GB:.2f} GB)")
            return path
    cmd = [
        sys.executable,
        str(HERE / "make_synthetic.py"),
        "--layers",
        str(layers),
        "--out",
        str(path),
        "--hidden",
        str(args.hidden),
        "--intermediate",
        str(args.intermediate),
        "--seed",
        str(args.seed),
    ]
    print("building:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return path


def tree_rss(proc: psutil.Process) -> int:
    """RSS of a process and its descendants (0 once it is gone)."""
    total = 0
    with contextlib.suppress(psutil.Error):
        for p in [proc, *proc.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
    return total


def measure(
    cmd: list[str], log_path: Path, interval: float, time_limit: float | None = None
) -> dict[str, Any]:
    """Run `cmd`; its peak RSS (wait4 rusage), wall time, exit code and a sampled RSS timeline. Past
    `time_limit` seconds the child is stopped (SIGTERM) and `stopped` is True: its peak is then a lower bound
    of the whole run's."""
    start = time.perf_counter()
    stopped = False
    with open(log_path, "w") as log:
        child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        proc = psutil.Process(child.pid)
        trace: list[tuple[float, int]] = []
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid == child.pid:
                break
            trace.append((time.perf_counter() - start, tree_rss(proc)))
            if time_limit is not None and not stopped and time.perf_counter() - start > time_limit:
                child.terminate()
                stopped = True
            time.sleep(interval)
    seconds = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    return {
        "returncode": child.returncode,
        "stopped": stopped,
        "seconds": seconds,
        "peak_rss_bytes": usage.ru_maxrss * 1024,  # Linux: KiB
        "sampled_peak_bytes": max((r for _, r in trace), default=0),
        "trace": trace,
    }


def downsample(trace: list[tuple[float, int]], points: int) -> list[list[float]]:
    """At most `points` [seconds, GB] pairs; each kept point is the max RSS of its stretch of samples."""
    if not trace:
        return []
    step = max(1, -(-len(trace) // points))
    out = []
    for i in range(0, len(trace), step):
        chunk = trace[i : i + step]
        t, r = max(chunk, key=lambda x: x[1])
        out.append([round(t, 1), round(r / GB, 3)])
    return out


def run_model(work: Path, layers: int, args: argparse.Namespace) -> dict[str, Any]:
    path = model_dir(work, layers)
    output = work / f"llama-{layers}L-{args.qformat}-{args.algorithm}"  # runs side by side do not collide
    cmd = [
        sys.executable,
        "-m",
        "lowbit",
        "quantize",
        "--model",
        str(path),
        "--qformat",
        args.qformat,
        "--algorithm",
        args.algorithm,
        "--calib-data",
        str(args.calib_data),
        "--calib-size",
        str(args.calib_size),
        "--calib-seq-len",
        str(args.calib_seq_len),
        "--device",
        "cpu",
        "--output",
        str(output),
        "--overwrite",
        "-q",
    ]
    if args.calib_batch_size:
        cmd += ["--calib-batch-size", str(args.calib_batch_size)]
    for stale in (output.with_name(output.name + ".partial"),):
        if stale.exists():
            shutil.rmtree(stale)
    log_path = work / f"quantize-{layers}L-{args.qformat}-{args.algorithm}.log"
    print(f"quantizing {layers} layers:", " ".join(cmd), flush=True)
    code = src_state()
    m = measure(cmd, log_path, args.sample_interval)
    if m["returncode"] != 0:
        tail = log_path.read_text()[-3000:]
        raise SystemExit(
            f"lowbit quantize failed on {path} (exit {m['returncode']}); log {log_path}:\n{tail}"
        )
    if not args.keep_outputs:
        shutil.rmtree(output, ignore_errors=True)
    size = model_bytes(path)
    return {
        "layers": layers,
        "model_gb": round(size / GB, 3),
        "peak_rss_gb": round(m["peak_rss_bytes"] / GB, 3),
        "sampled_peak_rss_gb": round(m["sampled_peak_bytes"] / GB, 3),
        "seconds": round(m["seconds"], 1),
        "peak_over_model": round(m["peak_rss_bytes"] / size, 3),
        "lowbit_src": code,
        "rss_trace_s_gb": downsample(m["trace"], args.trace_points),
    }


def lowbit_version() -> str:
    from lowbit import __version__

    return __version__


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return ""


def git_commit() -> str:
    return _git("rev-parse", "--short", "HEAD").strip() or "unknown"


def src_state() -> str:
    """HEAD, plus the files of src/ that differ from it and a hash of that diff ("-dirty" runs)."""
    diff = _git("diff", "HEAD", "--", "src")
    if not diff:
        return git_commit()
    files = _git("diff", "HEAD", "--name-only", "--", "src").split()
    return f"{git_commit()}+dirty:{hashlib.sha256(diff.encode()).hexdigest()[:10]} ({', '.join(files)})"


def summarize(rows: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    small, large = min(rows, key=lambda r: r["layers"]), max(rows, key=lambda r: r["layers"])
    growth = large["peak_rss_gb"] / small["peak_rss_gb"] - 1 if len(rows) > 1 else None  # one depth: none
    over, n = large["peak_over_model"], large["layers"]
    goals = {f"peak{n} < {PEAK_OVER_MODEL_GOAL} * size{n}": over < PEAK_OVER_MODEL_GOAL}
    if growth is not None:
        goals = {f"growth < {GROWTH_GOAL}": growth < GROWTH_GOAL, **goals}
    return {
        "benchmark": f"peak RSS of `lowbit quantize --qformat {args.qformat} --algorithm {args.algorithm} "
        "--device cpu` on synthetic Llama models",
        "qformat": args.qformat,
        "algorithm": args.algorithm,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "lowbit_version": lowbit_version(),
        "git_commit": git_commit(),
        "lowbit_src": sorted({r["lowbit_src"] for r in rows}),
        "machine": {
            "cpus": os.cpu_count(),
            "ram_gb": round(psutil.virtual_memory().total / GB, 1),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "model": {
            "hidden": args.hidden,
            "intermediate": args.intermediate,
            "heads": 16,
            "kv_heads": 4,
            "dtype": "bfloat16",
            "seed": args.seed,
            "tokenizer": args.tokenizer,
        },
        "calibration": {
            "data": str(args.calib_data),
            "samples": args.calib_size,
            "seq_len": args.calib_seq_len,
            "batch_size": args.calib_batch_size or "auto",
        },
        "env": {k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "OMP_", "MKL_"))},
        "measure": "ru_maxrss of the quantize child from os.wait4 (its own high-water RSS); GB = 1e9 bytes",
        "models": rows,
        "growth": None if growth is None else round(growth, 3),
        "peak_over_model": over,
        "goals": goals,
        "passed": all(goals.values()),
    }


def to_json(result: dict[str, Any]) -> str:
    """Indented JSON with each list of numbers (the RSS timeline points) kept on one line."""
    text = json.dumps(result, indent=2)
    return (
        re.sub(r"\[\s+([-+\d.eE,\s]+?)\s+\]", lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]", text)
        + "\n"
    )


def table(result: dict[str, Any]) -> str:
    header = ("layers", "model GB", "peak RSS GB", "peak/model", "seconds")
    rows = [
        (
            str(r["layers"]),
            f"{r['model_gb']:.2f}",
            f"{r['peak_rss_gb']:.2f}",
            f"{r['peak_over_model']:.2f}",
            f"{r['seconds']:.0f}",
        )
        for r in result["models"]
    ]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in (header, *rows)]
    cal = result["calibration"]
    lines.insert(
        0,
        f"# lowbit quantize --qformat {result.get('qformat', 'fp8')} --algorithm {result.get('algorithm', 'max')} "
        f"--device cpu, calibration {cal['samples']} x {cal['seq_len']} "
        f"tokens ({Path(cal['data']).name}), lowbit {result['lowbit_version']} ({', '.join(result['lowbit_src'])})",
    )
    for goal, ok in result["goals"].items():
        value = result["growth"] if goal.startswith("growth") else result["peak_over_model"]
        lines.append(f"{'PASS' if ok else 'FAIL'}  {goal}: {value:.3f}")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--work-dir", default=str(REPO / ".bench" / "memory"), help="models and outputs (git-ignored)"
    )
    p.add_argument("--layers", type=int, nargs="+", default=[8, 32], help="one depth: no growth goal")
    p.add_argument("--qformat", default="fp8")
    p.add_argument("--algorithm", default="max", help="lowbit --algorithm (gptq, awq_full, ...)")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--calib-data",
        type=Path,
        default=default_calib(),
        help="default: lowbit's built-in calib.txt, else /work/shared/data/pydocs/calib.txt",
    )
    p.add_argument("--calib-size", type=int, default=32)
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--calib-batch-size", type=int, default=None, help="default: lowbit's automatic choice")
    p.add_argument("--rebuild", action="store_true", help="rebuild the synthetic models even if present")
    p.add_argument("--keep-outputs", action="store_true", help="keep the quantized checkpoints")
    p.add_argument("--sample-interval", type=float, default=0.1, help="seconds between psutil RSS samples")
    p.add_argument(
        "--trace-points", type=int, default=60, help="RSS timeline points kept per model in the JSON"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=REPO / "benchmarks" / "results" / "memory.json",
        help="JSON result; the table goes next to it as .txt",
    )
    args = p.parse_args(argv)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for layers in args.layers:
        made = json.loads((ensure_model(work, layers, args) / "synthetic.json").read_text())
    args.tokenizer = made["tokenizer_source"]
    rows = [run_model(work, layers, args) for layers in args.layers]
    result = summarize(rows, args)
    result["total_seconds"] = round(time.perf_counter() - start, 1)
    text = table(result)
    print(text, end="")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(to_json(result))
    args.out.with_suffix(".txt").write_text(text)
    print(f"wrote {args.out} and {args.out.with_suffix('.txt')}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

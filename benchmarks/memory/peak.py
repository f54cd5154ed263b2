"""Peak resident memory of any command (a peer tool's quantize run), optionally stopped after a time limit.

    python benchmarks/memory/peak.py --out benchmarks/results/peer-memory.jsonl --label llmc-gptq \
        --time-limit 1800 -- ~/.cache/lowbit-peers/llmcompressor/bin/python benchmarks/peers/llmcompressor_ptq.py ...

Appends one JSON line: label, command, exit code, seconds, peak RSS (`ru_maxrss` of the child from os.wait4,
and the max of psutil samples of its process tree), and `stopped`: a run stopped at the time limit reports
the peak it had reached, a lower bound of its whole run's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import GB, measure  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="JSONL file; one line per run is appended")
    p.add_argument("--label", required=True)
    p.add_argument("--time-limit", type=float, default=None, help="seconds, then SIGTERM (default: none)")
    p.add_argument("--log", type=Path, default=None, help="the command's output (default: OUT.LABEL.log)")
    p.add_argument("--sample-interval", type=float, default=0.5)
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- COMMAND ...")
    args = p.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        p.error("give the command after --")
    log = args.log or args.out.with_name(f"{args.out.stem}.{args.label}.log")
    m = measure(cmd, log, args.sample_interval, args.time_limit)
    row = {
        "label": args.label,
        "cmd": cmd,
        "returncode": m["returncode"],
        "stopped": m["stopped"],
        "seconds": round(m["seconds"], 1),
        "peak_rss_gb": round(m["peak_rss_bytes"] / GB, 3),
        "sampled_peak_rss_gb": round(m["sampled_peak_bytes"] / GB, 3),
        "log": str(log),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))
    return 0 if m["returncode"] == 0 or m["stopped"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

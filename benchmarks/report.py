"""Markdown tables from benchmark result files (JSON lines), for docs/results.md and docs/experiments/.

    python benchmarks/report.py benchmarks/results/lowbit-pydocs-max.jsonl \
        --peers benchmarks/results/peers-pydocs-max.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def fmt(value: object, digits: int = 5) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def label(config: object) -> str:
    """Short name of a peer's configuration (its config constant or scheme)."""
    if isinstance(config, dict):
        return str(config.get("config") or config.get("scheme") or "")
    return str(config or "")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("lowbit", type=Path)
    p.add_argument("--peers", type=Path, default=None)
    args = p.parse_args()
    ours = rows(args.lowbit)
    print("| preset | algorithm | ppl | base ppl | KL | top-1 | quantize s |")
    print("|---|---|---|---|---|---|---|")
    for r in ours:
        print(f"| {r['preset']} | {r['algorithm']} | {fmt(r['ppl'])} | {fmt(r['base_ppl'])} | {fmt(r['kl'], 4)} | "
              f"{fmt(r['top1_agree'], 4)} | {fmt(r['quant_seconds'], 4)} |")
    if not args.peers:
        return
    peers = rows(args.peers)
    print("\n| preset | lowbit KL | peer | peer config | peer KL | lowbit / peer | within 1.5x |")
    print("|---|---|---|---|---|---|---|")
    for r in ours:
        for q in (q for q in peers if q["preset"] == r["preset"]):
            if q.get("error"):
                print(f"| {r['preset']} | {fmt(r['kl'], 4)} | {q['tool']} | {label(q.get('peer_config'))} | "
                      f"error: {q['error'][:90]} | - | - |")
                continue
            ratio = r["kl"] / q["kl"] if q["kl"] else float("inf")
            print(f"| {r['preset']} | {fmt(r['kl'], 4)} | {q['tool']} | {label(q.get('peer_config'))} | "
                  f"{fmt(q['kl'], 4)} | {ratio:.3f} | {'yes' if ratio <= 1.5 else 'NO'} |")


if __name__ == "__main__":
    main()

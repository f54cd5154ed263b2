"""One table for lowbit and the peers (same model, calibration and evaluation), and the issue's goals.

    python benchmarks/side_by_side.py benchmarks/results/lowbit-pydocs-algorithms.jsonl \
        benchmarks/results/peers-pydocs-algorithms.jsonl [more.jsonl ...]

Prints: tool, preset, algorithm, perplexity, KL from the BF16 model, top-1 agreement, wall time of the
quantize call, peak resident memory (or the peer's error), then per preset lowbit's best KL against the
best peer's and lowbit's time against the faster peer's for the same preset and algorithm family.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

FAMILY = {  # algorithm -> family, to pair lowbit with a peer running "the same algorithm"
    "smoothquant": "smoothquant", "awq_lite": "awq", "awq_full": "awq", "awq_clip": "awq", "awq": "awq",
    "gptq": "gptq", "gptq_actorder": "gptq", "max": "max",
}  # fmt: skip


def rows(paths: list[Path]) -> list[dict]:
    out = []
    for p in paths:
        out += [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    for r in out:
        _label_sequential(r)
    return out


def _label_sequential(row: dict) -> None:
    """A lowbit row calibrated otherwise than its algorithm's default (sequential for AWQ / GPTQ, not for
    max / smoothquant) gets `--sequential` / `--no-sequential` in its algorithm, so that the time comparison
    pairs the peers with lowbit's default."""
    seq = row.get("params", {}).get("sequential")
    if row["tool"] != "lowbit" or seq is None or row.get("error"):
        return
    from lowbit.quant.recipe import SEQUENTIAL_STEPS, algorithm_steps

    if seq != bool(algorithm_steps(row["algorithm"]) & SEQUENTIAL_STEPS):
        row["algorithm"] += " --sequential" if seq else " --no-sequential"


def g(v: object, d: int = 4) -> str:
    return "-" if v is None else f"{v:.{d}g}" if isinstance(v, float) else str(v)


def family(algorithm: str) -> str:
    return FAMILY.get(algorithm, "+".join(sorted(FAMILY.get(s, s) for s in algorithm.split("+"))))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", type=Path, nargs="+")
    args = p.parse_args()
    all_rows = rows(args.files)
    print("| tool | preset | algorithm | ppl | KL | top-1 | quantize s | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in sorted(all_rows, key=lambda r: (r["preset"], r["tool"], r.get("algorithm", ""))):
        if r.get("error"):
            print(
                f"| {r['tool']} | {r['preset']} | {r.get('algorithm')} | error: {r['error'][:100]} | | | | |"
            )
            continue
        print(
            f"| {r['tool']} | {r['preset']} | {r.get('algorithm')} | {g(r.get('ppl'), 5)} | {g(r.get('kl'))} | "
            f"{g(r.get('top1_agree'))} | {g(r.get('quant_seconds'))} | {g(r.get('peak_rss_mb'))} |"
        )
    ok = [r for r in all_rows if not r.get("error")]
    ours = [r for r in ok if r["tool"] == "lowbit"]
    peers = [r for r in ok if r["tool"] != "lowbit"]
    print("\n| preset | lowbit best (algorithm) | best peer (tool, algorithm) | ratio | KL goal (<= 1) |")
    print("|---|---|---|---|---|")
    for preset in sorted({r["preset"] for r in peers if r.get("kl") is not None}):
        mine = [r for r in ours if r["preset"] == preset and r.get("kl") is not None]
        theirs = [r for r in peers if r["preset"] == preset and r.get("kl") is not None]
        if not mine:
            continue
        a = min(mine, key=lambda r: r["kl"])
        b = min(theirs, key=lambda r: r["kl"])
        ratio = a["kl"] / b["kl"]
        print(
            f"| {preset} | {g(a['kl'])} ({a['algorithm']}) | {g(b['kl'])} ({b['tool']}, {b['algorithm']}) | "
            f"{ratio:.3f} | {'met' if ratio <= 1 else 'NOT met'} |"
        )
    print("\n| preset | algorithm | lowbit s | faster peer s (tool) | ratio | time goal (<= 0.5) |")
    print("|---|---|---|---|---|---|")
    seconds = _median_seconds(ok)  # repeated runs of one (tool, preset, algorithm): their median, and how many
    for (tool, preset, algorithm), (mine, n) in sorted(seconds.items()):
        if tool != "lowbit":
            continue
        fam = family(algorithm)
        same = [(k, v) for k, v in seconds.items() if k[0] != "lowbit" and k[1] == preset and family(k[2]) == fam]
        if not same:
            continue
        (peer, _, peer_algorithm), (theirs, m) = min(same, key=lambda kv: kv[1][0])
        ratio = mine / theirs
        reps = f" (median of {n} / {m})" if max(n, m) > 1 else ""
        print(
            f"| {preset} | {algorithm} | {g(mine)} | {g(theirs)} ({peer}, {peer_algorithm}){reps} | {ratio:.2f} | "
            f"{'met' if ratio <= 0.5 else 'NOT met'} |"
        )


def _median_seconds(rows: list[dict]) -> dict[tuple[str, str, str], tuple[float, int]]:
    groups: dict[tuple[str, str, str], list[float]] = {}
    for r in rows:
        if r.get("quant_seconds"):
            groups.setdefault((r["tool"], r["preset"], r.get("algorithm", "")), []).append(r["quant_seconds"])
    return {k: (statistics.median(v), len(v)) for k, v in groups.items()}


if __name__ == "__main__":
    main()

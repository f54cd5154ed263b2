"""Markdown table of benchmarks/qat/run.py results (the last row of each preset x mode x iters x lr).

python benchmarks/qat/report.py benchmarks/results/qat-pydocs.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def fmt(x: object, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def main() -> None:
    rows: dict[tuple, dict] = {}
    for path in sys.argv[1:]:
        for line in Path(path).read_text().splitlines():
            r = json.loads(line)
            rows[(r["preset"], r["mode"], r.get("iters"), r.get("lr"))] = r
    print("| preset | mode | iters | lr | ppl | BF16 ppl | KL | top-1 | recovered | train s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows.values():
        recovered = f"{r['recovered']:.2f}" if r.get("recovered") is not None else "-"
        print(f"| {r['preset']} | {r['mode']} | {fmt(r.get('iters'))} | {fmt(r.get('lr'))} | {r['ppl']:.3f} | "
              f"{r['base_ppl']:.3f} | {fmt(r['kl'])} | {fmt(r['top1_agree'])} | {recovered} | "
              f"{fmt(r.get('seconds'), 4) if r['mode'] != 'ptq' else '-'} |")  # fmt: skip


if __name__ == "__main__":
    main()

"""How often a quantized MoE model routes a token to other experts than its BF16 model does.

Runs the BF16 model and a lowbit checkpoint of it on the first --windows windows of the eval text, records
each router's top-k expert set per token, and prints per layer the fraction of tokens whose expert set
changed. Each checkpoint's own routers see its own (quantized) hidden states, as at inference.

    python benchmarks/moe_routing.py --model /tmp/train/pydocs-qwen3_moe --checkpoint /tmp/moebench/ex-experts \
        --eval ../shared/data/pydocs/eval.txt --windows 20
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lowbit.data.text import eval_windows
from lowbit.loader import load_model
from lowbit.models.loading import load_tokenizer


def routed_sets(model: torch.nn.Module, windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """{router name: (tokens, k) sorted expert indices}."""
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, m in model.named_modules():
        if name.endswith("mlp.gate") and hasattr(m, "top_k"):
            def hook(mod, args, out, name=name):  # routers return (logits, weights, indices)
                seen.setdefault(name, []).append(out[2].sort(-1).values)
            hooks.append(m.register_forward_hook(hook))
    with torch.no_grad():
        for ids in windows.split(4):
            model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    return {k: torch.cat(v) for k, v in seen.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--checkpoint", required=True, nargs="+")
    p.add_argument("--eval", required=True)
    p.add_argument("--windows", type=int, default=20)
    args = p.parse_args()
    windows = eval_windows(args.eval, load_tokenizer(Path(args.model)), 512, args.windows)
    base = routed_sets(load_model(args.model)[0], windows)
    for ckpt in args.checkpoint:
        got = routed_sets(load_model(ckpt)[0], windows)
        changed = [float((got[k] != base[k]).any(-1).float().mean()) for k in base]
        print(f"{ckpt}: tokens routed differently per layer: " + " ".join(f"{c:.3f}" for c in changed))


if __name__ == "__main__":
    main()

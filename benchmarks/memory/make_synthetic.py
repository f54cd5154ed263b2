"""Write a synthetic Llama checkpoint (random BF16 weights) without ever holding the whole model in memory.

Layout of --out (a Hugging Face model directory that `AutoModelForCausalLM` and `lowbit quantize` read):
    config.json                              LlamaConfig, dtype bfloat16
    model-00001-of-0000n.safetensors         model.embed_tokens.weight
    model-00002-of-0000n.safetensors ...     one decoder layer each (model.layers.{i}.*)
    model-0000n-of-0000n.safetensors         model.norm.weight, lm_head.weight
    model.safetensors.index.json             weight_map over the shards
    synthetic.json                           the arguments it was made with
    tokenizer files                          copied from lowbit's built-in model, else pydocs-llama

Weights are N(0, 0.02^2) drawn in float32 and stored as BF16; norm weights are 1. Each shard has its own
generator seeded from (--seed, shard index), so a model is reproducible and the first layers of a deep
model equal those of a shallow one with the same seed and width. Peak memory is one shard (the embedding
or lm_head: vocab x hidden) in float32.

    python benchmarks/memory/make_synthetic.py --layers 32 --out .bench/memory/llama-32L   # ~3.2 GB
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[2]
TOKENIZER_SOURCES = (
    REPO / "src" / "lowbit" / "assets" / "stdlib-llama",
    Path("/work/shared/models/pydocs-llama"),
)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)
INIT_STD = 0.02


def tokenizer_source() -> Path:
    for src in TOKENIZER_SOURCES:
        if (src / "tokenizer.json").is_file() or (src / "tokenizer.model").is_file():
            return src
    raise SystemExit(f"no tokenizer found in any of {[str(s) for s in TOKENIZER_SOURCES]}")


def tokenizer_info(src: Path) -> tuple[int, dict[str, int]]:
    """(vocab size incl. added tokens, special token ids from the source's config.json)."""
    from transformers import AutoTokenizer

    size = len(AutoTokenizer.from_pretrained(src))
    ids: dict[str, int] = {}
    cfg = src / "config.json"
    if cfg.is_file():
        data = json.loads(cfg.read_text())
        ids = {
            k: data[k]
            for k in ("bos_token_id", "eos_token_id", "pad_token_id")
            if isinstance(data.get(k), int)
        }
    return size, ids


def layer_shapes(hidden: int, inter: int, heads: int, kv_heads: int) -> dict[str, tuple[int, ...]]:
    """Tensor name (inside model.layers.{i}) -> shape, as LlamaDecoderLayer names them."""
    head_dim = hidden // heads
    return {
        "input_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (heads * head_dim, hidden),
        "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
        "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
        "self_attn.o_proj.weight": (hidden, heads * head_dim),
        "post_attention_layernorm.weight": (hidden,),
        "mlp.gate_proj.weight": (inter, hidden),
        "mlp.up_proj.weight": (inter, hidden),
        "mlp.down_proj.weight": (hidden, inter),
    }


def shard_shapes(args: argparse.Namespace) -> Iterator[dict[str, tuple[int, ...]]]:
    """Each shard's {full tensor name: shape}: embedding, then one per decoder layer, then norm + lm_head."""
    yield {"model.embed_tokens.weight": (args.vocab, args.hidden)}
    per_layer = layer_shapes(args.hidden, args.intermediate, args.heads, args.kv_heads)
    for i in range(args.layers):
        yield {f"model.layers.{i}.{k}": shape for k, shape in per_layer.items()}
    yield {"model.norm.weight": (args.hidden,), "lm_head.weight": (args.vocab, args.hidden)}


def random_tensors(shapes: dict[str, tuple[int, ...]], generator: torch.Generator) -> dict[str, torch.Tensor]:
    out = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            out[name] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            out[name] = (torch.randn(shape, generator=generator) * INIT_STD).to(torch.bfloat16)
    return out


def write_config(args: argparse.Namespace, out: Path, special: dict[str, int]) -> None:
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        **special,
    )
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = torch.bfloat16
    config.save_pretrained(out)
    data = json.loads((out / "config.json").read_text())
    if data.get("dtype") != "bfloat16":
        raise SystemExit(f"config.json has dtype {data.get('dtype')!r}, expected 'bfloat16'")


def build(args: argparse.Namespace) -> Path:
    out = Path(args.out)
    src = tokenizer_source()
    tok_size, special = tokenizer_info(src)
    if args.vocab < tok_size:
        print(f"vocab {args.vocab} < tokenizer size {tok_size}: using {tok_size}", file=sys.stderr)
        args.vocab = tok_size
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)

    shards = list(shard_shapes(args))
    n = len(shards)
    weight_map: dict[str, str] = {}
    total = 0
    for s, shapes in enumerate(shards):
        file = f"model-{s + 1:05d}-of-{n:05d}.safetensors"
        generator = torch.Generator().manual_seed(args.seed * 1_000_003 + s)
        tensors = random_tensors(shapes, generator)
        save_file(tensors, str(tmp / file), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, file))
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    write_config(args, tmp, special)
    made = {
        k: getattr(args, k)
        for k in ("layers", "hidden", "intermediate", "heads", "kv_heads", "vocab", "seed")
    }
    made.update(tokenizer_source=str(src), total_size=total)
    (tmp / "synthetic.json").write_text(json.dumps(made, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, tmp / name)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    print(
        f"wrote {out}: {args.layers} layers, {total / 1e9:.2f} GB of BF16 weights in {n} shards "
        f"(tokenizer from {src}, vocab {args.vocab})"
    )
    return out


def check(out: Path) -> None:
    """config loads; tensor names and shapes equal those of LlamaForCausalLM built from it on meta."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(out)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    got: dict[str, tuple[int, ...]] = {}
    for file in sorted(set(weight_map.values())):
        with safe_open(out / file, "pt") as f:
            for k in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                got[k] = tuple(f.get_slice(k).get_shape())
                if f.get_slice(k).get_dtype() != "BF16":
                    raise SystemExit(f"{file}: {k} is {f.get_slice(k).get_dtype()}, expected BF16")
    if set(got) != set(weight_map):
        raise SystemExit("model.safetensors.index.json does not list exactly the tensors in the shards")
    if got != expected:
        missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        shapes = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])
        raise SystemExit(
            f"{out}: does not match {type(model).__name__}: missing {missing[:5]}, "
            f"extra {extra[:5]}, wrong shapes {shapes[:5]}"
        )
    print(f"checked {out}: {type(model).__name__}, {len(got)} tensors match its state dict")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, required=True, help="number of decoder layers")
    p.add_argument("--out", required=True, help="model directory to write (replaced if present)")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000, help="raised to the tokenizer's size if smaller")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-check", action="store_true", help="skip loading the result back with transformers")
    args = p.parse_args(argv)
    if args.hidden % args.heads or args.heads % args.kv_heads:
        p.error("--hidden must be divisible by --heads, and --heads by --kv-heads")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    out = build(args)
    if not args.no_check:
        check(out)
    print(f"done in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

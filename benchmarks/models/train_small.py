"""Train a small causal LM on the pydocs corpus for quantization-quality benchmarks.

The models are deliberately tiny (4 layers, hidden 256, GQA 4/2 heads, ~5M parameters) so they train on one
CPU thread in under half an hour, yet are real trained checkpoints of a given transformers architecture,
whose weight/activation statistics are those of a trained model, not of a random init. The shape matches
``/work/shared/models/pydocs-llama`` so results can be compared across architectures.

The script:

1. loads the tokenizer of ``/work/shared/models/pydocs-llama`` (byte-level BPE, vocab 4096) and tokenizes
   ``train.txt`` / ``valid.txt`` / ``eval.txt`` of ``/work/shared/data/pydocs`` as plain token streams
   (no special tokens);
2. builds the architecture chosen with ``--arch`` (one entry of ``ARCHS``; add another model by adding an
   entry) with random init from ``--seed``;
3. trains it on random ``SEQ_LEN``-token windows of the train stream with AdamW, linear warmup and cosine
   decay to 10% of the peak LR; the step count is ``--steps``, or planned at the end of warmup from the
   measured speed so that the run fits in ``--minutes`` (training stops early, with a warning, if the wall
   clock runs out anyway);
4. saves the model in BF16 (safetensors) with the tokenizer files, loads it back, and measures perplexity
   of the BF16 weights (computed in fp32) on ``valid.txt`` and ``eval.txt`` in non-overlapping
   ``SEQ_LEN``-token windows; everything is recorded in ``training.json`` next to the weights.

The model is built in a temporary directory next to ``--out`` and renamed into place at the end, so an
interrupted run leaves no half-written model (and a previous model at ``--out`` stays until replaced).

Run from the repository root::

    OMP_NUM_THREADS=1 python benchmarks/models/train_small.py --arch qwen3 --minutes 25
    OMP_NUM_THREADS=1 python benchmarks/models/train_small.py --arch qwen3 --steps 800   # fixed schedule
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import re
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

log = logging.getLogger("train_small")

DATA_DIR = Path("/work/shared/data/pydocs")
TOKENIZER_DIR = Path("/work/shared/models/pydocs-llama")
DEFAULT_OUT_ROOT = Path("~/.cache/lowbit-models")

SEQ_LEN = 512
BATCH = 8
EVAL_BATCH = 8
LR = 3e-3
WARMUP = 60
MIN_LR_FRAC = 0.1
WEIGHT_DECAY = 0.1
BETAS = (0.9, 0.95)
GRAD_CLIP = 1.0
LOG_EVERY = 25
VALID_EVERY = 200  # quick check on the first VALID_PROBE_WINDOWS windows of valid.txt (not counted in budget)
VALID_PROBE_WINDOWS = 16
KEEP_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
}
_SAFE_CUT = re.compile(r"(?<=\S)\n(?=\S)")

# Shape shared by all archs: the same as /work/shared/models/pydocs-llama.
COMMON_SHAPE = dict(
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    tie_word_embeddings=False,
    attention_bias=False,
    initializer_range=0.02,
)

# --arch name -> (transformers model_type, extra config kwargs on top of COMMON_SHAPE).
ARCHS: dict[str, tuple[str, dict]] = {
    # Qwen3: Llama-like, plus per-head RMSNorm on q and k (q_norm / k_norm).
    "qwen3": ("qwen3", dict(use_sliding_window=False, sliding_window=None)),
    "llama": ("llama", dict(mlp_bias=False)),
    # Qwen3-MoE with the dense model's active size: 4 experts of the dense intermediate size, top-1 routing,
    # every layer sparse; the router's load-balancing loss (output_router_logits) keeps every expert in use.
    "qwen3_moe": ("qwen3_moe", dict(use_sliding_window=False, sliding_window=None, num_experts=4,
                                    num_experts_per_tok=1, moe_intermediate_size=768, decoder_sparse_step=1,
                                    mlp_only_layers=[], norm_topk_prob=True, output_router_logits=True,
                                    router_aux_loss_coef=0.01)),
    # the same active size routed as Mixtral / Qwen3-MoE route: 8 experts of half the width, top-2
    "qwen3_moe_top2": ("qwen3_moe", dict(use_sliding_window=False, sliding_window=None, num_experts=8,
                                         num_experts_per_tok=2, moe_intermediate_size=384, decoder_sparse_step=1,
                                         mlp_only_layers=[], norm_topk_prob=True, output_router_logits=True,
                                         router_aux_loss_coef=0.01)),
}


def default_out(arch: str) -> Path:
    return (DEFAULT_OUT_ROOT / f"pydocs-{arch}").expanduser()


def model_config(arch: str, tok) -> PretrainedConfig:
    model_type, extra = ARCHS[arch]
    special = tok.convert_tokens_to_ids(tok.eos_token)
    return AutoConfig.for_model(
        model_type,
        vocab_size=len(tok),
        bos_token_id=special,
        eos_token_id=special,
        pad_token_id=special,
        **COMMON_SHAPE,
        **extra,
    )


def tokenize_stream(tok, text: str, chunk_chars: int = 1_000_000) -> torch.Tensor:
    """Token ids of ``text`` as one stream, without special tokens.

    Encoded in ~1 MB pieces cut right after a newline between two non-space characters, where the
    ByteLevel pre-tokenizer regex always splits, so the result equals encoding ``text`` in one call.
    """
    pieces, start = [], 0
    while start < len(text):
        m = _SAFE_CUT.search(text, start + chunk_chars)
        end = m.end() if m else len(text)
        pieces.append(text[start:end])
        start = end
    ids: list[int] = []
    for enc in tok.backend_tokenizer.encode_batch(pieces, add_special_tokens=False):
        ids.extend(enc.ids)
    return torch.tensor(ids, dtype=torch.long)


def make_optimizer(model: torch.nn.Module) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=LR, betas=BETAS)


def lr_at(step: int, total: int) -> float:
    """Linear warmup for WARMUP steps, then cosine decay from LR to MIN_LR_FRAC * LR at ``total``."""
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    progress = min(1.0, (step - WARMUP) / max(1, total - WARMUP))
    return LR * (MIN_LR_FRAC + (1 - MIN_LR_FRAC) * 0.5 * (1 + math.cos(math.pi * progress)))


def train_step(
    model, opt: torch.optim.Optimizer, stream: torch.Tensor, gen: torch.Generator, lr: float
) -> float:
    starts = torch.randint(0, len(stream) - SEQ_LEN + 1, (BATCH,), generator=gen)
    batch = torch.stack([stream[s : s + SEQ_LEN] for s in starts.tolist()])
    for group in opt.param_groups:
        group["lr"] = lr
    loss = model(input_ids=batch, labels=batch).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
    opt.step()
    return float(loss.detach())


@torch.no_grad()
def window_perplexity(model, ids: torch.Tensor, max_windows: int | None = None) -> tuple[float, int]:
    """exp(mean NLL) over consecutive non-overlapping SEQ_LEN windows (each window predicts SEQ_LEN-1)."""
    was_training = model.training
    model.eval()
    n_win = len(ids) // SEQ_LEN
    if max_windows is not None:
        n_win = min(n_win, max_windows)
    windows = ids[: n_win * SEQ_LEN].view(n_win, SEQ_LEN)
    nll, count = 0.0, 0
    for batch in windows.split(EVAL_BATCH):
        logits = model(input_ids=batch).logits.float()
        nll += float(
            torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1), reduction="sum"
            )
        )
        count += batch[:, 1:].numel()
    model.train(was_training)
    return math.exp(nll / count), n_win


def train(
    model,
    stream: torch.Tensor,
    valid: torch.Tensor,
    steps: int | None,
    budget_s: float,
    seed: int,
    stop_after: int | None = None,
) -> dict:
    """Train for ``steps`` steps, or, with ``steps=None``, for as many as fit in ``budget_s`` seconds.

    With ``steps=None`` the total (which fixes the cosine schedule) is planned at the end of warmup from the
    measured speed of the warmup steps: the LR during warmup does not depend on the total, so the run is
    exactly the one that ``--steps <that total>`` gives. Training stops early (with a warning) if the
    budget runs out anyway (the plan leaves an 8% margin for a machine that gets slower mid-run). Time
    spent in the periodic validation probes is not counted against it. ``stop_after`` ends the run after
    that many steps of the schedule (to reproduce a run that the budget cut short).
    """
    fixed = steps is not None
    if not fixed:
        steps = 10**9  # placeholder until the plan at the end of warmup
    model.train()
    opt = make_optimizer(model)
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    probes: list[dict] = []
    train_s = 0.0
    t_log = time.perf_counter()
    stopped_early = False
    step = 0
    while step < steps and (stop_after is None or step < stop_after):
        if train_s > budget_s:
            log.warning("wall-clock budget exhausted after %d/%d steps", step, steps)
            stopped_early = True
            break
        t0 = time.perf_counter()
        losses.append(train_step(model, opt, stream, gen, lr_at(step, steps)))
        train_s += time.perf_counter() - t0
        if not fixed and step + 1 == WARMUP:
            per_step = train_s / WARMUP
            steps = max(WARMUP + 1, WARMUP + int(0.92 * (budget_s - train_s) / per_step))
            log.info(
                "warmup done: %.2f s/step -> planning %d steps for %.1f min", per_step, steps, budget_s / 60
            )
        if (step + 1) % LOG_EVERY == 0 or step + 1 == steps:
            now = time.perf_counter()
            n = (step % LOG_EVERY) + 1
            log.info(
                "step %5d/%s  loss %.4f  lr %.2e  %.0f tok/s  %.1f min",
                step + 1,
                steps if fixed or step + 1 >= WARMUP else "?",
                sum(losses[-n:]) / n,
                lr_at(step, steps),
                n * BATCH * SEQ_LEN / (now - t_log),
                train_s / 60,
            )
        if (step + 1) % VALID_EVERY == 0 and step + 1 < steps:
            ppl, n_win = window_perplexity(model, valid, VALID_PROBE_WINDOWS)
            log.info("step %5d  valid probe ppl %.2f (%d windows)", step + 1, ppl, n_win)
            probes.append({"step": step + 1, "valid_probe_ppl": round(ppl, 3)})
        if (step + 1) % LOG_EVERY == 0:
            t_log = time.perf_counter()
        step += 1
    model.eval()
    return {
        "steps_planned": steps,
        "steps": len(losses),
        "losses": losses,
        "train_seconds": train_s,
        "stopped_early": stopped_early,
        "probes": probes,
    }


def save_model(model, tok, out: Path) -> None:
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    for extra in set(os.listdir(out)) - KEEP_FILES:
        log.info("removing extra file %s", extra)
        p = out / extra
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    for path in out.iterdir():
        path.chmod(0o644)  # safetensors is written through a 0600 temp file


def publish(tmp_model: Path, out: Path) -> None:
    """Rename ``tmp_model`` to ``out``, replacing (after the rename succeeds) any previous model there."""
    old = tmp_model.parent / (tmp_model.name + ".old")
    if out.exists():
        out.rename(old)
    tmp_model.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=sorted(ARCHS), default="qwen3")
    p.add_argument(
        "--out", type=Path, default=None, help="model directory (default: ~/.cache/lowbit-models/pydocs-ARCH)"
    )
    p.add_argument("--minutes", type=float, default=25.0, help="wall-clock training budget")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="fixed step count for the LR schedule (default: planned at the end of warmup to fit --minutes)",
    )
    p.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="stop after this many steps of the --steps schedule (reproduces a run cut short by --minutes)",
    )
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch and tokenizers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", type=Path, default=DATA_DIR, help="folder with train.txt, valid.txt, eval.txt")
    p.add_argument("--tokenizer", type=Path, default=TOKENIZER_DIR, help="folder to load the tokenizer from")
    args = p.parse_args(argv)
    args.out = (args.out.expanduser() if args.out else default_out(args.arch)).absolute()
    if args.out.resolve().is_relative_to(Path("/work/shared").resolve()):
        p.error("--out must not be under /work/shared")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)  # tokenizers' thread pool (read on first use)
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    t0 = time.perf_counter()
    command = shlex.join([Path(sys.executable).name, *sys.argv])

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    texts = {
        name: (args.data / f"{name}.txt").read_text(encoding="utf-8") for name in ("train", "valid", "eval")
    }
    streams = {name: tokenize_stream(tok, text) for name, text in texts.items()}
    for name, ids in streams.items():
        log.info("%s: %d bytes, %d tokens", name, len(texts[name].encode()), len(ids))

    torch.manual_seed(args.seed)
    config = model_config(args.arch, tok)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("%s: %s, %.2fM parameters", args.arch, type(model).__name__, n_params / 1e6)

    budget_s = args.minutes * 60
    run = train(model, streams["train"], streams["valid"], args.steps, budget_s, args.seed, args.stop_after)
    steps = run["steps_planned"]
    losses = run["losses"]
    tail = losses[-LOG_EVERY:]
    final_loss = sum(tail) / len(tail)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".build-{args.out.name}-", dir=args.out.parent) as tmp_name:
        model_dir = Path(tmp_name) / "model"
        save_model(model, tok, model_dir)

        loaded = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        assert loaded.config.model_type == ARCHS[args.arch][0]
        evals = {}
        for name in ("valid", "eval"):
            ppl, n_win = window_perplexity(loaded, streams[name])
            evals[name] = {"ppl": round(ppl, 4), "tokens": len(streams[name]), "windows": n_win}
            log.info("%s perplexity %.3f over %d windows of %d tokens", name, ppl, n_win, SEQ_LEN)

        record = {
            "arch": args.arch,
            "model_type": config.model_type,
            "model_class": type(loaded).__name__,
            "n_parameters": n_params,
            "corpus": {
                "train": str(args.data / "train.txt"),
                "valid": str(args.data / "valid.txt"),
                "eval": str(args.data / "eval.txt"),
                "train_tokens": len(streams["train"]),
            },
            "tokenizer": str(args.tokenizer),
            "hyperparameters": {
                "seq_len": SEQ_LEN,
                "batch_size": BATCH,
                "tokens_per_step": SEQ_LEN * BATCH,
                "sampling": "uniformly random windows of the train token stream",
                "lr": LR,
                "warmup_steps": WARMUP,
                "schedule": f"linear warmup, cosine to {MIN_LR_FRAC}x lr at steps_planned",
                "optimizer": "AdamW",
                "betas": list(BETAS),
                "weight_decay": WEIGHT_DECAY,
                "weight_decay_on": "params with ndim >= 2",
                "grad_clip": GRAD_CLIP,
                "train_dtype": "float32",
                "saved_dtype": "bfloat16",
                "threads": args.threads,
                "budget_minutes": args.minutes,
            },
            "seed": args.seed,
            "steps_planned": steps,
            "steps_planned_from": "--steps" if args.steps else "speed of the warmup steps vs --minutes",
            "steps": run["steps"],
            "stopped_early_by_budget": run["stopped_early"],
            "train_tokens_seen": run["steps"] * BATCH * SEQ_LEN,
            "train_seconds": round(run["train_seconds"], 1),
            "total_seconds": round(time.perf_counter() - t0, 1),
            "final_train_loss": round(final_loss, 4),
            "final_train_loss_note": f"mean over the last {len(tail)} steps (fp32 training weights)",
            "valid_probes": run["probes"],
            "valid_ppl": evals["valid"]["ppl"],
            "eval_ppl": evals["eval"]["ppl"],
            "perplexity_protocol": f"non-overlapping {SEQ_LEN}-token windows of the whole file's token stream "
            "(no special tokens, remainder dropped), mean NLL over the predicted tokens, exp; "
            "BF16 weights loaded back, computed in fp32",
            "perplexity_details": evals,
            "python_version": platform.python_version(),
            "torch_version": torch.__version__,
            "transformers_version": transformers.__version__,
            "command": command,
            "rebuild_command": (
                f"OMP_NUM_THREADS={args.threads} python benchmarks/models/train_small.py --arch {args.arch} "
                f"--steps {steps} --minutes {args.minutes:g} --threads {args.threads} --seed {args.seed}"
                + (f" --stop-after {run['steps']}" if run["steps"] < steps else "")
            ),
        }
        (model_dir / "training.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        (model_dir / "training.json").chmod(0o644)
        publish(model_dir, args.out)
    log.info("wrote %s in %.1f min", args.out, (time.perf_counter() - t0) / 60)


if __name__ == "__main__":
    sys.exit(main())

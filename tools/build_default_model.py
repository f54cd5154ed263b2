"""Rebuild lowbit's built-in default model ("stdlib-llama") and its calibration/eval text.

The corpus is the Python standard library's own ``*.py`` sources, which every Python installation has, so
the model can be rebuilt anywhere without network access. The script:

1. collects ``*.py`` under ``sysconfig.get_paths()["stdlib"]`` (excluding ``site-packages``), sorted by
   relative path, and splits them ~95/5 into train / held-out files by ``zlib.crc32`` of the path;
2. trains a 2048-token byte-level BPE tokenizer on the train text;
3. trains a tiny Llama (4 layers, hidden 256, GQA 4/2 heads) on random 256-token windows of the train
   stream for a wall-clock budget, with the LR schedule fixed to a step count (``--steps``, or estimated
   from a 10-step timing so the run fits in ``--minutes``);
4. saves the model in BF16 with its tokenizer, writes ``text/calib.txt`` (train text) and ``text/eval.txt``
   (held-out text), measures held-out perplexity on ``eval.txt`` with the BF16 weights, and records
   everything in ``stdlib-llama/training.json``.

Outputs are built in a temporary directory next to ``--out`` and moved into place at the end, so an
interrupted run leaves no half-written model.

Run from the repository root::

    python tools/build_default_model.py                # ~12 min of training on 1 thread
    python tools/build_default_model.py --steps 300    # fixed step count (exactly reproducible)
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import platform
import re
import shutil
import sys
import sysconfig
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

log = logging.getLogger("build_default_model")

MODEL_DIR = "stdlib-llama"
TEXT_DIR = "text"
EOS = "<|endoftext|>"
VOCAB_SIZE = 2048
HELDOUT_PERCENT = 5
TRAIN_CAP_BYTES = 25_000_000
CALIB_BYTES = 250_000
EVAL_BYTES = 120_000
SEQ_LEN = 256
BATCH = 16
LR = 3e-3
WARMUP = 100
MIN_LR_FRAC = 0.1
WEIGHT_DECAY = 0.1
BETAS = (0.9, 0.95)
GRAD_CLIP = 1.0
LOG_EVERY = 50
MODEL_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
}
_SAFE_CUT = re.compile(r"(?<=\S)\n(?=\S)")


@dataclass
class Corpus:
    train: list[str] = field(default_factory=list)
    heldout: list[str] = field(default_factory=list)
    n_files: int = 0
    n_train_files: int = 0
    n_heldout_files: int = 0
    n_train_dropped_by_cap: int = 0
    train_bytes: int = 0
    heldout_bytes: int = 0


def load_corpus(root: Path) -> Corpus:
    """Read stdlib ``*.py`` files in sorted order and split them by a stable hash of the relative path."""
    paths = sorted(
        (p.relative_to(root).as_posix(), p)
        for p in root.rglob("*.py")
        if "site-packages" not in p.relative_to(root).parts and p.is_file()
    )
    corpus = Corpus(n_files=len(paths))
    for rel, path in paths:
        text = path.read_text(encoding="utf-8", errors="replace")
        size = len(text.encode("utf-8"))
        if zlib.crc32(rel.encode("utf-8")) % 100 < HELDOUT_PERCENT:
            corpus.heldout.append(text)
            corpus.n_heldout_files += 1
            corpus.heldout_bytes += size
        elif corpus.train_bytes + size <= TRAIN_CAP_BYTES and not corpus.n_train_dropped_by_cap:
            corpus.train.append(text)
            corpus.n_train_files += 1
            corpus.train_bytes += size
        else:
            corpus.n_train_dropped_by_cap += 1
    return corpus


def cut_lines(text: str, start: int, max_bytes: int) -> str:
    """Contiguous slice of ``text`` starting at the first line at/after ``start``, ending on a line break."""
    if start > 0:
        start = text.index("\n", start - 1) + 1
    chunk = text[start : start + max_bytes].encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
    return chunk[: chunk.rindex("\n") + 1]


def train_tokenizer(docs: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[EOS],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(docs, trainer=trainer)
    assert tok.token_to_id(EOS) == 0 and tok.get_vocab_size() == VOCAB_SIZE
    return tok


def tokenize_stream(tok: Tokenizer, text: str, chunk_chars: int = 1_000_000) -> torch.Tensor:
    """Token ids of ``text`` as one stream.

    Encoded in ~1 MB pieces cut at a newline between two non-space characters, which the ByteLevel
    pre-tokenizer regex never merges across, so the result equals encoding ``text`` in one call.
    """
    pieces, start = [], 0
    while start < len(text):
        m = _SAFE_CUT.search(text, start + chunk_chars)
        end = m.end() if m else len(text)
        pieces.append(text[start:end])
        start = end
    ids: list[int] = []
    for enc in tok.encode_batch(pieces, add_special_tokens=False):
        ids.extend(enc.ids)
    return torch.tensor(ids, dtype=torch.long)


def model_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )


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
    model: LlamaForCausalLM, opt: torch.optim.Optimizer, stream: torch.Tensor, gen: torch.Generator, lr: float
) -> float:
    starts = torch.randint(0, len(stream) - SEQ_LEN, (BATCH,), generator=gen)
    batch = torch.stack([stream[s : s + SEQ_LEN] for s in starts.tolist()])
    for group in opt.param_groups:
        group["lr"] = lr
    loss = model(input_ids=batch, labels=batch).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
    opt.step()
    return float(loss.detach())


def estimate_steps(model: LlamaForCausalLM, stream: torch.Tensor, budget_s: float) -> int:
    """Time 10 steps on a throwaway copy (after 2 warmup steps) and fit the step count into ``budget_s``."""
    probe = copy.deepcopy(model)
    opt = make_optimizer(probe)
    gen = torch.Generator().manual_seed(12345)
    for _ in range(2):
        train_step(probe, opt, stream, gen, LR)
    t0 = time.perf_counter()
    for _ in range(10):
        train_step(probe, opt, stream, gen, LR)
    per_step = (time.perf_counter() - t0) / 10
    steps = max(WARMUP + 1, int(0.95 * budget_s / per_step))
    log.info("timing: %.2f s/step -> planning %d steps for %.1f min", per_step, steps, budget_s / 60)
    return steps


def train(
    model: LlamaForCausalLM, stream: torch.Tensor, steps: int, budget_s: float, seed: int
) -> tuple[int, list[float], float]:
    """Run up to ``steps`` steps (stopping early if the wall-clock budget runs out)."""
    model.train()
    opt = make_optimizer(model)
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    t_start = t_log = time.perf_counter()
    for step in range(steps):
        if time.perf_counter() - t_start > budget_s:
            log.warning("wall-clock budget exhausted after %d/%d steps", step, steps)
            break
        losses.append(train_step(model, opt, stream, gen, lr_at(step, steps)))
        if (step + 1) % LOG_EVERY == 0 or step + 1 == steps:
            now = time.perf_counter()
            n = (step % LOG_EVERY) + 1
            log.info(
                "step %5d/%d  loss %.4f  lr %.2e  %.0f tok/s",
                step + 1,
                steps,
                sum(losses[-n:]) / n,
                lr_at(step, steps),
                n * BATCH * SEQ_LEN / (now - t_log),
            )
            t_log = now
    model.eval()
    return len(losses), losses, (time.perf_counter() - t_start) / 60


@torch.no_grad()
def window_perplexity(model: torch.nn.Module, ids: torch.Tensor, seq_len: int = SEQ_LEN) -> tuple[float, int]:
    """exp(mean NLL) over consecutive non-overlapping ``seq_len`` windows (each window predicts seq_len-1)."""
    n_win = len(ids) // seq_len
    windows = ids[: n_win * seq_len].view(n_win, seq_len)
    nll, count = 0.0, 0
    for batch in windows.split(BATCH):
        logits = model(input_ids=batch).logits.float()
        nll += float(
            torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1), reduction="sum"
            )
        )
        count += batch[:, 1:].numel()
    return math.exp(nll / count), n_win


def save_model(model: LlamaForCausalLM, tok: Tokenizer, out: Path) -> None:
    model.to(torch.bfloat16).save_pretrained(out)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=EOS,
        model_max_length=model.config.max_position_embeddings,
    )
    fast.save_pretrained(out)
    for extra in set(os.listdir(out)) - MODEL_FILES:
        log.info("removing extra file %s", extra)
        (out / extra).unlink()
    for path in out.iterdir():
        path.chmod(0o644)  # safetensors is written through a 0600 temp file


def rebuild_command(args: argparse.Namespace, steps: int) -> str:
    return (
        f"python tools/build_default_model.py --steps {steps} --minutes {args.minutes:g} "
        f"--threads {args.threads} --seed {args.seed}"
    )


def publish(tmp: Path, out: Path) -> None:
    """Move the built model dir and text files from ``tmp`` into ``out`` (each step is a rename)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / TEXT_DIR).mkdir(exist_ok=True)
    for name in ("calib.txt", "eval.txt"):
        os.replace(tmp / TEXT_DIR / name, out / TEXT_DIR / name)
    final = out / MODEL_DIR
    old = tmp / "old-model"
    if final.exists():
        final.rename(old)
    (tmp / MODEL_DIR).rename(final)
    shutil.rmtree(old, ignore_errors=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("src/lowbit/assets"), help="assets directory")
    p.add_argument("--minutes", type=float, default=12.0, help="wall-clock training budget")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="fixed step count for the LR schedule (default: estimated to fit --minutes)",
    )
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch and tokenizers")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)  # tokenizers' thread pool (read on first use)
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    t0 = time.perf_counter()

    root = Path(sysconfig.get_paths()["stdlib"])
    corpus = load_corpus(root)
    log.info(
        "corpus %s: %d files, %d train (%.1f MB, %d dropped by cap), %d held-out (%.1f MB)",
        root,
        corpus.n_files,
        corpus.n_train_files,
        corpus.train_bytes / 1e6,
        corpus.n_train_dropped_by_cap,
        corpus.n_heldout_files,
        corpus.heldout_bytes / 1e6,
    )
    train_text = "\n\n".join(corpus.train)
    calib_text = cut_lines(train_text, len(train_text) // 3, CALIB_BYTES)
    eval_text = cut_lines("\n\n".join(corpus.heldout), 0, EVAL_BYTES)

    tok = train_tokenizer(corpus.train)
    stream = tokenize_stream(tok, train_text)
    log.info(
        "tokenizer trained; train stream %d tokens (%.2f bytes/token)",
        len(stream),
        corpus.train_bytes / len(stream),
    )

    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(model_config())
    n_params = sum(p.numel() for p in model.parameters())
    budget_s = args.minutes * 60
    steps = args.steps or estimate_steps(model, stream, budget_s)
    steps_run, losses, wall_min = train(model, stream, steps, budget_s, args.seed)
    final_loss = sum(losses[-LOG_EVERY:]) / len(losses[-LOG_EVERY:])

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".build-", dir=args.out) as tmp_name:
        tmp = Path(tmp_name)
        (tmp / TEXT_DIR).mkdir()
        (tmp / TEXT_DIR / "calib.txt").write_text(calib_text, encoding="utf-8")
        (tmp / TEXT_DIR / "eval.txt").write_text(eval_text, encoding="utf-8")
        model_dir = tmp / MODEL_DIR
        save_model(model, tok, model_dir)

        loaded = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        hf_tok = transformers.AutoTokenizer.from_pretrained(model_dir)
        eval_ids = torch.tensor(hf_tok.backend_tokenizer.encode(eval_text, add_special_tokens=False).ids)
        ppl, n_win = window_perplexity(loaded, eval_ids)
        log.info("held-out perplexity %.3f over %d windows of %d tokens", ppl, n_win, SEQ_LEN)

        record = {
            "python_version": platform.python_version(),
            "torch_version": torch.__version__,
            "transformers_version": transformers.__version__,
            "corpus": {
                "source": "*.py under sysconfig.get_paths()['stdlib'], excluding site-packages, sorted",
                "split": f"held-out if zlib.crc32(relative_path) % 100 < {HELDOUT_PERCENT}",
                "files_total": corpus.n_files,
                "train_files": corpus.n_train_files,
                "train_files_dropped_by_cap": corpus.n_train_dropped_by_cap,
                "heldout_files": corpus.n_heldout_files,
                "train_bytes": corpus.train_bytes,
                "heldout_bytes": corpus.heldout_bytes,
                "train_cap_bytes": TRAIN_CAP_BYTES,
                "train_tokens": len(stream),
            },
            "text_files": {"calib.txt": len(calib_text.encode()), "eval.txt": len(eval_text.encode())},
            "n_parameters": n_params,
            "hyperparameters": {
                "vocab_size": VOCAB_SIZE,
                "seq_len": SEQ_LEN,
                "batch_size": BATCH,
                "lr": LR,
                "warmup_steps": WARMUP,
                "schedule": f"cosine to {MIN_LR_FRAC}x lr",
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
            "steps": steps_run,
            "train_wall_minutes": round(wall_min, 2),
            "total_wall_minutes": round((time.perf_counter() - t0) / 60, 2),
            "final_train_loss": round(final_loss, 4),
            "final_train_loss_note": f"mean over the last {len(losses[-LOG_EVERY:])} steps",
            "heldout_perplexity": round(ppl, 4),
            "heldout_eval": {
                "text": "text/eval.txt",
                "protocol": f"non-overlapping {SEQ_LEN}-token windows, no special "
                "tokens, mean NLL over predicted tokens, exp; BF16 weights loaded back, computed in fp32",
                "tokens": len(eval_ids),
                "windows": n_win,
            },
            "rebuild_command": rebuild_command(args, steps),
        }
        (model_dir / "training.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        publish(tmp, args.out)
    log.info(
        "wrote %s and %s in %.1f min",
        args.out / MODEL_DIR,
        args.out / TEXT_DIR,
        (time.perf_counter() - t0) / 60,
    )


if __name__ == "__main__":
    sys.exit(main())

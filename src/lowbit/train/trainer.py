"""`lowbit qat`: quantization-aware training (and distillation) of a lowbit quantized checkpoint.

One process, or one per device under torchrun (DDP, or FSDP2 with `dist.fsdp=true`; gloo on CPU, nccl on
GPU). Iteration i: the global batch of `data.Order`, split over the ranks, each rank's share in micro
batches with gradient accumulation; AdamW on every parameter (quantizer statistics are frozen buffers unless
`qat.learn_scales`), gradient clipping, the learning rate of the schedule at i.

A save (every `checkpoint.save_interval` iterations and at the end) is a complete lowbit checkpoint
`SAVE/iter_0000200/` that export / generate / eval / inspect accept, plus `trainer/` inside it: the fp32
master state, the optimizer state and the iteration. It is built in `iter_0000200.partial` and renamed when
complete; then `SAVE/latest` (a symlink) is switched to it atomically. A run whose `checkpoint.save` (or
`checkpoint.load`) holds a `latest` resumes from it: same weights, optimizer state and data order.
`SAVE/metrics.jsonl` gets one JSON line per iteration (loss, lr, tokens/s) and per evaluation.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from lowbit.checkpoint.load import is_lowbit_checkpoint, read_manifest
from lowbit.checkpoint.store import CheckpointWriter, write_json
from lowbit.errors import LowbitError
from lowbit.formats.scaled import ScaledFormat, reduce_amax
from lowbit.loader import load_model
from lowbit.models.conv1d import conv1d_names, transposed
from lowbit.models.loading import (
    build_meta_model,
    load_config,
    load_config_json,
    load_tokenizer,
    model_files_for_copy,
)
from lowbit.quant.qat import prepare_qat
from lowbit.train.config import Config, to_dict
from lowbit.train.data import Order, TrainData, load_data

log = logging.getLogger(__name__)
LATEST = "latest"
TRAINER_DIR = "trainer"
METRICS = "metrics.jsonl"
# settings a resumed run must share with the run it continues (they fix the data order)
# Fault injection for the kill-and-resume tests: SIGKILL this process right after the optimizer step of
# that iteration, before anything else of it (its save) happens; as a crash would.
KILL_AT_ENV = "LOWBIT_TEST_KILL_AT_ITERATION"
ORDER_KEYS = (("data", "path"), ("data", "seq_length"), ("data", "seed"), ("data", "eval_path"),
              ("train", "global_batch_size"))  # fmt: skip


# --- processes --------------------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    initialized: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.initialized:
            torch.distributed.barrier()

    def all_sum(self, values: list[float]) -> list[float]:
        if not self.initialized:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return [float(v) for v in t.cpu()]


def setup_dist(backend: str, device: str) -> Dist:
    """One process, or the torchrun process group (WORLD_SIZE / RANK / LOCAL_RANK in the environment)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise LowbitError("dist.device=cuda but no CUDA device is visible; use dist.device=cpu")
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world == 1:
        return Dist(device=dev)
    chosen = ("nccl" if use_cuda else "gloo") if backend == "auto" else backend
    if chosen == "nccl" and not use_cuda:
        raise LowbitError("dist.backend=nccl needs CUDA devices; use dist.backend=gloo on CPU")
    torch.distributed.init_process_group(chosen)
    return Dist(torch.distributed.get_rank(), world, dev, True)


# --- losses -----------------------------------------------------------------------------------------------


def lm_loss(logits: Tensor, ids: Tensor) -> Tensor:
    """Mean next-token cross entropy."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def kd_loss(logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Mean KL(teacher || student) per position at `temperature`, times temperature**2 (Hinton et al.)."""
    s = F.log_softmax(logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean() * temperature**2


def lr_at(cfg: Config, iteration: int) -> float:
    """Learning rate for 0-based `iteration`: linear warmup, then constant / linear / cosine to min_lr."""
    o, s = cfg.optimizer, cfg.scheduler
    if iteration < s.lr_warmup_iters:
        return o.lr * (iteration + 1) / s.lr_warmup_iters
    if s.lr_decay_style == "constant":
        return o.lr
    decay_iters = s.lr_decay_iters or cfg.train.train_iters
    span = max(decay_iters - s.lr_warmup_iters, 1)
    frac = min(max(iteration - s.lr_warmup_iters, 0) / span, 1.0)
    coeff = 1 - frac if s.lr_decay_style == "linear" else 0.5 * (1 + math.cos(math.pi * frac))
    return o.min_lr + coeff * (o.lr - o.min_lr)


# --- the run ----------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    save_dir: Path | None
    iteration: int
    final_loss: float | None
    eval_loss: float | None
    resumed_from: int | None
    seconds: float


@dataclass
class _Start:
    model_dir: Path  # the lowbit checkpoint whose structure and manifest the run uses
    state_dir: Path | None  # trainer/ state to resume from (None: a fresh run)
    weights_dir: Path | None  # trainer/ state whose weights (only) to start from (checkpoint.finetune)


def _latest(run_dir: Path) -> Path | None:
    link = run_dir / LATEST
    if not link.exists():
        return None
    target = link.resolve()
    if not (target / TRAINER_DIR / "state.json").is_file():
        raise LowbitError(
            f"{link} points at {target}, which holds no trainer state; delete {link} to start over"
        )
    return target


def _resolve_start(cfg: Config) -> _Start:
    c = cfg.checkpoint
    run_dir = Path(c.save) if c.save else None
    load_dir = Path(c.load) if c.load else run_dir
    previous = _latest(load_dir) if load_dir is not None and load_dir.is_dir() else None
    if c.load and previous is None:
        raise LowbitError(f"checkpoint.load {c.load!r} holds no '{LATEST}' save to load; check the path")
    if c.finetune:
        if run_dir is not None and run_dir.is_dir() and _latest(run_dir) is not None:
            raise LowbitError(
                f"checkpoint.save {c.save!r} already holds a run; with checkpoint.finetune=true "
                "choose a new checkpoint.save (its saves would be overwritten)"
            )
        if previous is not None:
            return _Start(previous, None, previous)
    elif previous is not None:
        return _Start(previous, previous, None)
    if c.pretrained_checkpoint is None:
        raise LowbitError("no checkpoint to train: set checkpoint.pretrained_checkpoint=DIR")
    pretrained = Path(c.pretrained_checkpoint)
    if not is_lowbit_checkpoint(pretrained):
        raise LowbitError(
            f"checkpoint.pretrained_checkpoint {str(pretrained)!r} is not a lowbit quantized checkpoint "
            "(no lowbit.json); make one with lowbit quantize --output DIR"
        )
    return _Start(pretrained, None, None)


def run(cfg: Config, progress: bool = True) -> RunResult:
    """Train as configured; see the module docstring."""
    dist = setup_dist(cfg.dist.backend, cfg.dist.device)
    try:
        return _Trainer(cfg, dist, progress).train()
    finally:
        if dist.initialized:
            torch.distributed.destroy_process_group()


class _Trainer:
    def __init__(self, cfg: Config, dist: Dist, progress: bool) -> None:
        self.cfg, self.dist = cfg, dist
        self.progress = progress and dist.main
        t = cfg.train
        if t.global_batch_size % (t.micro_batch_size * dist.world):
            raise LowbitError(
                f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
                f"train.micro_batch_size ({t.micro_batch_size}) x processes ({dist.world})"
            )
        self.run_dir = Path(cfg.checkpoint.save) if cfg.checkpoint.save else None
        self.start = _resolve_start(cfg)
        self.manifest = read_manifest(self.start.model_dir)
        self.state = self._read_state()
        torch.manual_seed(cfg.data.seed)

        tokenizer = load_tokenizer(self.start.model_dir)
        n_eval = t.eval_iters * t.global_batch_size
        self.data: TrainData = load_data(cfg.data.path, cfg.data.eval_path, tokenizer, cfg.data.seq_length,
                                         n_eval)  # fmt: skip
        self.order = Order(len(self.data.train), t.global_batch_size, cfg.data.seed)

        model, _ = load_model(self.start.model_dir, "cpu", torch.float32)
        self.storage = _storage_dtypes(self.start.model_dir)
        # GPT-2's quantized Conv1D layers train as Linears and are saved in the checkpoint's layout
        self.conv1d = conv1d_names(build_meta_model(load_config(self.start.model_dir))) & set(
            self.manifest["modules"]
        )
        self.recompute: dict[str, ScaledFormat] = {}
        self.report = prepare_qat(model, cfg.qat.learn_scales, cfg.qat.recompute_block_scales,
                                  _fused_groups(model))  # fmt: skip
        for name in self.report.recomputed:
            linear_name = name.removesuffix(".weight_quantizer.0")
            self.recompute[linear_name] = model.get_submodule(name).fmt  # type: ignore[assignment]
        weights_from = self.start.state_dir or self.start.weights_dir
        if weights_from is not None:
            master = load_file(str(weights_from / TRAINER_DIR / "model.safetensors"))
            try:
                model.load_state_dict(master, strict=True)
            except RuntimeError:
                raise LowbitError(
                    f"{weights_from}: the trainer state does not match the model; it is damaged"
                ) from None
        model.train()
        self.raw = model
        self.model = self._wrap(model)
        params = [p for p in self.model.parameters() if p.requires_grad]
        o = cfg.optimizer
        self.optimizer = torch.optim.AdamW(params, lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps,
                                           weight_decay=o.weight_decay)  # fmt: skip
        if self.start.state_dir is not None:
            self._load_optimizer(self.start.state_dir / TRAINER_DIR / "optimizer.pt")
        self.teacher = self._teacher() if cfg.distill.enabled else None
        self.autocast = (
            torch.autocast(dist.device.type, dtype=torch.bfloat16)
            if cfg.model.dtype == "bfloat16"
            else contextlib.nullcontext()
        )

    # -- set-up --

    def _read_state(self) -> dict[str, Any]:
        if self.start.state_dir is None:
            return {"iteration": 0}
        state = dict(json.loads((self.start.state_dir / TRAINER_DIR / "state.json").read_text()))
        saved, now = state.get("config", {}), to_dict(self.cfg)
        for section, key in ORDER_KEYS:
            if saved.get(section, {}).get(key) != now[section][key]:
                raise LowbitError(
                    f"resuming {self.start.state_dir} with {section}.{key}={now[section][key]!r}, but the run "
                    f"used {saved.get(section, {}).get(key)!r}: the data order would change; "
                    f"use the same value, or a new checkpoint.save"
                )
        return state

    def _wrap(self, model: nn.Module) -> nn.Module:
        """The model on its device: as it is (one process), under DDP, or sharded by FSDP2, which moves
        only each rank's shard to the device (a model larger than one device never lands whole on it)."""
        if not (self.dist.initialized and self.cfg.dist.fsdp):
            model.to(self.dist.device)
        if not self.dist.initialized:
            return model
        if self.cfg.dist.fsdp:
            from torch.distributed.fsdp import fully_shard

            layers = model.get_submodule(self.manifest["layers"])
            for layer in layers.children():
                fully_shard(layer)
            fully_shard(model)
            return model
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
        # quantizer statistics are identical on every rank (same checkpoint): no per-forward buffer sync
        return DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False)

    def _load_optimizer(self, path: Path) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        state = torch.load(path, map_location="cpu", weights_only=True)
        set_optimizer_state_dict(self.model, self.optimizer, state,
                                 options=StateDictOptions(full_state_dict=True))  # fmt: skip

    def _teacher(self) -> nn.Module:
        d = self.cfg.distill
        teacher_path = d.teacher or self.manifest.get("source_model")
        if not teacher_path or not Path(teacher_path).is_dir():
            raise LowbitError(
                f"distill.teacher {teacher_path!r} is not a model directory; set distill.teacher=DIR "
                "(the BF16 model the checkpoint was quantized from)"
            )
        if is_lowbit_checkpoint(teacher_path):
            log.warning("distill.teacher %s is itself a quantized checkpoint", teacher_path)
        teacher, _ = load_model(teacher_path, self.dist.device, torch.float32)
        teacher.eval().requires_grad_(False)
        if getattr(teacher.config, "vocab_size", None) != getattr(self.raw.config, "vocab_size", None):
            raise LowbitError(f"distill.teacher {teacher_path} has another vocabulary than the student")
        return teacher

    # -- training --

    def train(self) -> RunResult:
        cfg, t = self.cfg, self.cfg.train
        start_it = int(self.state["iteration"])
        resumed = start_it if self.start.state_dir is not None else None
        began = time.perf_counter()
        if self.dist.main:
            self._announce(resumed)
        if start_it >= t.train_iters:
            log.info("the run is already at iteration %d of %d: nothing to train", start_it, t.train_iters)
            return RunResult(self.run_dir, start_it, None, None, resumed, 0.0)
        bar = tqdm(total=t.train_iters, initial=start_it, desc="qat", unit="it", disable=not self.progress)
        window: list[dict[str, float]] = []
        last: dict[str, float] = {}
        eval_loss = None
        tick = time.perf_counter()
        it = start_it
        for it in range(start_it + 1, t.train_iters + 1):  # 1-based, as the reference logs
            last = self._step(it - 1)
            if os.environ.get(KILL_AT_ENV) == str(it):
                os.kill(os.getpid(), signal.SIGKILL)
            window.append(last)
            self._record({"iteration": it, **last})
            bar.update(1)
            bar.set_postfix(loss=f"{last['loss']:.4f}")
            if it % cfg.logger.log_interval == 0 or it == t.train_iters:
                now = time.perf_counter()
                tokens = len(window) * t.global_batch_size * cfg.data.seq_length
                self._log(it, window, tokens / (now - tick))
                window, tick = [], now
            if cfg.train.eval_interval and it % cfg.train.eval_interval == 0 and it != t.train_iters:
                eval_loss = self._evaluate(it)
            stop = bool(t.exit_interval and it % t.exit_interval == 0)
            if (
                it == t.train_iters
                or stop
                or (cfg.checkpoint.save_interval and it % cfg.checkpoint.save_interval == 0)
            ):
                if it == t.train_iters:
                    eval_loss = self._evaluate(it)
                self._save(it)
            if stop and it != t.train_iters:
                log.info("train.exit_interval: stopping after iteration %d", it)
                break
        bar.close()
        return RunResult(self.run_dir, it, last.get("loss"), eval_loss, resumed, time.perf_counter() - began)

    def _step(self, iteration: int) -> dict[str, float]:
        cfg = self.cfg
        lr = lr_at(cfg, iteration)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        ids_all = self.data.train[self.order.rank_batch(iteration, self.dist.rank, self.dist.world)]
        micro = ids_all.split(cfg.train.micro_batch_size)
        sums = [0.0, 0.0, 0.0]  # loss, lm, kd
        for j, ids in enumerate(micro):
            with self._sync(j == len(micro) - 1), self.autocast:
                losses = self._loss(ids.to(self.dist.device))
                (losses[0] / len(micro)).backward()
            for k, v in enumerate(losses):
                sums[k] += float(v.detach()) / len(micro)
        grad_norm = self._clip()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss, lm, kd = (v / self.dist.world for v in self.dist.all_sum(sums))
        out: dict[str, float] = {"loss": loss, "lr": lr, "grad_norm": grad_norm}
        if self.teacher is not None:
            out.update(lm_loss=lm, kd_loss=kd)
        if not math.isfinite(loss):
            raise LowbitError(
                f"the loss is {loss} at iteration {iteration + 1}; lower optimizer.lr (now {cfg.optimizer.lr:g})"
            )
        return out

    def _loss(self, ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        d = self.cfg.distill
        logits = self.model(input_ids=ids, use_cache=False).logits
        lm = lm_loss(logits, ids)
        if self.teacher is None:
            return lm, lm, torch.zeros(())
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=ids, use_cache=False).logits
        kd = kd_loss(logits, teacher_logits, d.logit_kl_temperature)
        loss = d.kd_loss_scale * kd if d.skip_lm_loss else lm + d.kd_loss_scale * kd
        return loss, lm, kd

    def _sync(self, last_micro: bool) -> contextlib.AbstractContextManager[Any]:
        """Gradient all-reduce only after the last micro batch of the iteration."""
        if not self.dist.initialized or last_micro:
            return contextlib.nullcontext()
        if self.cfg.dist.fsdp:
            self.model.set_requires_gradient_sync(False)  # type: ignore[operator]
            return _restore_sync(self.model)
        return self.model.no_sync()  # type: ignore[operator]

    def _clip(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.cfg.optimizer.clip_grad
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
            norm = norm.full_tensor()
        return float(norm)

    @torch.no_grad()
    def _evaluate(self, it: int) -> float | None:
        data = self.data.eval
        if len(data) == 0:
            return None
        self.model.eval()
        per_rank, mbs = -(-len(data) // self.dist.world), self.cfg.train.micro_batch_size
        mine = data[self.dist.rank * per_rank : (self.dist.rank + 1) * per_rank].split(mbs)
        nll, tokens = 0.0, 0.0
        for b in range(-(-per_rank // mbs)):  # the same number of forwards on every rank (FSDP gathers)
            ids = (mine[b] if b < len(mine) else data[:1]).to(self.dist.device)
            with self.autocast:
                logits = self.model(input_ids=ids, use_cache=False).logits
            if b < len(mine):
                n = ids[:, 1:].numel()
                nll += float(lm_loss(logits, ids)) * n
                tokens += n
        nll, tokens = self.dist.all_sum([nll, tokens])
        self.model.train()
        loss = nll / max(tokens, 1)
        if self.dist.main:
            log.info("iteration %d | eval loss %.4f | eval ppl %.3f", it, loss, math.exp(loss))
        self._record({"iteration": it, "eval_loss": loss, "eval_ppl": math.exp(loss)})
        return loss

    # -- reporting --

    def _announce(self, resumed: int | None) -> None:
        cfg, r = self.cfg, self.report
        what = f"resuming {self.start.state_dir} at iteration {resumed}" if resumed is not None else (
            f"starting from {self.start.model_dir}")  # fmt: skip
        log.info("qat: %s; %d processes (%s%s), %d training windows of %d tokens, %d eval windows", what,
                 self.dist.world, "FSDP, " if cfg.dist.fsdp and self.dist.initialized else "",
                 self.dist.device.type, len(self.data.train), cfg.data.seq_length, len(self.data.eval))  # fmt: skip
        log.info("qat: %d quantizers frozen, %d weight quantizers recompute block scales, %d learn their amax%s",
                 r.frozen, len(r.recomputed), len(r.learned),
                 "; distilling from " + str(cfg.distill.teacher or self.manifest.get("source_model"))
                 if cfg.distill.enabled else "")  # fmt: skip

    def _log(self, it: int, window: list[dict[str, float]], tokens_per_s: float) -> None:
        if not self.dist.main:
            return
        mean = {k: sum(w[k] for w in window) / len(window) for k in window[0]}
        parts = [f"iteration {it}/{self.cfg.train.train_iters}", f"loss {mean['loss']:.4f}"]
        if "kd_loss" in mean:
            parts += [f"lm loss {mean['lm_loss']:.4f}", f"kd loss {mean['kd_loss']:.4f}"]
        parts += [
            f"lr {window[-1]['lr']:.3e}",
            f"grad norm {mean['grad_norm']:.3f}",
            f"{tokens_per_s:,.0f} tokens/s",
        ]
        log.info(" | ".join(parts))
        self._record({"iteration": it, "tokens_per_s": tokens_per_s})

    def _record(self, row: dict[str, Any]) -> None:
        if self.dist.main and self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with (self.run_dir / METRICS).open("a") as f:
                f.write(json.dumps(row) + "\n")

    # -- saving --

    def _full_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Model and optimizer state, whole, on CPU (every rank takes part; rank 0 gets them)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(self.model, options=options)
        optim_state = get_optimizer_state_dict(self.model, self.optimizer, options=options)
        return model_state, optim_state  # type: ignore[return-value]

    def _save(self, it: int) -> None:
        if self.run_dir is None:
            return
        model_state, optim_state = self._full_state()
        if self.dist.main:
            out = self.run_dir / f"iter_{it:07d}"
            shutil.rmtree(out.with_name(out.name + ".partial"), ignore_errors=True)  # a save a kill cut short
            writer = CheckpointWriter(out, {"qat_iteration": it}, overwrite=True)
            try:
                self._write_checkpoint(writer, model_state, optim_state, it)
            except BaseException:
                writer.abandon()
                raise
            _point_latest(self.run_dir, out)
            log.info("saved %s", out)
        self.dist.barrier()

    def _write_checkpoint(
        self, writer: CheckpointWriter, state: dict[str, Tensor], optim_state: dict[str, Any], it: int
    ) -> None:
        tensors = transposed(checkpoint_tensors(state, self.storage, self.recompute), self.conv1d)
        layers_path, n_layers = self.manifest["layers"], int(self.manifest["num_layers"])
        shell = {k: v for k, v in tensors.items() if not k.startswith(layers_path + ".")}
        if any("_quantizer." in k for k in shell):
            raise LowbitError(
                "quantizers outside the decoder layers cannot be saved yet"
            )  # never made by quantize
        writer.write_shell(shell)
        for i in range(n_layers):
            prefix = f"{layers_path}.{i}."
            mine = {k: v for k, v in tensors.items() if k.startswith(prefix)}
            writer.write_layer(i, {k: v for k, v in mine.items() if "_quantizer." not in k},
                               {k: v for k, v in mine.items() if "_quantizer." in k})  # fmt: skip
        trainer_dir = writer.partial / TRAINER_DIR
        trainer_dir.mkdir()
        save_file(
            {k: v.detach().clone().contiguous() for k, v in state.items()},
            str(trainer_dir / "model.safetensors"),
        )
        torch.save(optim_state, trainer_dir / "optimizer.pt")
        write_json(trainer_dir / "state.json", {"iteration": it, "config": to_dict(self.cfg),
                                                "epoch": self.order.epoch_of(it)})  # fmt: skip
        qat = {"iteration": it, "started_from": str(self.manifest.get("qat", {}).get("started_from",
               self.cfg.checkpoint.pretrained_checkpoint)), "distill": self.cfg.distill.enabled,
               "learned_scales": len(self.report.learned), "recomputed_block_scales": len(self.report.recomputed),
               "data": self.data.source}  # fmt: skip
        manifest = {**self.manifest, "qat": qat}
        manifest.pop("created", None)
        writer.finish(
            manifest, load_config_json(self.start.model_dir), model_files_for_copy(self.start.model_dir)
        )


@contextlib.contextmanager
def _restore_sync(model: nn.Module) -> Iterator[None]:
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)  # type: ignore[operator]


def checkpoint_tensors(
    state: dict[str, Tensor], storage: dict[str, torch.dtype], recompute: dict[str, ScaledFormat]
) -> dict[str, Tensor]:
    """The tensors of a lowbit checkpoint from a training state dict: the stored weights in their stored
    dtypes (tensors the source checkpoint did not store, such as a tied head, are left out), and quantizer
    statistics, with the block amaxes of recomputing weight quantizers observed on the weight as stored."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if "_quantizer." in key:
            out[key] = value.detach().float().clone()
        elif key in storage:
            out[key] = value.detach().to(storage[key]).clone()
    missing = sorted(set(storage) - set(out))
    if missing:
        raise LowbitError(
            f"the trained model lacks {missing[0]} (and {len(missing) - 1} more) of the checkpoint"
        )
    for linear, fmt in recompute.items():
        out[f"{linear}.weight_quantizer.0.amax"] = reduce_amax(out[f"{linear}.weight"].float(), fmt)
    return out


def _storage_dtypes(ckpt: Path) -> dict[str, torch.dtype]:
    """{tensor name: dtype} of the weights a checkpoint stores (quantizer statistics excluded)."""
    out: dict[str, torch.dtype] = {}
    for path in sorted(ckpt.glob("model*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                out[key] = f.get_slice(key).get_dtype()
    return {k: _DTYPES[v] for k, v in out.items()}  # type: ignore[index]


_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}  # fmt: skip


def _fused_groups(model: nn.Module) -> list[list[str]]:
    from lowbit.models.families import expand_groups, whole_model_family

    fam = whole_model_family(model)
    names = [n for n, _ in model.named_modules()]
    return expand_groups(fam.fused, names, per_expert=True) if fam is not None else []


def _point_latest(run_dir: Path, target: Path) -> None:
    """Switch run_dir/latest to target in one rename (a reader never sees it missing)."""
    tmp = run_dir / (LATEST + ".tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(target.name)
    os.replace(tmp, run_dir / LATEST)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The metrics of a run, the last record of each (iteration, kind) kept (a resumed run repeats some)."""
    rows: dict[tuple[int, str], dict[str, Any]] = {}
    for line in (run_dir / METRICS).read_text().splitlines():
        row = json.loads(line)
        kind = "eval" if "eval_loss" in row else "speed" if "tokens_per_s" in row else "train"
        rows[(int(row["iteration"]), kind)] = row
    return [rows[k] for k in sorted(rows)]

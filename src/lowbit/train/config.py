"""`lowbit qat` configuration: a YAML file plus `key=value` overrides, with the reference trainer's keys.

Precedence: defaults < YAML < overrides. Every key is checked against the schema below; an unknown key is a
one-line error naming the closest valid key, a value of the wrong type one naming the key and its type.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from lowbit.errors import LowbitError


@dataclass
class ModelConfig:
    dtype: str = "float32"  # master weights and compute on CPU; "bfloat16" runs the forward in bf16 autocast


@dataclass
class TrainConfig:
    train_iters: int = 100
    global_batch_size: int = 8
    micro_batch_size: int = 4
    eval_iters: int = 8  # eval batches of global_batch_size windows
    eval_interval: int | None = None  # None: only at the end
    exit_interval: int | None = None  # stop (after saving) once the iteration is a multiple of this


@dataclass
class OptimizerConfig:
    lr: float = 1e-5
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0  # max gradient norm; 0 disables clipping


@dataclass
class SchedulerConfig:
    lr_warmup_iters: int = 0
    lr_decay_style: str = "constant"  # constant, linear or cosine (to optimizer.min_lr)
    lr_decay_iters: int | None = None  # None: train.train_iters


@dataclass
class LoggerConfig:
    log_interval: int = 10


@dataclass
class CheckpointConfig:
    pretrained_checkpoint: str | None = None  # the PTQ checkpoint (lowbit quantize --output) to start from
    save: str | None = "qat-out"  # DIR: saves DIR/iter_0000200, DIR/latest -> the newest
    save_interval: int | None = None  # None: only at the end
    load: str | None = None  # a run directory to resume from (default: checkpoint.save, when it holds one)
    finetune: bool = False  # take only the weights from checkpoint.load: iteration 0, fresh optimizer


@dataclass
class DataConfig:
    path: str | None = None  # .txt / .jsonl / .parquet; default: the checkpoint's built-in sample text
    seq_length: int = 512
    eval_path: str | None = None  # default: the last eval_iters * global_batch_size windows of data.path
    seed: int = 1234  # order of the training windows


@dataclass
class DistillConfig:
    enabled: bool = False
    teacher: str | None = None  # the BF16 model; default: the checkpoint's source model
    kd_loss_scale: float = 1.0
    skip_lm_loss: bool = True  # False: loss = lm loss + kd_loss_scale * kd loss
    logit_kl_temperature: float = 1.0


@dataclass
class QATConfig:
    learn_scales: bool = False  # learned step size for static INT / FP8 amaxes (default: frozen)
    recompute_block_scales: bool = True  # NVFP4 / MX weight block scales from the current weights


@dataclass
class DistConfig:
    backend: str = "auto"  # auto (nccl with CUDA, else gloo), gloo or nccl
    fsdp: bool = False  # shard parameters, gradients and optimizer state (FSDP2) instead of DDP
    device: str = "auto"  # auto, cpu or cuda


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    data: DataConfig = field(default_factory=DataConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    qat: QATConfig = field(default_factory=QATConfig)
    dist: DistConfig = field(default_factory=DistConfig)


def valid_keys(schema: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key of the schema: model.dtype, train.train_iters, ..."""
    keys = []
    for f in fields(schema):
        sub = f.default_factory
        if isinstance(sub, type) and is_dataclass(sub):
            keys += valid_keys(sub, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict):
        return {prefix.rstrip("."): node}
    out: dict[str, Any] = {}
    for k, v in node.items():
        out.update(_flatten(v, f"{prefix}{k}."))
    return out


def _check_keys(data: dict[str, Any], where: str) -> None:
    known = valid_keys()
    sections = {k.split(".")[0] for k in known}
    for key in _flatten(data):
        if key in known or (key in sections and data.get(key) is None):
            continue
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}?" if close else f"valid sections: {', '.join(sorted(sections))}"
        raise LowbitError(f"unknown config key {key!r} in {where}; {hint}")


def load_config(path: str | Path | None, overrides: list[str]) -> Config:
    """Defaults, then the YAML file at `path`, then the `key=value` overrides."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    layers = [OmegaConf.structured(Config)]
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise LowbitError(f"config file {str(path)!r} does not exist; pass --config FILE.yaml")
        try:
            data = OmegaConf.to_container(OmegaConf.load(p))
        except (OmegaConfBaseException, ValueError, yaml.YAMLError) as e:
            raise LowbitError(f"{p}: not a readable YAML mapping ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise LowbitError(f"{p}: the config must be a YAML mapping of sections (train:, optimizer:, ...)")
        _check_keys({str(k): v for k, v in data.items()}, str(p))
        layers.append(OmegaConf.create(data))
    for item in overrides:
        if "=" not in item:
            raise LowbitError(f"override {item!r} is not key=value (e.g. train.train_iters=200)")
    if overrides:
        try:
            dot = OmegaConf.from_dotlist(list(overrides))
        except OmegaConfBaseException as e:
            raise LowbitError(f"cannot parse overrides ({str(e).splitlines()[0]})") from None
        _check_keys(dict(OmegaConf.to_container(dot)), "the overrides")  # type: ignore[arg-type]
        layers.append(dot)
    try:
        merged = OmegaConf.merge(*layers)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        msg = str(e).splitlines()[0]
        raise LowbitError(f"config key {key!r}: {msg}") from None
    assert isinstance(cfg, Config)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Value checks that the types alone do not catch."""
    t = cfg.train
    if t.train_iters < 1:
        raise LowbitError(f"train.train_iters must be >= 1, got {t.train_iters}")
    if t.micro_batch_size < 1 or t.global_batch_size < 1:
        raise LowbitError("train.micro_batch_size and train.global_batch_size must be >= 1")
    if cfg.model.dtype not in ("float32", "bfloat16"):
        raise LowbitError(f"model.dtype must be float32 or bfloat16, got {cfg.model.dtype!r}")
    if cfg.scheduler.lr_decay_style not in ("constant", "linear", "cosine"):
        raise LowbitError(
            f"scheduler.lr_decay_style must be constant, linear or cosine, got {cfg.scheduler.lr_decay_style!r}"
        )
    if cfg.dist.backend not in ("auto", "gloo", "nccl"):
        raise LowbitError(f"dist.backend must be auto, gloo or nccl, got {cfg.dist.backend!r}")
    if cfg.data.seq_length < 2:
        raise LowbitError(f"data.seq_length must be >= 2, got {cfg.data.seq_length}")
    if cfg.optimizer.lr < 0 or cfg.optimizer.min_lr < 0:
        raise LowbitError("optimizer.lr and optimizer.min_lr must be >= 0")
    for name in (
        "logger.log_interval",
        "train.eval_interval",
        "checkpoint.save_interval",
        "train.exit_interval",
    ):
        section, key = name.split(".")
        value = getattr(getattr(cfg, section), key)
        if value is not None and value < 1:
            raise LowbitError(f"{name} must be >= 1 (or null), got {value}")
    if cfg.checkpoint.pretrained_checkpoint is None and cfg.checkpoint.load is None:
        raise LowbitError(
            "no checkpoint to train: set checkpoint.pretrained_checkpoint=DIR (a lowbit quantize --output)"
        )


def to_dict(cfg: Config) -> dict[str, Any]:
    from omegaconf import OmegaConf

    out = OmegaConf.to_container(OmegaConf.structured(cfg))
    assert isinstance(out, dict)
    return out  # type: ignore[return-value]

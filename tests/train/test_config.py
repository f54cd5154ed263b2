"""lowbit qat configuration: YAML, key=value overrides, errors, learning-rate schedule, data order."""

from __future__ import annotations

import itertools

import pytest
import torch

from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.train.config import load_config, valid_keys
from lowbit.train.data import Order
from lowbit.train.trainer import lr_at

BASE = ["checkpoint.pretrained_checkpoint=ckpt"]


def test_overrides_win_over_the_yaml_which_wins_over_the_defaults(tmp_path):
    yaml = tmp_path / "qat.yaml"
    yaml.write_text("train:\n  train_iters: 50\n  micro_batch_size: 2\noptimizer:\n  lr: 2.0e-5\n")
    cfg = load_config(yaml, [*BASE, "train.train_iters=200", "distill.enabled=true"])
    assert cfg.train.train_iters == 200  # override
    assert cfg.train.micro_batch_size == 2 and cfg.optimizer.lr == 2e-5  # YAML
    assert cfg.train.global_batch_size == 8 and cfg.distill.enabled  # default, override
    assert cfg.checkpoint.pretrained_checkpoint == "ckpt"


def test_the_reference_keys_exist():
    keys = set(valid_keys())
    for key in ("train.train_iters", "train.global_batch_size", "train.micro_batch_size", "train.eval_iters",
                "train.eval_interval", "optimizer.lr", "scheduler.lr_warmup_iters", "scheduler.lr_decay_style",
                "logger.log_interval", "checkpoint.pretrained_checkpoint", "checkpoint.save",
                "checkpoint.save_interval", "checkpoint.finetune", "data.path", "data.seq_length",
                "distill.enabled", "distill.teacher"):  # fmt: skip
        assert key in keys, key


@pytest.mark.parametrize(
    ("overrides", "yaml", "message"),
    [
        (["train.train_iter=3"], None, "key 'train.train_iter' in the overrides; did you mean 'train.train_iters'?"),
        (["optimizer.lrr=1"], None, "did you mean 'optimizer.lr'?"),
        (["bogus.thing=1"], None, "valid sections:"),
        ([], "train:\n  global_batch: 4\n", "unknown config key 'train.global_batch' in "),
        ([], "train: [1\n  x: :\n", "not a readable YAML mapping"),
        (["train.train_iters=abc"], None, "config key 'train.train_iters'"),
        (["train.train_iters"], None, "is not key=value"),
        (["scheduler.lr_decay_style=exp"], None, "constant, linear or cosine"),
        (["train.train_iters=0"], None, "train.train_iters must be >= 1"),
    ],
)  # fmt: skip
def test_bad_keys_and_values_are_one_line_errors(tmp_path, overrides, yaml, message):
    path = None
    if yaml is not None:
        path = tmp_path / "bad.yaml"
        path.write_text(yaml)
    with pytest.raises(LowbitError) as err:
        load_config(path, [*BASE, *overrides])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_cli_errors_exit_2_with_one_line_and_write_nothing(tmp_path, capsys):
    save = tmp_path / "out"
    assert main(["qat", f"checkpoint.save={save}", "train.train_iterz=3"]) == 2
    assert main(["qat", f"checkpoint.save={save}", f"checkpoint.pretrained_checkpoint={tmp_path}"]) == 2
    assert main(["qat", "--config", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("lowbit: error: ") for line in err)
    assert "did you mean 'train.train_iters'" in err[0]
    assert "not a lowbit quantized checkpoint" in err[1]
    assert "does not exist" in err[2]
    assert not save.exists()


def test_learning_rate_warmup_then_decay():
    cfg = load_config(None, [*BASE, "optimizer.lr=1.0", "optimizer.min_lr=0.1", "scheduler.lr_warmup_iters=2",
                             "scheduler.lr_decay_style=cosine", "train.train_iters=12"])  # fmt: skip
    lrs = [lr_at(cfg, i) for i in range(12)]
    assert lrs[0] == 0.5 and lrs[1] == 1.0 and lrs[2] == 1.0
    assert lrs[7] == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the 10 decay iterations
    assert all(a >= b for a, b in itertools.pairwise(lrs[1:])) and lrs[-1] > 0.1
    cfg = load_config(
        None, [*BASE, "optimizer.lr=1.0", "scheduler.lr_decay_style=linear", "train.train_iters=4"]
    )
    assert [lr_at(cfg, i) for i in range(4)] == [1.0, 0.75, 0.5, 0.25]


def test_data_order_is_the_same_for_any_number_of_processes_and_covers_each_epoch():
    order = Order(n=10, global_batch=4, seed=7)
    first_epoch = torch.cat([order.batch(i) for i in range(5)])[:10]
    assert sorted(first_epoch.tolist()) == list(range(10))
    for it in range(6):
        halves = torch.cat([order.rank_batch(it, r, 2) for r in range(2)])
        quarters = torch.cat([order.rank_batch(it, r, 4) for r in range(4)])
        assert torch.equal(halves, order.batch(it)) and torch.equal(quarters, order.batch(it))
    assert torch.equal(Order(10, 4, 7).batch(3), order.batch(3))
    assert not torch.equal(Order(10, 4, 8).batch(0), order.batch(0))


def test_the_readme_example_config_is_valid(tmp_path):
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = "# qat.yaml" + readme.split("# qat.yaml", 1)[1].split("```")[0]
    path = tmp_path / "qat.yaml"
    path.write_text(block)
    cfg = load_config(path, ["train.train_iters=20"])
    assert cfg.checkpoint.save == "./qat-out" and cfg.train.train_iters == 20
    assert cfg.scheduler.lr_decay_style == "cosine" and cfg.data.seq_length == 512

"""lowbit qat end to end on a tiny model: saves, frozen scales, distillation, 2 processes, kill and resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lowbit.cli import main
from lowbit.loader import load_model
from lowbit.train.trainer import KILL_AT_ENV, read_metrics

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ptq(tiny_llama, text_file, tmp_path_factory):
    """{preset: quantized checkpoint} of the tiny Llama."""
    out = {}
    for preset in ("int4_awq", "nvfp4", "fp8"):
        path = tmp_path_factory.mktemp("ptq") / preset
        args = ["quantize", "--model", str(tiny_llama), "--qformat", preset, "--algorithm", "max",
                "--calib-data", str(text_file), "--calib-size", "8", "--calib-seq-len", "64",
                "--output", str(path), "-q"]  # fmt: skip
        assert main(args) == 0
        out[preset] = path
    return out


def _args(ckpt: Path, save: Path, text_file: Path, *extra: str) -> list[str]:
    return [
        f"checkpoint.pretrained_checkpoint={ckpt}", f"checkpoint.save={save}", f"data.path={text_file}",
        "data.seq_length=64", "train.train_iters=4", "train.global_batch_size=4", "train.micro_batch_size=1",
        "train.eval_iters=1", "logger.log_interval=1", "optimizer.lr=1e-3", *extra,
    ]  # fmt: skip


def _losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def _stats(ckpt: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(ckpt.glob("quantizers-*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(ckpt.glob("model-*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_int4_qat_keeps_scales_frozen_moves_weights_and_gives_a_usable_checkpoint(
    ptq, text_file, tmp_path, capsys
):
    run = tmp_path / "run"
    assert main(["qat", *_args(ptq["int4_awq"], run, text_file, "checkpoint.save_interval=2"), "-q"]) == 0
    assert sorted(p.name for p in run.iterdir()) == [
        "iter_0000002",
        "iter_0000004",
        "latest",
        "metrics.jsonl",
    ]
    latest = run / "latest"
    assert latest.resolve().name == "iter_0000004"
    before, after = _stats(ptq["int4_awq"]), _stats(latest)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    w0, w1 = _weights(ptq["int4_awq"]), _weights(latest)
    assert w0.keys() == w1.keys()
    moved = [k for k in w0 if "layers.0.self_attn.q_proj.weight" in k and not torch.equal(w0[k], w1[k])]
    assert moved, "training did not change the weights"
    manifest = json.loads((latest / "lowbit.json").read_text())
    assert (
        manifest["qat"]["iteration"] == 4
        and manifest["recipe"] == json.loads((ptq["int4_awq"] / "lowbit.json").read_text())["recipe"]
    )
    rows = read_metrics(run)
    assert [r["iteration"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert any("eval_loss" in r for r in rows)
    # the save is a checkpoint like any other
    capsys.readouterr()
    assert (
        main(
            ["export", "--checkpoint", str(latest), "--format", "hf", "--output", str(tmp_path / "hf"), "-q"]
        )
        == 0
    )
    assert (
        main(["generate", "--checkpoint", str(latest), "--prompts", "def f(", "--max-new-tokens", "4", "-q"])
        == 0
    )
    assert main(["eval", "--checkpoint", str(latest), "--data", str(text_file), "--seq-len", "64",
                 "--max-samples", "2", "--json", "-q"]) == 0  # fmt: skip
    assert main(["inspect", str(latest)]) == 0


def test_nvfp4_block_scales_follow_the_trained_weights_and_the_global_scale_stays(ptq, text_file, tmp_path):
    from lowbit.formats.scaled import NVFP4, reduce_amax

    run = tmp_path / "run"
    assert main(["qat", *_args(ptq["nvfp4"], run, text_file), "-q"]) == 0
    before, after, weights = _stats(ptq["nvfp4"]), _stats(run / "latest"), _weights(run / "latest")
    globals_ = [k for k in before if k.endswith("weight_quantizer.0.global_amax")]
    assert globals_ and all(torch.equal(before[k], after[k]) for k in globals_)
    inputs = [k for k in before if ".input_quantizer." in k]
    assert inputs and all(torch.equal(before[k], after[k]) for k in inputs)
    for key in [k for k in after if k.endswith("weight_quantizer.0.amax")]:
        weight = weights[key.replace(".weight_quantizer.0.amax", ".weight")]
        assert torch.equal(after[key], reduce_amax(weight.float(), NVFP4)), key


def test_learned_scales_move_and_fused_scales_stay_tied(ptq, text_file, tmp_path):
    run = tmp_path / "run"
    assert main(["qat", *_args(ptq["fp8"], run, text_file, "qat.learn_scales=true"), "-q"]) == 0
    before, after = _stats(ptq["fp8"]), _stats(run / "latest")
    key = "model.layers.0.self_attn.{}_proj.weight_quantizer.0.amax"
    assert not torch.equal(before[key.format("q")], after[key.format("q")])
    assert torch.equal(after[key.format("q")], after[key.format("k")])
    assert torch.equal(after[key.format("q")], after[key.format("v")])


def test_distillation_logs_kd_loss_and_reduces_it(ptq, text_file, tiny_llama, tmp_path):
    run = tmp_path / "run"
    extra = ("distill.enabled=true", f"distill.teacher={tiny_llama}", "train.train_iters=6",
             "train.global_batch_size=2", "data.seed=3")  # fmt: skip
    assert main(["qat", *_args(ptq["nvfp4"], run, text_file, *extra), "-q"]) == 0
    rows = [r for r in read_metrics(run) if "kd_loss" in r]
    assert len(rows) == 6 and all(r["loss"] == r["kd_loss"] for r in rows)  # skip_lm_loss: KD only
    assert all(r["kd_loss"] > 0 for r in rows)


def test_kd_loss_is_the_kl_from_teacher_to_student():
    from lowbit.eval.metrics import MetricSums
    from lowbit.train.trainer import kd_loss

    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    sums = MetricSums()
    ids = torch.zeros(2, 6, dtype=torch.long)  # MetricSums drops the last position; pad one
    sums.add(torch.cat([student, student[:, :1]], 1), ids, torch.cat([teacher, teacher[:, :1]], 1))
    torch.testing.assert_close(kd_loss(student, teacher, 1.0), torch.tensor(sums.result()["kl"]).float())


def _torchrun(args: list[str], nproc: int, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "lowbit", "qat", *args, "-q"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_gloo_processes_give_the_loss_curve_of_one(ptq, text_file, tmp_path, mode):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["qat", *_args(ptq["int4_awq"], one, text_file), "-q"]) == 0
    extra = ["dist.fsdp=true"] if mode == "fsdp" else []
    proc = _torchrun(_args(ptq["int4_awq"], two, text_file, "dist.backend=gloo", *extra), 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch.testing.assert_close(torch.tensor(_losses(two)), torch.tensor(_losses(one)), rtol=1e-5, atol=1e-6)
    w1, w2 = _weights(one / "latest"), _weights(two / "latest")
    assert all(torch.allclose(w1[k].float(), w2[k].float(), atol=1e-2, rtol=0) for k in w1)


def test_kill_and_resume_continues_to_the_same_final_loss(ptq, text_file, tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    args = _args(ptq["int4_awq"], ref, text_file, "train.train_iters=5", "checkpoint.save_interval=2")
    assert main(["qat", *args, "-q"]) == 0
    args = _args(ptq["int4_awq"], run, text_file, "train.train_iters=5", "checkpoint.save_interval=2")
    cmd = [sys.executable, "-m", "lowbit", "qat", *args, "-q"]
    killed = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, KILL_AT_ENV: "3"}, timeout=300
    )
    assert killed.returncode == -9, killed.stderr[-2000:]  # SIGKILL after iteration 3, saved at 2
    assert (run / "latest").resolve().name == "iter_0000002" and not (run / "iter_0000004").exists()
    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (run / "latest").resolve().name == "iter_0000005"
    assert _losses(run) == _losses(ref)  # same data, same optimizer state: the same numbers
    w_ref, w_run = _weights(ref / "latest"), _weights(run / "latest")
    assert all(torch.equal(w_ref[k], w_run[k]) for k in w_ref)


def test_resume_refuses_a_changed_data_order_and_finetune_an_occupied_save_dir(
    ptq, text_file, tmp_path, capsys
):
    run = tmp_path / "run"
    assert main(["qat", *_args(ptq["int4_awq"], run, text_file, "train.train_iters=1"), "-q"]) == 0
    capsys.readouterr()
    assert main(["qat", *_args(ptq["int4_awq"], run, text_file, "train.global_batch_size=8"), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert "train.global_batch_size=8" in err and "data order" in err and len(err.splitlines()) == 1
    assert main(["qat", *_args(ptq["int4_awq"], run, text_file, "checkpoint.finetune=true"), "-q"]) == 2
    assert "choose a new checkpoint.save" in capsys.readouterr().err


@pytest.mark.parametrize(("model_type", "preset"), [("gpt2", "int4_awq"), ("mixtral", "fp8")])
def test_qat_of_conv1d_and_moe_models_saves_checkpoints_that_load_and_export(
    tiny_factory, text_file, tmp_path, model_type, preset
):
    """GPT-2's Conv1D layers train as Linears and are saved back in GPT-2's layout; MoE experts train as one
    Linear each, their fused gate/up scales learned as one parameter."""
    src = tiny_factory(model_type, 2)
    ckpt = tmp_path / "ptq"
    args = ["quantize", "--model", str(src), "--qformat", preset, "--algorithm", "max", "--calib-data",
            str(text_file), "--calib-size", "4", "--calib-seq-len", "64", "--output", str(ckpt), "-q"]  # fmt: skip
    assert main(args) == 0
    run = tmp_path / "run"
    assert main(["qat", *_args(ckpt, run, text_file, "qat.learn_scales=true"), "-q"]) == 0
    saved = run / "latest"
    shapes = {k: v.shape for k, v in _weights(ckpt).items()}
    assert {k: v.shape for k, v in _weights(saved).items()} == shapes  # the checkpoint's layout
    before, after = _weights(ckpt), _weights(saved)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained
    model, _ = load_model(saved)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(1, 512, (1, 16))).logits).all()
    assert main(["export", "--checkpoint", str(saved), "--format", "hf", "--output", str(tmp_path / "hf"), "-q"]) == 0

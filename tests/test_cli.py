"""The command line: end to end on tiny models, and every bad input gives one line, exit 2, no output."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowbit.cli import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([*argv, "-q"])
    out, err = capsys.readouterr()
    return code, out, err


def _quant_args(model: Path, text: Path, out: Path, *extra: str) -> list[str]:
    return [
        "quantize",
        "--model",
        str(model),
        "--calib-data",
        str(text),
        "--calib-size",
        "8",
        "--calib-seq-len",
        "64",
        "--device",
        "cpu",
        "--output",
        str(out),
        *extra,
    ]


def test_quantize_generate_eval_inspect_end_to_end(tiny_llama, text_file, tmp_path, capsys):
    out = tmp_path / "nvfp4"
    code, stdout, _ = run(
        capsys, *_quant_args(tiny_llama, text_file, out, "--qformat", "nvfp4", "--kv-cache", "fp8")
    )
    assert code == 0 and "quantized 14 modules" in stdout and out.is_dir()

    code, stdout, _ = run(
        capsys, "generate", "--checkpoint", str(out), "--prompts", "def main(", "--max-new-tokens", "5"
    )
    assert code == 0 and "def main(" in stdout and "nvfp4 checkpoint" in stdout

    code, stdout, _ = run(
        capsys,
        "eval",
        "--model",
        str(tiny_llama),
        "--checkpoint",
        str(out),
        "--data",
        str(text_file),
        "--seq-len",
        "64",
        "--max-samples",
        "4",
        "--json",
    )
    result = json.loads(stdout)
    assert code == 0 and set(result) == {"ppl", "base_ppl", "kl", "top1_agree", "tokens"}
    assert result["tokens"] == 4 * 63 and result["kl"] > 0 and 0 <= result["top1_agree"] <= 1

    code, stdout, _ = run(capsys, "inspect", str(out))
    assert (
        code == 0
        and "model.layers.1.mlp.down_proj" in stdout
        and "SQNR" in stdout
        and "k_quantizer" in stdout
    )


def test_megatron_bridge_spellings_and_algorithm_report(tiny_llama, text_file, tmp_path, capsys):
    out = tmp_path / "awq"
    code, stdout, _ = run(
        capsys,
        "quantize",
        "--hf-model-id",
        str(tiny_llama),
        "--export-quant-cfg",
        "int4_awq",
        "--megatron-save-path",
        str(out),
        "--calib-data",
        str(text_file),
        "--calib-size",
        "4",
        "--calib-seq-len",
        "32",
    )
    assert code == 0 and "algorithm awq_full" in stdout
    manifest = json.loads((out / "lowbit.json").read_text())
    assert manifest["algorithm"] == "awq_full"
    errors = manifest["errors"]["model.layers.0.mlp.down_proj"]
    assert 0 < errors["after"] <= errors["before"]


def test_eval_plain_model_gives_ppl_only(tiny_llama, text_file, capsys):
    code, stdout, _ = run(
        capsys,
        "eval",
        "--model",
        str(tiny_llama),
        "--data",
        str(text_file),
        "--seq-len",
        "32",
        "--max-samples",
        "2",
        "--json",
    )
    result = json.loads(stdout)
    assert code == 0 and result["ppl"] > 1 and result["kl"] is None


def _corrupt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return dst


def _nan_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    tensors["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _missing_tensor(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


BAD = {
    "missing path": (lambda m, t, d: _quant_args(Path("./no/such/model"), t, d / "o"), "does not exist"),
    "unreachable hub id": (
        lambda m, t, d: _quant_args(Path("nobody-xyz/not-a-model"), t, d / "o"),
        "cannot fetch hub id",
    ),
    "corrupt safetensors": (
        lambda m, t, d: _quant_args(_corrupt(m, d / "c"), t, d / "o"),
        "truncated or corrupt",
    ),
    "nan weights": (lambda m, t, d: _quant_args(_nan_model(m, d / "n"), t, d / "o"), "NaN or Inf"),
    "missing tensor": (
        lambda m, t, d: _quant_args(_missing_tensor(m, d / "m"), t, d / "o"),
        "is missing from",
    ),
    "unknown preset": (
        lambda m, t, d: _quant_args(m, t, d / "o", "--qformat", "nvfp5"),
        "did you mean 'nvfp4'",
    ),
    "empty calibration": (
        lambda m, t, d: _quant_args(m, _write(d / "e.txt", ""), d / "o"),
        "shorter than one window",
    ),
    "short calibration": (
        lambda m, t, d: _quant_args(m, _write(d / "s.txt", "x = 1\n"), d / "o"),
        "shorter than one window",
    ),
    "missing calibration": (lambda m, t, d: _quant_args(m, d / "none.txt", d / "o"), "does not exist"),
    "bad jsonl": (
        lambda m, t, d: _quant_args(m, _write(d / "b.jsonl", '{"txt": 1}\n'), d / "o"),
        "no 'text' string",
    ),
}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_exit_2_and_no_output(
    case, tiny_llama, text_file, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    make_args, message = BAD[case]
    args = make_args(tiny_llama, text_file, tmp_path)
    code, _, err = run(capsys, *args)
    lines = [line for line in err.splitlines() if line.startswith("lowbit: error:")]
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_architectures_without_facts_get_one_line_errors(tmp_path, text_file, capsys):
    """An encoder (BERT) has a Linear outside its layer list: the error names it and the fix."""
    from transformers import AutoConfig

    d = tmp_path / "bert"
    d.mkdir()
    AutoConfig.for_model("bert").save_pretrained(d)
    save_file({"x": torch.zeros(1)}, str(d / "model.safetensors"))
    code, _, err = run(capsys, *_quant_args(d, text_file, tmp_path / "o"))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "cls.predictions.transform.dense" in err and "--exclude" in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_group_size_that_does_not_divide_names_layer_and_fix(tiny_factory, text_file, tmp_path, capsys):
    model = tiny_factory("llama", 1, intermediate_size=192)
    code, _, err = run(capsys, *_quant_args(model, text_file, tmp_path / "o", "--qformat", "int4_awq"))
    assert (
        code == 2 and "model.layers.0.mlp.down_proj" in err and "--exclude" in err and "group_size 64" in err
    )
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()
    code, _, _ = run(
        capsys,
        *_quant_args(model, text_file, tmp_path / "o", "--qformat", "int4_awq", "--exclude", "*down_proj"),
    )
    assert code == 0


def test_algorithm_and_its_parameters_from_the_command_line_and_the_error_report(
    tiny_llama, text_file, tmp_path, capsys
):
    out = tmp_path / "gptq"
    argv = _quant_args(tiny_llama, text_file, out, "--qformat", "int4_awq", "--algorithm", "awq+gptq",
                       "--sq-alpha", "0.7", "--gptq-damp", "0.02", "--no-gptq-act-order",
                       "--true-sequential", "--gptq-rounds", "2", "--moe-weighting", "uniform",
                       "--moe-weight-floor", "0.01")  # fmt: skip
    code, stdout, _ = run(capsys, *argv)
    assert code == 0 and "algorithm awq_lite+gptq" in stdout
    manifest = json.loads((out / "lowbit.json").read_text())
    params = manifest["recipe"]["algorithm_params"]
    assert params["sq_alpha"] == 0.7 and params["gptq_damp"] == 0.02 and params["gptq_act_order"] is False
    assert params["true_sequential"] is True and manifest["gptq_true_sequential"] is True
    assert params["gptq_rounds"] == 2
    assert params["moe_weighting"] == "uniform" and params["moe_weight_floor"] == 0.01

    code, stdout, _ = run(capsys, "inspect", str(out))
    assert code == 0 and "out err RTN dB" in stdout
    line = next(ln for ln in stdout.splitlines() if ln.startswith("model.layers.0.mlp.down_proj"))
    rtn_db, alg_db = (float(v) for v in line.split()[-2:])
    assert alg_db < rtn_db < 0


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        (["--algorithm", "gptqq"], "unknown algorithm 'gptqq' (did you mean 'gptq'?)"),
        (["--algorithm", "smoothquant+awq"], "SmoothQuant and AWQ both smooth"),
        (["--algorithm", "gptq+gptaq"], "GPTAQ is GPTQ with the float model's inputs; choose one"),
    ],
)
def test_bad_algorithm_is_a_one_line_error(tiny_llama, text_file, tmp_path, capsys, flag, message):
    code, _, err = run(
        capsys, *_quant_args(tiny_llama, text_file, tmp_path / "x", "--qformat", "int4_awq", *flag)
    )
    assert code == 2 and message in err and not (tmp_path / "x").exists()


# `lowbit quantize`'s options before its algorithm flags were generated from the parameter dataclasses
QUANTIZE_OPTIONS = {
    "--algorithm", "--awq-grid", "--calib-batch-size", "--calib-data", "--calib-dtype", "--calib-images",
    "--calib-seq-len", "--calib-size", "--device", "--exclude", "--export-quant-cfg", "--gptaq-alpha",
    "--gptaq-routers", "--gptq-act-order", "--gptq-block-size", "--gptq-damp", "--gptq-rounds", "--help",
    "--hf-model-id", "--kv-cache", "--megatron-save-path", "--model", "--moe-weight-floor", "--moe-weighting",
    "--no-gptaq-routers", "--no-gptq-act-order", "--no-sequential", "--no-true-sequential", "--output",
    "--overwrite", "--percentile", "--qformat", "--quiet", "--recipe", "--resume", "--seed", "--sequential",
    "--sq-alpha", "--true-sequential", "-h", "-q",
}  # fmt: skip


def _quantize_parser():
    import argparse

    from lowbit.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["quantize"]


def test_quantize_help_lists_the_same_options(capsys):
    assert {o for a in _quantize_parser()._actions for o in a.option_strings} == QUANTIZE_OPTIONS
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    shown = capsys.readouterr().out
    assert all(o in shown for o in QUANTIZE_OPTIONS)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], {}),
        (["--sq-alpha", "0.5", "--awq-grid", "7", "--gptq-damp", "0.02", "--gptq-block-size", "64",
          "--gptq-rounds", "2", "--gptaq-alpha", "0.3", "--moe-weight-floor", "0.01", "--percentile", "99.9"],
         {"sq_alpha": 0.5, "awq_grid": 7, "gptq_damp": 0.02, "gptq_block_size": 64, "gptq_rounds": 2,
          "gptaq_alpha": 0.3, "moe_weight_floor": 0.01, "percentile": 99.9}),
        (["--no-gptq-act-order", "--true-sequential", "--no-gptaq-routers", "--no-sequential"],
         {"gptq_act_order": False, "true_sequential": True, "gptaq_routers": False, "sequential": False}),
        (["--gptq-act-order", "--no-true-sequential", "--gptaq-routers", "--sequential"],
         {"gptq_act_order": True, "true_sequential": False, "gptaq_routers": True, "sequential": True}),
        (["--moe-weighting", "uniform", "--calib-dtype", "bfloat16"],
         {"moe_weighting": "uniform", "calib_dtype": "bfloat16"}),
    ],
)  # fmt: skip
def test_generated_flags_parse_to_the_recipe_params(argv, expected):
    import dataclasses

    from lowbit.cli import _recipe
    from lowbit.quant.recipe import preset

    args = _quantize_parser().parse_args(["--qformat", "int4_awq", *argv])
    recipe = _recipe(args)
    assert recipe.params == dataclasses.replace(preset("int4_awq").params, **expected)
    assert type(recipe.params.gptq_rounds) is int and type(recipe.params.sq_alpha) is float


@pytest.mark.parametrize(
    "argv", [["--moe-weighting", "route"], ["--calib-dtype", "fp16"], ["--gptq-rounds", "x"]]
)
def test_generated_flags_refuse_what_they_refused(argv, capsys):
    with pytest.raises(SystemExit) as e:
        _quantize_parser().parse_args(argv)
    assert e.value.code == 2


@pytest.mark.parametrize(("given", "expected"), [(None, "1"), ("0", "0")])
def test_cli_asks_torch_for_huge_pages_unless_the_user_chose(monkeypatch, given, expected):
    """THP_MEM_ALLOC_ENABLE (read by torch at its first allocation) defaults to on for lowbit's commands."""
    if given is None:
        monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    else:
        monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", given)
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == expected

"""Bad inputs as a new user tries them on the built-in model: each is one error line on stderr, exit 2 and no
output, or, where the run can go on, one warning that names the fix."""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, LlamaConfig, PretrainedConfig

import lowbit.data.text
from lowbit.algorithms.layerwise import quantize_checkpoint
from lowbit.cli import DEFAULT_MODEL, main
from lowbit.data.text import DEFAULT_CALIB, read_texts
from lowbit.errors import LowbitError
from lowbit.models.loading import check_context, max_context
from lowbit.quant.recipe import preset

FAST = ("--qformat", "mxfp8", "--calib-size", "2", "--calib-seq-len", "32", "--device", "cpu")


def quantize(capsys: pytest.CaptureFixture[str], out: Path, *extra: str) -> tuple[int, str]:
    """`lowbit quantize` of the built-in model into `out`: (exit code, stderr)."""
    code = main(["quantize", "--output", str(out), *FAST, *extra, "-q"])
    return code, capsys.readouterr().err


def error_line(code: int, err: str) -> str:
    """The one `lowbit: error:` line of a run that must have failed with exit 2."""
    lines = [line for line in err.splitlines() if line.startswith("lowbit: error:")]
    assert code == 2 and len(lines) == 1, err
    return lines[0]


def no_output(out: Path) -> bool:
    return not out.exists() and not out.with_name(out.name + ".partial").exists()


def _invalid_utf8(n: int = 4096) -> bytes:
    return random.Random(0).randbytes(n)


BINARY = {  # what a user passes as --calib-data -> what the error says
    "random bytes": ("calib.bin", _invalid_utf8(), "invalid UTF-8 at byte"),
    "random bytes as .jsonl": ("calib.jsonl", _invalid_utf8(), "invalid UTF-8 at byte"),
    "NUL bytes (UTF-16, a binary dump)": (
        "calib.txt",
        "text".encode("utf-16-le") * 500,
        "NUL byte at byte 1",
    ),
    "control characters": ("calib.txt", bytes(range(1, 32)) * 200, "are control characters"),
    "not parquet": ("calib.parquet", _invalid_utf8(), "not a readable .parquet file"),
}


@pytest.mark.parametrize("case", sorted(BINARY))
def test_calibration_data_that_is_not_text_is_refused(case, tmp_path, capsys):
    name, data, message = BINARY[case]
    path = tmp_path / name
    path.write_bytes(data)
    line = error_line(*quantize(capsys, tmp_path / "o", "--calib-data", str(path)))
    assert f"{path}: " in line and message in line and "of UTF-8 text" in line
    assert no_output(tmp_path / "o")


def test_the_error_names_the_first_byte_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("# un café au lait\n".encode("latin-1") * 100)
    with pytest.raises(LowbitError, match=r"latin1.txt: not text \(invalid UTF-8 at byte 8\); pass a "):
        read_texts(path)


UNUSUAL = (
    "\ufeff# café, naïve — “quoted” 日本語 😀 Ωμέγα\u00a0nbsp\u200bzero-width\n"
    "\x1b[1mbold\x1b[0m\tcolumns\x0cform feed\r\nwindows line end\r\n"
)


def test_utf8_text_with_unusual_characters_is_still_accepted(tmp_path, capsys):
    path = tmp_path / "calib.txt"
    path.write_bytes((UNUSUAL + DEFAULT_CALIB.read_text()[:20_000]).encode())
    assert read_texts(path) == [(UNUSUAL + DEFAULT_CALIB.read_text()[:20_000]).replace("\r\n", "\n")]
    code, err = quantize(capsys, tmp_path / "o", "--calib-data", str(path))
    assert code == 0 and (tmp_path / "o").is_dir(), err


@pytest.mark.parametrize("seq_len", [1025, 100_000])
def test_calib_seq_len_above_the_models_context_is_refused_before_windows_are_built(
    seq_len, tmp_path, capsys, monkeypatch
):
    def no_windows(*args, **kwargs):
        raise AssertionError("calibration windows were built")

    monkeypatch.setattr(lowbit.data.text, "calibration_windows", no_windows)
    line = error_line(*quantize(capsys, tmp_path / "o", "--calib-seq-len", str(seq_len)))
    assert line == (
        f"lowbit: error: --calib-seq-len {seq_len} exceeds the model's maximum context "
        "(max_position_embeddings 1024); use --calib-seq-len 1024 or less"
    )
    assert no_output(tmp_path / "o")


def test_eval_seq_len_above_the_models_context_is_refused(capsys):
    code = main(["eval", "--seq-len", "5000", "--max-samples", "1", "--device", "cpu", "-q"])
    assert error_line(code, capsys.readouterr().err) == (
        "lowbit: error: --seq-len 5000 exceeds the model's maximum context (max_position_embeddings 1024); "
        "use --seq-len 1024 or less"
    )


def test_library_callers_get_the_same_context_check(tmp_path):
    calib = torch.zeros(1, 1025, dtype=torch.long)
    with pytest.raises(LowbitError, match=r"exceeds the model's maximum context \(max_position_embeddings"):
        quantize_checkpoint(DEFAULT_MODEL, preset("mxfp8"), tmp_path / "o", calib, progress=False)
    assert no_output(tmp_path / "o")


def test_context_limit_from_each_configs_spelling():
    assert max_context(LlamaConfig(max_position_embeddings=2048)) == ("max_position_embeddings", 2048)
    assert max_context(GPT2Config(n_positions=512)) == ("n_positions", 512)
    assert max_context(PretrainedConfig()) is None
    check_context(PretrainedConfig(), 100_000)  # no limit stated: no check
    check_context(GPT2Config(n_positions=512), 512)
    with pytest.raises(LowbitError, match=r"\(n_positions 512\); use --calib-seq-len 512 or less"):
        check_context(GPT2Config(n_positions=512), 513)


def test_exclude_that_matches_no_module_warns_with_the_closest_name(tmp_path, capsys, caplog):
    """One warning per glob that matches nothing; a glob that matches, and the default skips that match
    nothing in a dense model ("*router*", ...), warn not."""
    globs = ["*nomatch*", "*down_prj", "*down_proj", "model.layer.0.*"]
    code, err = quantize(capsys, tmp_path / "o", *(a for g in globs for a in ("--exclude", g)))
    assert code == 0 and (tmp_path / "o").is_dir(), err
    records = [r for r in caplog.records if "matches no module" in r.getMessage()]
    assert all(r.levelno == logging.WARNING and r.name == "lowbit.algorithms.layerwise" for r in records)
    assert [r.getMessage() for r in records] == [
        "--exclude '*nomatch*' matches no module; closest module name: model.norm",
        "--exclude '*down_prj' matches no module; closest module name: model.layers.3.mlp.down_proj",
        "--exclude 'model.layer.0.*' matches no module; closest module name: model.layers.0",
    ]


INVALID_CONFIG = '{\n  "model_type": "llama",\n    oops\n}\n'


def _model_with_invalid_config(tmp_path: Path) -> Path:
    model = tmp_path / "model"
    model.mkdir()
    for f in DEFAULT_MODEL.iterdir():
        if f.suffix == ".safetensors":
            (model / f.name).symlink_to(f)
        else:
            shutil.copy(f, model / f.name)
    (model / "config.json").write_text(INVALID_CONFIG)
    return model


COMMANDS = {
    "quantize": lambda m, o: ["quantize", "--model", str(m), "--output", str(o), *FAST],
    "eval": lambda m, o: [
        "eval",
        "--model",
        str(m),
        "--seq-len",
        "32",
        "--max-samples",
        "1",
        "--device",
        "cpu",
    ],
    "generate": lambda m, o: ["generate", "--checkpoint", str(m), "--max-new-tokens", "1", "--device", "cpu"],
    "export": lambda m, o: ["export", "--model", str(m), "--format", "hf", "--output", str(o)],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_invalid_config_json_is_named_with_line_and_column(command, tmp_path, capsys):
    model = _model_with_invalid_config(tmp_path)
    code = main([*COMMANDS[command](model, tmp_path / "o"), "-q"])
    line = error_line(code, capsys.readouterr().err)
    assert line == (
        f"lowbit: error: {model / 'config.json'} is not valid JSON (line 3 column 5: Expecting property name "
        "enclosed in double quotes); fix or replace the file"
    )
    assert no_output(tmp_path / "o")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]

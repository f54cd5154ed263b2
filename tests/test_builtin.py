"""The built-in default model and text: `lowbit demo` and `lowbit quantize` with no --model."""

import json

from lowbit.cli import DEFAULT_MODEL, main


def test_builtin_model_is_small_and_complete():
    files = {p.name: p.stat().st_size for p in DEFAULT_MODEL.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "training.json"} <= set(files)
    assert sum(p.stat().st_size for p in DEFAULT_MODEL.parent.rglob("*") if p.is_file()) <= 20 * 2**20
    training = json.loads((DEFAULT_MODEL / "training.json").read_text())
    assert "build_default_model.py" in json.dumps(training)


def test_quantize_with_no_model_uses_the_builtin_one(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["quantize", "--qformat", "int8_wo", "--calib-size", "4", "--calib-seq-len", "32", "-q"])
    assert code == 0 and (tmp_path / "stdlib-llama-int8_wo" / "lowbit.json").is_file()
    assert "stdlib-llama" in capsys.readouterr().out


def test_demo_prints_the_comparison_table(capsys):
    code = main(
        [
            "demo",
            "--presets",
            "fp8,nvfp4",
            "--calib-size",
            "4",
            "--calib-seq-len",
            "32",
            "--seq-len",
            "32",
            "--max-samples",
            "2",
            "--device",
            "cpu",
            "-q",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    header = next(line for line in out.splitlines() if line.startswith("preset"))
    assert header.split() == ["preset", "bits/w", "size", "MB", "ppl", "KL", "top-1", "time", "s"]
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("fp8", "nvfp4"))}
    assert float(rows["fp8"][1]) < 8.1 and 4.4 < float(rows["nvfp4"][1]) < 4.6
    assert float(rows["fp8"][4]) < float(rows["nvfp4"][4])  # KL: 8 bits beat 4

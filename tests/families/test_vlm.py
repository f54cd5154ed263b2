"""Vision-language models (Qwen2.5-VL, Qwen3-VL): the language model is quantized, the vision tower and its
projector stay in high precision and are exported unchanged, and `lowbit generate --image` answers about an
image with the quantized model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from lowbit.cli import main

pytestmark = pytest.mark.slow


def _tensors(directory) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    return out


@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "qwen3_vl"])
def test_vlm_quantizes_the_language_model_and_generates_about_an_image(
    tiny_factory, text_file, tmp_path, capsys, model_type
):
    from PIL import Image

    src = tiny_factory(model_type, 2)
    ckpt = tmp_path / "q"
    args = ["quantize", "--model", str(src), "--qformat", "nvfp4", "--calib-data", str(text_file),
            "--calib-size", "4", "--calib-seq-len", "32", "--output", str(ckpt), "-q"]  # fmt: skip
    assert main(args) == 0
    modules = json.loads((ckpt / "lowbit.json").read_text())["modules"]
    assert len(modules) == 14 and all(".language_model.layers." in m for m in modules)  # 7 Linears x 2 layers

    image = tmp_path / "red.png"
    Image.new("RGB", (96, 80), (200, 30, 40)).save(image)
    capsys.readouterr()
    gen = ["generate", "--checkpoint", str(ckpt), "--image", str(image), "--prompts", "Describe this image.",
           "--max-new-tokens", "4"]  # fmt: skip
    assert main(gen) == 0
    assert "Describe this image." in capsys.readouterr().out

    source = _tensors(src)
    for fmt in ("hf", "compressed-tensors"):
        out = tmp_path / fmt
        assert main(["export", "--checkpoint", str(ckpt), "--format", fmt, "--output", str(out), "-q"]) == 0
        exported = _tensors(out)
        vision = [k for k in source if "visual" in k]
        assert vision and all(torch.equal(exported[k], source[k]) for k in vision)  # names and bytes kept
        assert (out / "preprocessor_config.json").is_file()


def test_image_with_a_text_only_model_is_a_one_line_error(tiny_llama, tmp_path, capsys):
    image = tmp_path / "x.png"
    image.write_bytes(b"not an image")
    assert main(["generate", "--checkpoint", str(tiny_llama), "--image", str(image)]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs a vision-language model" in err and len(err.splitlines()) == 1


def test_unreadable_image_is_a_one_line_error(tiny_factory, tmp_path, capsys):
    image = tmp_path / "x.png"
    image.write_bytes(b"not an image")
    assert main(["generate", "--checkpoint", str(tiny_factory("qwen3_vl", 2)), "--image", str(image)]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot read image" in err and len(err.splitlines()) == 1


def test_image_prompt_repeats_the_image_token_once_per_merged_patch(tiny_factory):
    from PIL import Image

    from lowbit.models.loading import load_config, load_tokenizer
    from lowbit.models.vision import image_prompt

    src = tiny_factory("qwen3_vl", 2)
    config = load_config(src)
    inputs = image_prompt(src, config, load_tokenizer(src), "Describe.", Image.new("RGB", (96, 80)))
    grid = inputs["image_grid_thw"][0]
    pads = int((inputs["input_ids"] == config.image_token_id).sum())
    assert pads == int(grid.prod()) // 4 and inputs["pixel_values"].shape[0] == int(grid.prod())


@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "qwen3_vl"])
def test_layer_by_layer_pass_over_an_image_sample_computes_the_model(tiny_factory, model_type):
    """Layer 0's inputs hold the merged image features; after each layer the model's own additions (Qwen3-VL's
    deepstack features at the image tokens) are made as the model makes them."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText

    from lowbit.algorithms.layerwise import _capture_inputs
    from lowbit.models.loading import load_tokenizer
    from lowbit.models.vision import Deepstack, image_prompt

    src = tiny_factory(model_type, 2)
    model = AutoModelForImageTextToText.from_pretrained(src, dtype=torch.float32).eval()
    sample = image_prompt(src, model.config, load_tokenizer(src), "Describe.", Image.new("RGB", (96, 80), "red"))
    text_model = model.model.language_model
    with torch.no_grad():
        want = model(**sample, output_hidden_states=True).hidden_states[-1]
        with Deepstack.capture(text_model) as injections:
            states, _ = _capture_inputs(model, text_model.layers, [sample], torch.device("cpu"), False)
        injection = injections[0] if injections else None  # Qwen2.5-VL's text model takes none
        assert (injection is not None) == (model_type == "qwen3_vl")
        h, kwargs = states[0]
        for i, layer in enumerate(text_model.layers):
            h = layer(h, **kwargs)
            h = injection.apply(h, i) if injection is not None else h
        got = text_model.norm(h)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    if model_type == "qwen3_vl":  # without the deepstack additions the result differs
        h = states[0][0]
        for layer in text_model.layers:
            h = layer(h, **kwargs)
        assert not torch.allclose(text_model.norm(h), want, atol=1e-3)


def test_quantize_calibrates_on_image_samples(tiny_factory, text_file, tmp_path):
    from PIL import Image

    src = tiny_factory("qwen3_vl", 2)
    for i, color in enumerate(("red", "blue")):
        Image.new("RGB", (96, 80), color).save(tmp_path / f"{i}.png")
    (tmp_path / "calib.jsonl").write_text(
        '{"image": "0.png", "text": "What color is this?"}\n{"image": "1.png", "text": "Describe it."}\n'
    )
    ckpt = tmp_path / "q"
    args = ["quantize", "--model", str(src), "--qformat", "int4_awq", "--calib-data", str(text_file),
            "--calib-images", str(tmp_path / "calib.jsonl"), "--calib-size", "4", "--calib-seq-len", "32",
            "--output", str(ckpt), "-q"]  # fmt: skip
    assert main(args) == 0
    manifest = json.loads((ckpt / "lowbit.json").read_text())
    assert manifest["calibration"]["image_samples"] == 2
    tokens = manifest["errors"]["model.language_model.layers.1.mlp.gate_proj"]["tokens"]
    assert tokens > 4 * 32  # the image samples' tokens (image patches + prompt) were seen
    (tmp_path / "bad.jsonl").write_text('{"text": "no image"}\n')
    bad = [a if a != str(tmp_path / "calib.jsonl") else str(tmp_path / "bad.jsonl") for a in args]
    assert main([*bad, "--overwrite"]) == 2

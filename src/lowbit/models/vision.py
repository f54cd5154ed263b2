"""Image + text prompts for vision-language models (Qwen2.5-VL, Qwen3-VL).

A prompt is one user turn holding an image and a text, rendered by the tokenizer's chat template (or, without
one, as `<|vision_start|><|image_pad|><|vision_end|>text`); the model's image processor turns the image into
patches and its grid, and the single image-pad token is repeated once per merged patch, as the models'
processors do. Only the image processor and tokenizer are needed (no video processor, so no torchvision).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from lowbit.errors import LowbitError


def is_vision_language(config: Any) -> bool:
    return getattr(config, "vision_config", None) is not None and getattr(config, "image_token_id", None) is not None


def load_image(path: str | Path) -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise LowbitError("--image needs Pillow: pip install 'lowbit[vlm]'") from None
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as e:
        raise LowbitError(f"cannot read image {path} ({type(e).__name__}); pass a PNG or JPEG file") from None


def image_prompt(model_dir: Path, config: Any, tokenizer: Any, prompt: str, image: Any) -> dict[str, Tensor]:
    """Model inputs (input_ids, attention_mask, pixel_values, image_grid_thw) for one image and one prompt."""
    if not is_vision_language(config):
        raise LowbitError(
            f"--image needs a vision-language model; {config.model_type!r} has no vision tower (drop --image)"
        )
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise LowbitError(
            f"{model_dir}: no usable image processor ({str(e).splitlines()[0][:120]}); copy the model's "
            "preprocessor_config.json there"
        ) from None
    pixels = processor(images=[image], return_tensors="pt")
    grid = pixels["image_grid_thw"]
    merge = int(getattr(processor, "merge_size", None) or config.vision_config.spatial_merge_size)
    pad, start, end = (
        tokenizer.convert_ids_to_tokens(int(getattr(config, key)))
        for key in ("image_token_id", "vision_start_token_id", "vision_end_token_id")
    )
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = f"{start}{pad}{end}{prompt}"
    if text.count(pad) != 1:
        raise LowbitError(
            f"{model_dir}: the chat template renders {text.count(pad)} image tokens for one image; "
            "fix the template"
        )
    text = text.replace(pad, pad * (int(grid[0].prod()) // merge**2))
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    return {
        "input_ids": ids["input_ids"],
        "attention_mask": ids["attention_mask"],
        "pixel_values": pixels["pixel_values"],
        "image_grid_thw": grid,
    }

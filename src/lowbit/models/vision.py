"""Image + text prompts for vision-language models (Qwen2.5-VL, Qwen3-VL).

A prompt is one user turn holding an image and a text, rendered by the tokenizer's chat template (or, without
one, as `<|vision_start|><|image_pad|><|vision_end|>text`); the model's image processor turns the image into
patches and its grid, and the single image-pad token is repeated once per merged patch, as the models'
processors do. Only the image processor and tokenizer are needed (no video processor, so no torchvision).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from lowbit.errors import LowbitError


@dataclass
class Deepstack:
    """Qwen3-VL adds its vision tower's deepstack features to the hidden states of the image tokens after
    each of the first decoder layers; layer-by-layer calibration adds them the same way (`apply`)."""

    mask: Tensor  # (batch, seq) bool: the image tokens
    embeds: list[Tensor]  # per layer: (image tokens, hidden)

    def apply(self, hidden: Tensor, layer: int) -> Tensor:
        if layer >= len(self.embeds):
            return hidden
        hidden = hidden.clone()
        mask = self.mask.to(hidden.device)
        hidden[mask] = hidden[mask] + self.embeds[layer].to(hidden.device, hidden.dtype)
        return hidden

    @staticmethod
    @contextmanager
    def capture(owner: nn.Module) -> Iterator[list[Deepstack | None]]:
        """While open, each forward of `owner` (the module running the decoder layers) appends its deepstack
        arguments (None for a text-only batch); nothing for models without them."""
        records: list[Deepstack | None] = []
        if "deepstack_visual_embeds" not in inspect.signature(owner.forward).parameters:
            yield records
            return

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            embeds, mask = kwargs.get("deepstack_visual_embeds"), kwargs.get("visual_pos_masks")
            records.append(Deepstack(mask, list(embeds)) if embeds is not None and mask is not None else None)

        handle = owner.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield records
        finally:
            handle.remove()


def is_vision_language(config: Any) -> bool:
    return getattr(config, "vision_config", None) is not None and getattr(config, "image_token_id", None) is not None


def require_vision_language(config: Any, option: str) -> None:
    if not is_vision_language(config):
        raise LowbitError(
            f"{option} needs a vision-language model; {config.model_type!r} has no vision tower (drop {option})"
        )


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
    """Model inputs (input_ids, attention_mask, mm_token_type_ids, pixel_values, image_grid_thw) for one image
    and one prompt."""
    require_vision_language(config, "--image")
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
        # 1 at image tokens (2 would be video): the models' multimodal RoPE places them from this
        "mm_token_type_ids": (ids["input_ids"] == int(config.image_token_id)).int(),
        "pixel_values": pixels["pixel_values"],
        "image_grid_thw": grid,
    }


def image_samples(
    path: str | Path, model_dir: Path, config: Any, tokenizer: Any, limit: int | None = None
) -> list[dict[str, Tensor]]:
    """Image + text calibration samples from a JSON-lines file, one `{"image": PATH, "text": PROMPT}` per line
    (image paths relative to the file): each sample's model inputs, as `lowbit generate --image` builds them."""
    import json

    path = Path(path)
    if not path.is_file():
        raise LowbitError(f"--calib-images {path}: no such file; pass a .jsonl of {{\"image\": ..., \"text\": ...}}")
    require_vision_language(config, "--calib-images")
    samples = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            image, text = record["image"], record["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise LowbitError(
                f"{path}:{n}: each line must be a JSON object with \"image\" and \"text\"; fix that line"
            ) from None
        image_path = Path(image) if Path(image).is_absolute() else path.parent / image
        samples.append(image_prompt(model_dir, config, tokenizer, str(text), load_image(image_path)))
        if limit is not None and len(samples) >= limit:
            break
    if not samples:
        raise LowbitError(f"{path}: no samples; add lines of {{\"image\": ..., \"text\": ...}}")
    return samples

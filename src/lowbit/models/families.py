"""Per-architecture facts as data: where the decoder layers are, what the engines call the architecture.

One entry per family. Algorithms read these facts; they never branch on the architecture themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

from lowbit.errors import LowbitError


@dataclass(frozen=True)
class Family:
    model_types: tuple[str, ...]
    layers: str  # path of the decoder layers' ModuleList
    decoder_type: str  # TensorRT-LLM decoder type


FAMILIES: tuple[Family, ...] = (
    Family(("llama",), "model.layers", "llama"),
    Family(("mistral",), "model.layers", "llama"),
    Family(("mixtral",), "model.layers", "llama"),
    Family(("qwen2", "qwen3"), "model.layers", "qwen"),
    Family(("qwen3_moe", "qwen2_moe"), "model.layers", "qwen"),
    Family(("gemma", "gemma2", "gemma3_text"), "model.layers", "gemma"),
    Family(("phi3",), "model.layers", "phi3"),
    Family(("starcoder2",), "model.layers", "gpt"),
)

SUPPORTED = tuple(t for f in FAMILIES for t in f.model_types)


def family(model_type: str) -> Family:
    for f in FAMILIES:
        if model_type in f.model_types:
            return f
    raise LowbitError(
        f"unsupported architecture {model_type!r}; supported model types: {', '.join(SUPPORTED)}"
    )

"""lowbit: post-training quantization of Hugging Face LLMs (FP8, INT8, INT4, NVFP4, MX formats).

`import lowbit` is light: heavy modules (transformers) load on first use.
"""

from __future__ import annotations

__version__ = "0.1.0"

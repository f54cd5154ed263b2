"""Quantization-aware training and distillation (`lowbit qat`)."""

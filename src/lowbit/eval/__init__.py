"""Perplexity, KL divergence from the base model, top-1 agreement, per-layer errors."""

"""Calibration and evaluation text: loading, tokenizing, cutting into windows."""

from lowbit.data.text import calibration_windows, eval_windows, read_texts, token_stream

__all__ = ["calibration_windows", "eval_windows", "read_texts", "token_stream"]

"""The resumable quantized checkpoint: write it layer by layer, load it back."""

from lowbit.checkpoint.load import is_lowbit_checkpoint, load_checkpoint
from lowbit.checkpoint.store import CheckpointWriter

__all__ = ["CheckpointWriter", "is_lowbit_checkpoint", "load_checkpoint"]

"""Masked attention: dense attention of a chunk's queries over gathered keys with a per-key validity
mask (the dense branches' path where the segment kernel does not run: cuDNN, TPU splash, XLA)."""

from omnimem_kernels.masked_attention.api import IMPLEMENTATIONS, masked_attention

__all__ = ["IMPLEMENTATIONS", "masked_attention"]

"""Masked attention: dense attention of queries over keys with a per-key validity mask or a count of
leading valid keys (the dense branches' gathered rows, the model's cross-attention)."""

from omnimem_kernels.masked_attention.api import IMPLEMENTATIONS, default_implementations, masked_attention

__all__ = ["IMPLEMENTATIONS", "default_implementations", "masked_attention"]

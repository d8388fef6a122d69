"""Selection attention: each (query group, head) attends to its own top-k KV blocks, read in place."""

from omnimem_kernels.selection_attention.api import IMPLEMENTATIONS, default_implementations, selection_attention

__all__ = ["IMPLEMENTATIONS", "default_implementations", "selection_attention"]

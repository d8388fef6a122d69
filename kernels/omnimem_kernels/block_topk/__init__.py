"""Block top-k: query-shared scoring of every pooled block and an exact, static-shape top-k."""

from omnimem_kernels.block_topk.api import IMPLEMENTATIONS, block_top_k, default_implementations

__all__ = ["IMPLEMENTATIONS", "block_top_k", "default_implementations"]

"""Segment attention: dense attention of a chunk's queries over row segments of a heads-major
source (the store, read in place); the dense branches of the OmniMem layer."""

from omnimem_kernels.segment_attention.api import IMPLEMENTATIONS, default_implementations, segment_attention

__all__ = ["IMPLEMENTATIONS", "default_implementations", "segment_attention"]

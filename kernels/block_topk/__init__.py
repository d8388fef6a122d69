"""Fused block scoring + top-k (query-shared selection) kernels."""

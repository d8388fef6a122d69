"""Shared correctness suite for every segment-attention backend (subclass per backend).

Each backend's test module subclasses `SegmentAttentionSuite` and sets IMPLEMENTATION and DTYPES
(what the backend takes). The oracle is a float64 softmax over the segments' rows, listed explicitly
(a row of two overlapping segments is listed twice).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omnimem_kernels import dispatch
from omnimem_kernels.segment_attention import api
from tests.kernels.selection_attention_suite import relative_error

# Where each dense backend runs (interpret mode counts for splash on CPU).
RUNS_ON = {"xla": ("cpu", "gpu", "gpu_hopper", "tpu"), "splash": ("cpu", "tpu"), "cudnn": ("gpu", "gpu_hopper"),
           "mosaic_gpu": ("gpu_hopper",)}


def require_backend(name: str) -> None:
  """Skips the test where the dense backend `name` cannot run."""
  if dispatch.platform_name() not in RUNS_ON[name]:
    pytest.skip(f"the {name} dense backend does not run on {dispatch.platform_name()}")


def oracle(q, keys, values, starts, count, length):
  """[b, n, h, d] float64: softmax over the segments' rows, listed explicitly; zeros with none."""
  rows = [r for i in range(count) for r in range(starts[i], starts[i] + length)]
  if not rows:
    return np.zeros(q.shape)
  logits = np.einsum("bnhd,bhmd->bhnm", q.astype(np.float64), keys[:, :, rows].astype(np.float64))
  logits /= np.sqrt(q.shape[-1])
  weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
  weights /= weights.sum(axis=-1, keepdims=True)
  return np.einsum("bhnm,bhmd->bnhd", weights, values[:, :, rows].astype(np.float64))


# starts, count, length over a 576-row source (6 slots of 96 rows); 200 queries. -1 starts lie past count.
CASES = {
    "slots": ([480, 0, 192, 7], 3, 96),  # the last slot first: its last key tile runs past the source
    "prefix_partial_tile": ([0, 0], 1, 250),  # 250 rows: a partial tile after the full one
    "unaligned_starts": ([100, 3, 421, 299, 0], 4, 77),  # offsets 4, 3, 5, 3 inside 8-row tiles
    "empty": ([0], 0, 96),
    "long_segments": ([5, 300], 2, 270),  # unaligned, several tiles, last tile partial
    "padding": ([96, 384, -1, -1], 2, 96),  # unused entries hold -1
    "source_boundaries": ([526, 0, -1], 2, 50),  # the source's last row and its first
    "duplicates": ([100, 100, 300], 3, 50),  # one segment listed twice: its rows count twice
}


def make_case(seed, name, batch=2, tokens=200, heads=2, head_dim=64, rows=576):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((batch, tokens, heads, head_dim)).astype(np.float32)
  keys = rng.standard_normal((batch, heads, rows, head_dim)).astype(np.float32)
  values = rng.standard_normal((batch, heads, rows, head_dim)).astype(np.float32)
  starts, count, length = CASES[name]
  return q, keys, values, np.asarray(starts, np.int32), count, length


def tolerance(dtype) -> float:
  return 1e-5 if dtype == jnp.float32 else 1e-2


class SegmentAttentionSuite:
  IMPLEMENTATION: str = "xla"
  DTYPES: tuple = (jnp.float32, jnp.bfloat16)

  def run(self, case, dtype, **kwargs):
    q, keys, values, starts, count, length = case
    cast = lambda x: jnp.asarray(x, dtype)  # noqa: E731
    with jax.default_matmul_precision("highest"):  # no TF32 on GPUs
      return api.segment_attention(cast(q), cast(keys), cast(values), jnp.asarray(starts), count, length,
                                   implementation=self.IMPLEMENTATION, **kwargs)

  def check(self, out, case, dtype):
    q, keys, values, starts, count, length = case
    assert out.shape == q.shape and out.dtype == dtype
    if not count:
      assert not np.asarray(out, np.float32).any()
      return
    rounded = [np.asarray(jnp.asarray(x, dtype), np.float32) for x in (q, keys, values)]
    assert relative_error(out, oracle(*rounded, starts, count, length)) < tolerance(dtype)

  @pytest.mark.parametrize("dtype_index", [0, 1])
  @pytest.mark.parametrize("name", sorted(CASES))
  def test_matches_oracle(self, name, dtype_index):
    if dtype_index >= len(self.DTYPES):
      pytest.skip("dtype not taken by this backend")
    case, dtype = make_case(0, name), self.DTYPES[dtype_index]
    self.check(self.run(case, dtype), case, dtype)

  @pytest.mark.parametrize("name", ["slots", "unaligned_starts", "duplicates", "empty"])
  @pytest.mark.parametrize("seed", [1, 2])
  def test_traced_counts_and_a_tight_row_bound(self, name, seed):
    """count and length traced (one compilation for any), max_rows exactly count * length."""
    case, dtype = make_case(seed, name), self.DTYPES[-1]
    q, keys, values, starts, count, length = case
    cast = lambda x: jnp.asarray(x, dtype)  # noqa: E731
    run = jax.jit(lambda q, k, v, s, c, n: api.segment_attention(
        q, k, v, s, c, n, max_rows=max(count * length, 1), implementation=self.IMPLEMENTATION))
    with jax.default_matmul_precision("highest"):
      out = run(cast(q), cast(keys), cast(values), jnp.asarray(starts), jnp.int32(count), jnp.int32(length))
    self.check(out, case, dtype)

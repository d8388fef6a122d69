"""Selection attention as a Pallas kernel for the Triton backend (GPUs; CPU-interpretable).

One program per (query group, batch x head). It loads the group's queries once (15 rows padded to a
16-row tile) and walks the group's block ids `blocks_per_step` at a time. Each step gathers those
blocks' rows straight from the store's flat row view (block j = rows j*bt .. j*bt+bt-1; no gathered
copy exists anywhere), padding each block to a power-of-two row count (30 -> 32) by repeating its last
row and masking it out, then runs one online-softmax step (base 2, f32 statistics).

Compact blocks (`omnimem_kernels/kv_quant.py`: fp8, packed int4) are decoded in the kernel right after
the load, exactly, to q's dtype; each key's block scale (read by block id, like the ids) multiplies its
logit and, before the PV product, its probability, so no rounding enters beyond the plain kernel's.
Plain blocks take the same code without the decode or the scales.

Launch order: the group axis is the grid's first axis, which the Triton lowering maps to CUDA's x, so
the programs of neighbouring groups of one head run together and share the blocks they both selected
through L2.

Pallas Triton has no scalar prefetch and no scratch; the table is an ordinary input read inside the
kernel, and the accumulators live in registers (the `fori_loop` carry). The backend is deprecated
upstream; it stays as the portable GPU path and the CPU-interpretable twin of the Mosaic GPU kernel.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
from jaxtyping import Array, Float, Int, Shaped

from omnimem_kernels import kv_quant

LN2 = math.log(2.0)


def _next_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def _scaled(x: jax.Array, per_key: jax.Array | None) -> jax.Array:
  """x [rows, keys] times each key's block scale (none for plain blocks)."""
  return x if per_key is None else x * per_key[None, :]


def _key_scales(scale_refs, ids: jax.Array, block_rows: int) -> tuple[jax.Array | None, jax.Array | None]:
  """The K and V scale of each key [keys] of the step's blocks, read by block id; (None, None) for plain blocks."""
  if not scale_refs:
    return None, None
  blocks = jnp.maximum(ids, 0)  # a -1 id reads block 0's scale; its keys are masked
  per_key = lambda ref: jnp.broadcast_to(ref[blocks][:, None], (ids.shape[0], block_rows)).reshape(-1)
  return per_key(scale_refs[0]), per_key(scale_refs[1])


def _kernel(*refs, fmt: str, group_size: int, q_rows: int, block_tokens: int, block_rows: int,
            blocks_per_step: int, steps: int, scale_log2: float, precision):
  ids_ref, q_ref, k_ref, v_ref, *scale_refs, o_ref, lse_ref = refs  # scale_refs: (k, v) for compact blocks
  group = pl.program_id(0)
  rows = lax.iota(jnp.int32, q_rows)
  q_index = group * group_size + jnp.minimum(rows, group_size - 1)  # pad rows repeat the last query
  q = q_ref[q_index, :]
  token = lax.iota(jnp.int32, block_rows)
  token_ok = token < block_tokens
  token = jnp.minimum(token, block_tokens - 1)  # pad rows repeat the block's last row (masked below)
  keys = blocks_per_step * block_rows

  def step(t, carry):
    acc, m, l = carry
    ids = ids_ref[pl.ds(t * blocks_per_step, blocks_per_step)]
    key_ok = ((ids >= 0)[:, None] & token_ok[None, :]).reshape(keys)
    key_index = (jnp.maximum(ids, 0) * block_tokens)[:, None] + token[None, :]
    key_index = key_index.reshape(keys)
    k = kv_quant.decode(k_ref[key_index, :], fmt, q.dtype)  # exact; a no-op for plain blocks
    v = kv_quant.decode(v_ref[key_index, :], fmt, q.dtype)
    k_scale, v_scale = _key_scales(scale_refs, ids, block_rows)
    s = _scaled(lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                                preferred_element_type=jnp.float32) * scale_log2, k_scale)
    s = jnp.where(key_ok[None, :], s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows with nothing valid yet stay at zero
    alpha = jnp.exp2(m - m_safe)
    p = jnp.exp2(s - m_safe[:, None])
    l = l * alpha + jnp.sum(p, axis=1)
    acc = acc * alpha[:, None] + lax.dot_general(_scaled(p, v_scale).astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                                 precision=precision, preferred_element_type=jnp.float32)
    return acc, m_new, l

  head_dim = q.shape[-1]
  init = (jnp.zeros((q_rows, head_dim), jnp.float32), jnp.full((q_rows,), -jnp.inf, jnp.float32),
          jnp.zeros((q_rows,), jnp.float32))
  acc, m, l = lax.fori_loop(0, steps, step, init)
  some = l > 0
  out = jnp.where(some[:, None], acc / jnp.where(some, l, 1.0)[:, None], 0.0)
  lse = jnp.where(some, (m + jnp.log2(jnp.where(some, l, 1.0))) * LN2, -jnp.inf)
  # The pad rows repeat the group's last query, so they write the same values to the same row.
  o_ref[q_index, :] = out.astype(o_ref.dtype)
  lse_ref[q_index] = lse


@functools.partial(jax.jit, static_argnames=("scale", "interpret", "keys_per_step", "num_warps", "num_stages"))
def selection_attention(q: Float[Array, "b h n d"], k_blocks: Shaped[Array, "b h nblk bt dk"],
                        v_blocks: Shaped[Array, "b h nblk bt dk"], ids: Int[Array, "b h g k"], *, scale: float,
                        k_scale: Float[Array, "b h nblk"] | None = None,
                        v_scale: Float[Array, "b h nblk"] | None = None, interpret: bool = False,
                        keys_per_step: int = 128, num_warps: int = 4,
                        num_stages: int = 2) -> tuple[Float[Array, "b h n d"], Float[Array, "b h n"]]:
  """Selection attention (see `api.selection_attention`) through Pallas Triton.

  Args:
    k_blocks, v_blocks, k_scale, v_scale: plain float blocks (no scales), or compact blocks of one
      `kv_quant` format with their per-block scales.
    keys_per_step: key rows (padded blocks) per online-softmax step; rounded to whole blocks.
    num_warps, num_stages: Triton launch parameters.

  Raises:
    NotImplementedError: head_dim not a power of two >= 16, or plain float inputs of mixed dtypes.
  """
  batch, heads, tokens, head_dim = q.shape
  num_blocks, block_tokens = k_blocks.shape[2:4]
  groups, top_k = ids.shape[2:]
  group_size = tokens // groups
  if head_dim < 16 or head_dim != _next_pow2(head_dim):
    raise NotImplementedError(f"pallas triton needs a power-of-two head_dim >= 16, got {head_dim}")
  fmt = kv_quant.format_of(k_blocks, head_dim)
  if fmt == "bf16" and not (q.dtype == k_blocks.dtype == v_blocks.dtype):
    raise NotImplementedError(f"pallas triton needs one dtype for q, k, v, got {q.dtype}, {k_blocks.dtype}, "
                              f"{v_blocks.dtype}")
  q_rows = _next_pow2(max(group_size, 16))
  block_rows = _next_pow2(block_tokens)
  blocks_per_step = min(max(1, keys_per_step // block_rows), _next_pow2(top_k))
  blocks_per_step = max(blocks_per_step, -(-16 // block_rows))  # Triton dots need >= 16 keys
  steps = -(-top_k // blocks_per_step)
  if steps * blocks_per_step != top_k:
    ids = jnp.pad(ids, ((0, 0), (0, 0), (0, 0), (0, steps * blocks_per_step - top_k)), constant_values=-1)
  ids = ids.astype(jnp.int32)
  row_view = (batch, heads, num_blocks * block_tokens, k_blocks.shape[-1])  # free: the store's layout
  k_rows, v_rows = k_blocks.reshape(row_view), v_blocks.reshape(row_view)
  scales = () if fmt == "bf16" else (k_scale, v_scale)
  precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else lax.Precision.DEFAULT

  kernel = functools.partial(
      _kernel, fmt=fmt, group_size=group_size, q_rows=q_rows, block_tokens=block_tokens, block_rows=block_rows,
      blocks_per_step=blocks_per_step, steps=steps, scale_log2=scale / LN2, precision=precision)
  head = lambda g, bh: (bh // heads, bh % heads, 0, 0)
  rows_spec = lambda n, width=head_dim: pl.BlockSpec((None, None, n, width), head)
  store_spec = rows_spec(num_blocks * block_tokens, k_blocks.shape[-1])
  scale_spec = pl.BlockSpec((None, None, num_blocks), lambda g, bh: (bh // heads, bh % heads, 0))
  return pl.pallas_call(
      kernel,
      grid=(groups, batch * heads),
      in_specs=[
          pl.BlockSpec((None, None, None, ids.shape[-1]), lambda g, bh: (bh // heads, bh % heads, g, 0)),
          rows_spec(tokens), store_spec, store_spec, *(scale_spec for _ in scales),
      ],
      out_specs=[rows_spec(tokens), pl.BlockSpec((None, None, tokens), lambda g, bh: (bh // heads, bh % heads, 0))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((batch, heads, tokens), jnp.float32)],
      compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="selection_attention_triton",
  )(ids, q, k_rows, v_rows, *scales)

"""Selection attention as a Pallas Mosaic TPU kernel: manual-DMA gather, double-buffered across steps.

The work is split into items of `groups_per_step` consecutive query groups of one (batch, head); a
1-D sequential grid walks the items. For each item the kernel DMAs every listed block (30 x d) of the
group's head straight from the store in HBM (`memory_space=pl.ANY`, no gathered copy in HBM) into a
VMEM buffer whose per-block slot is padded to a sublane-aligned row count (30 -> 32; the pad rows are
zeroed once and never written by a DMA). The next item's blocks are fetched while the current one
computes (two buffer slots, one DMA semaphore pair per slot). The block ids come through two small
SMEM-blocked copies of the table (the current and the next item's row), so the table never has to
fit SMEM at once.

Compute is one [rows, d] x [d, keys] matmul per item over all its groups' blocks with a
block-diagonal mask (a group's rows see only its own blocks): the MXU wants large tiles, and a
memory-bound kernel can afford the wasted products. The softmax is exact (all keys are in VMEM).

Compact blocks (`omnimem_kernels/kv_quant.py`: fp8, packed int4) are DMAed as stored and decoded in
VMEM, exactly, to q's dtype; each key's block scale multiplies its logit and, before the PV product,
its probability. The scales of the item's listed blocks come as a [1, listed] row blocked like the ids'
(gathered by the wrapper: a table the size of the ids; Mosaic has no vector gather from a scalar table).

Tested on CPU in interpret mode with `pltpu.InterpretParams(out_of_bounds_reads="raise")`; it has not
run on a TPU (none was lent), so Mosaic lowering limits (unaligned 15-row query slices in bf16, the
id-mask reshape, the int4 nibble interleave) are unverified.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jaxtyping import Array, Float, Int, Shaped

from omnimem_kernels import kv_quant


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _groups_per_step(groups: int, group_size: int, target_rows: int) -> int:
  """Largest divisor of `groups` whose rows stay <= target_rows and are a multiple of 8; else all."""
  fits = [d for d in range(1, groups + 1)
          if groups % d == 0 and (d * group_size) % 8 == 0 and d * group_size <= target_rows]
  return max(fits) if fits else groups


def _kernel(*refs, fmt: str, heads: int, items_per_head: int, group_size: int, top_k: int, block_tokens: int,
            block_rows: int, scale: float, precision):
  # scale_refs: the item's listed blocks' K and V scales [1, listed], for compact blocks only
  ids_ref, next_ids_ref, ids_vec_ref, q_ref, k_hbm, v_hbm, *scale_refs, o_ref, lse_ref, k_buf, v_buf, sems = refs
  item = pl.program_id(0)
  num_items = pl.num_programs(0)
  listed = k_buf.shape[1]  # groups_per_step * top_k

  def block_copies(table_ref, target_item, slot):
    bh = target_item // items_per_head
    batch, head = bh // heads, bh % heads

    def copies(j):
      block = jnp.maximum(table_ref[j], 0)  # -1 fetches block 0; its keys are masked below
      rows = pl.ds(0, block_tokens)
      return (pltpu.make_async_copy(k_hbm.at[batch, head, block], k_buf.at[slot, j, rows], sems.at[slot, 0]),
              pltpu.make_async_copy(v_hbm.at[batch, head, block], v_buf.at[slot, j, rows], sems.at[slot, 1]))
    return copies

  def start_all(table_ref, target_item, slot):
    copies = block_copies(table_ref, target_item, slot)

    @pl.loop(0, listed)
    def _(j):
      for copy in copies(j):
        copy.start()

  @pl.when(item == 0)
  def _():
    if block_rows > block_tokens:  # pad rows: zero once, no DMA ever writes them
      k_buf[...] = jnp.zeros(k_buf.shape, k_buf.dtype)
      v_buf[...] = jnp.zeros(v_buf.shape, v_buf.dtype)
    start_all(ids_ref, item, 0)

  slot = item % 2

  @pl.when(item + 1 < num_items)
  def _():
    start_all(next_ids_ref, item + 1, 1 - slot)

  wait = block_copies(ids_ref, item, slot)

  @pl.loop(0, listed)
  def _(j):
    for copy in wait(j):
      copy.wait()

  keys = listed * block_rows
  q = q_ref[...]
  k = kv_quant.decode(k_buf[slot].reshape(keys, k_buf.shape[-1]), fmt, q.dtype)  # exact; a no-op for plain blocks
  v = kv_quant.decode(v_buf[slot].reshape(keys, v_buf.shape[-1]), fmt, q.dtype)
  rows = q.shape[0]
  per_key = lambda x: jnp.broadcast_to(x.reshape(listed, 1), (listed, block_rows)).reshape(1, keys)  # per block -> key
  s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                      preferred_element_type=jnp.float32) * scale
  if scale_refs:
    s = s * per_key(scale_refs[0][...])
  key = lax.broadcasted_iota(jnp.int32, (rows, keys), 1)
  row = lax.broadcasted_iota(jnp.int32, (rows, keys), 0)
  block_ok = per_key(ids_vec_ref[...] >= 0)
  ok = block_ok & (key % block_rows < block_tokens) & (key // (block_rows * top_k) == row // group_size)
  s = jnp.where(ok, s, -jnp.inf)
  m = jnp.max(s, axis=1, keepdims=True)
  m = jnp.where(m == -jnp.inf, 0.0, m)
  p = jnp.exp(s - m)
  l = jnp.sum(p, axis=1, keepdims=True)
  if scale_refs:
    p = p * per_key(scale_refs[1][...])  # after the sum: V's scale weighs the values, not the normaliser
  out = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=precision,
                        preferred_element_type=jnp.float32)
  some = l > 0
  o_ref[...] = jnp.where(some, out / jnp.where(some, l, 1.0), 0.0).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(some, m + jnp.log(jnp.where(some, l, 1.0)), -jnp.inf)


@functools.partial(jax.jit, static_argnames=("scale", "interpret", "target_rows"))
def selection_attention(q: Float[Array, "b h n d"], k_blocks: Shaped[Array, "b h nblk bt dk"],
                        v_blocks: Shaped[Array, "b h nblk bt dk"], ids: Int[Array, "b h g k"], *, scale: float,
                        k_scale: Float[Array, "b h nblk"] | None = None,
                        v_scale: Float[Array, "b h nblk"] | None = None, interpret: bool = False,
                        target_rows: int = 128) -> tuple[Float[Array, "b h n d"], Float[Array, "b h n"]]:
  """Selection attention (see `api.selection_attention`) through Pallas Mosaic TPU.

  Args:
    k_blocks, v_blocks, k_scale, v_scale: plain float blocks (no scales), or compact blocks of one
      `kv_quant` format with their per-block scales.
    interpret: run on CPU under `pltpu.InterpretParams(out_of_bounds_reads="raise")`.
    target_rows: at most this many query rows (whole groups) per grid step.

  Raises:
    NotImplementedError: off TPU without `interpret`, or plain q, k, v of mixed dtypes.
  """
  if not interpret and jax.default_backend() != "tpu":
    raise NotImplementedError("pallas mosaic_tpu runs on TPUs (or with interpret=True)")
  fmt = kv_quant.format_of(k_blocks, q.shape[-1])
  if fmt == "bf16" and not (q.dtype == k_blocks.dtype == v_blocks.dtype):
    raise NotImplementedError(f"pallas mosaic_tpu needs one dtype for q, k, v, got {q.dtype}, {k_blocks.dtype}, "
                              f"{v_blocks.dtype}")
  batch, heads, tokens, head_dim = q.shape
  block_tokens = k_blocks.shape[3]
  groups, top_k = ids.shape[2:]
  group_size = tokens // groups
  per_step = _groups_per_step(groups, group_size, target_rows)
  items_per_head = groups // per_step
  num_items = batch * heads * items_per_head
  listed = per_step * top_k
  block_rows = _round_up(block_tokens, 32 // k_blocks.dtype.itemsize)  # whole (packed) sublane tiles
  rows = per_step * group_size

  table = ids.astype(jnp.int32).reshape(num_items, listed)
  listed_blocks = jnp.maximum(table, 0).reshape(batch, heads, groups * top_k)  # -1: block 0's scale, masked
  scale_rows = () if fmt == "bf16" else tuple(
      jnp.take_along_axis(block_scale, listed_blocks, axis=2).reshape(num_items, 1, listed)
      for block_scale in (k_scale, v_scale))
  q_items = q.reshape(num_items, rows, head_dim)  # free: items are consecutive rows of one head
  precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else lax.Precision.DEFAULT
  kernel = functools.partial(_kernel, fmt=fmt, heads=heads, items_per_head=items_per_head, group_size=group_size,
                             top_k=top_k, block_tokens=block_tokens, block_rows=block_rows, scale=scale,
                             precision=precision)
  smem_row = lambda index_map: pl.BlockSpec((None, listed), index_map, memory_space=pltpu.SMEM)
  vmem_row = pl.BlockSpec((None, 1, listed), lambda i: (i, 0, 0))
  out, lse = pl.pallas_call(
      kernel,
      grid=(num_items,),
      in_specs=[
          smem_row(lambda i: (i, 0)),
          smem_row(lambda i: (jnp.minimum(i + 1, num_items - 1), 0)),
          vmem_row,
          pl.BlockSpec((None, rows, head_dim), lambda i: (i, 0, 0)),
          pl.BlockSpec(memory_space=pl.ANY),
          pl.BlockSpec(memory_space=pl.ANY),
          *(vmem_row for _ in scale_rows),
      ],
      out_specs=[pl.BlockSpec((None, rows, head_dim), lambda i: (i, 0, 0)),
                 pl.BlockSpec((None, rows, 1), lambda i: (i, 0, 0))],
      out_shape=[jax.ShapeDtypeStruct((num_items, rows, head_dim), q.dtype),
                 jax.ShapeDtypeStruct((num_items, rows, 1), jnp.float32)],
      scratch_shapes=[pltpu.VMEM((2, listed, block_rows, k_blocks.shape[-1]), k_blocks.dtype),
                      pltpu.VMEM((2, listed, block_rows, v_blocks.shape[-1]), v_blocks.dtype),
                      pltpu.SemaphoreType.DMA((2, 2))],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",)),
      interpret=pltpu.InterpretParams(out_of_bounds_reads="raise") if interpret else False,
      name="selection_attention_mosaic_tpu",
  )(table, table, table.reshape(num_items, 1, listed), q_items, k_blocks, v_blocks, *scale_rows)
  return out.reshape(q.shape), lse.reshape(batch, heads, tokens)

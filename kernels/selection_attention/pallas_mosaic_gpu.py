"""Selection attention as a Pallas Mosaic GPU kernel (Hopper: `plgpu.kernel`, TMA, wgmma).

One CTA (one warpgroup) per (`groups_per_cta` consecutive query groups, batch x head). Each group's
queries are padded to 16 rows, so the CTA's query tile is 16 * groups_per_cta = 64 rows, the
smallest wgmma M. A TMA pipeline (`plgpu.emit_pipeline`) then walks the groups' block ids in order
(group 0's top-k, then group 1's, ...): its K/V `BlockSpec` index map reads the block id from the id
table in GMEM and returns the block's first row, and TMA copies a 32-row tile (the 30-row block and
two rows past it, masked) straight from the store's row view into SMEM. No gathered copy exists.
Every step is one 64 x 32 QK^T wgmma, a masked online-softmax update (rows of the other groups of
the tile and the two extra rows are masked), and one 64 x 128 PV wgmma from registers.

Launch order: the item axis is the grid's first (fastest) axis, so CTAs of neighbouring groups of
one head run together and share the blocks both selected through L2.

bf16 / f16 only, head_dim a multiple of 64, group size <= 16; anything else raises
`NotImplementedError` so the dispatcher falls through to the next backend.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jaxtyping import Array, Float, Int

LN2 = math.log(2.0)
GROUP_ROWS = 16  # a query group's rows in the tile (15 -> 16)
STEP_ROWS = 64  # key rows per pipeline step: the PV wgmma needs K % 64 == 0


def _kernel(ids_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, qo_smem, k_smem, v_smem, q_barrier, kv_barriers, *,
            heads: int, top_k: int, groups_per_cta: int, block_tokens: int, block_rows: int, scale_log2: float,
            stages: int):
  item = lax.axis_index("item")
  bh = lax.axis_index("bh")
  batch, head = lax.div(bh, heads), lax.rem(bh, heads)
  rows = groups_per_cta * GROUP_ROWS
  row0 = item * rows
  dtype = qo_smem.dtype
  head_dim = qo_smem.shape[-1]
  per_step = k_smem.shape[1] // block_rows  # blocks of one group per step (the PV wgmma needs K = 64)
  steps_per_group = top_k // per_step
  steps = groups_per_cta * steps_per_group
  keys = per_step * block_rows

  plgpu.copy_gmem_to_smem(q_ref.at[batch, head, pl.ds(row0, rows)], qo_smem, q_barrier)

  def block_id(step, part):
    group = item * groups_per_cta + lax.div(step, steps_per_group)
    return ids_ref[batch, head, group, lax.rem(step, steps_per_group) * per_step + part]

  def fetch(step, slot):
    """TMA the step's blocks (block_rows rows from each block's first row) into the slot's halves."""
    for part in range(per_step):
      start = jnp.maximum(block_id(step, part), 0) * block_tokens  # -1: fetch block 0, masked below
      rows_in_slot = pl.ds(part * block_rows, block_rows)
      barrier = slot * 2 * per_step + 2 * part
      plgpu.copy_gmem_to_smem(k_ref.at[batch, head, pl.ds(start, block_rows)], k_smem.at[slot, rows_in_slot],
                              kv_barriers.at[barrier])
      plgpu.copy_gmem_to_smem(v_ref.at[batch, head, pl.ds(start, block_rows)], v_smem.at[slot, rows_in_slot],
                              kv_barriers.at[barrier + 1])

  for step in range(min(stages, steps)):
    fetch(step, step)
  plgpu.barrier_wait(q_barrier)

  def body(step, carry):
    acc, m, l = carry
    slot = lax.rem(step, stages)
    for j in range(2 * per_step):
      plgpu.barrier_wait(kv_barriers.at[slot * 2 * per_step + j])

    def qk(acc_ref):
      plgpu.wgmma(acc_ref, qo_smem, k_smem.at[slot].transpose((1, 0)))
      return acc_ref[...]

    s = pl.run_scoped(qk, plgpu.ACC((rows, keys), jnp.float32))
    row = plgpu.broadcasted_iota(jnp.int32, (rows, keys), 0, layout=plgpu.Layout.WGMMA)
    col = plgpu.broadcasted_iota(jnp.int32, (rows, keys), 1, layout=plgpu.Layout.WGMMA)
    s = s * scale_log2
    s = jnp.where(lax.div(row, GROUP_ROWS) == lax.div(step, steps_per_group), s, -jnp.inf)
    s = jnp.where(lax.rem(col, block_rows) < block_tokens, s, -jnp.inf)
    for part in range(per_step):  # a -1 id adds -inf to its block's columns
      bias = jnp.where(block_id(step, part) >= 0, 0.0, -jnp.inf)
      s = s + jnp.where(lax.div(col, block_rows) == part, bias, 0.0)
    m_new = jnp.maximum(m, s.max(axis=1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows with nothing valid yet stay at zero
    alpha = jnp.exp2(m - m_safe)
    p = jnp.exp2(s - lax.broadcast_in_dim(m_safe, s.shape, [0]))
    l = l * alpha + p.sum(axis=1)
    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])

    def pv(acc_ref):
      plgpu.wgmma(acc_ref, p.astype(dtype), v_smem.at[slot])

    acc = pl.run_state(pv)(plgpu.ACC.init(acc))  # reading it back waits for the wgmma: the slot is free

    @pl.when(step + stages < steps)
    def _():
      fetch(step + stages, slot)

    return acc, m_new, l

  row_layout = plgpu.Layout.WGMMA.reduce(1)
  init = (plgpu.layout_cast(jnp.zeros((rows, head_dim), jnp.float32), plgpu.Layout.WGMMA),
          plgpu.layout_cast(jnp.full((rows,), -jnp.inf, jnp.float32), row_layout),
          plgpu.layout_cast(jnp.zeros((rows,), jnp.float32), row_layout))
  acc, m, l = lax.fori_loop(0, steps, body, init)

  some = l > 0
  safe_l = jnp.where(some, l, 1.0)
  out = acc / lax.broadcast_in_dim(safe_l, acc.shape, [0])
  qo_smem[...] = out.astype(dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(qo_smem, o_ref.at[batch, head, pl.ds(row0, rows)])

  def store_lse(lse_smem):
    lse_smem[...] = jnp.where(some, m * LN2 + jnp.log(safe_l), -jnp.inf)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[batch, head, pl.ds(row0, rows)])
    plgpu.wait_smem_to_gmem(0)

  pl.run_scoped(store_lse, plgpu.SMEM((rows,), jnp.float32))


@functools.partial(jax.jit, static_argnames=("scale", "groups_per_cta", "stages"))
def selection_attention(q: Float[Array, "b h n d"], k_blocks: Float[Array, "b h nblk bt d"],
                        v_blocks: Float[Array, "b h nblk bt d"], ids: Int[Array, "b h g k"], *, scale: float,
                        groups_per_cta: int = 4,
                        stages: int = 3) -> tuple[Float[Array, "b h n d"], Float[Array, "b h n"]]:
  """Selection attention (see `api.selection_attention`) through Pallas Mosaic GPU (Hopper).

  Groups with no valid id give zero output: their rows see only masked keys, l stays 0.

  Raises:
    NotImplementedError: a dtype other than bf16/f16, mixed dtypes, head_dim not a multiple of 64,
      groups of more than 16 queries, or a group count not divisible by groups_per_cta.
  """
  batch, heads, tokens, head_dim = q.shape
  num_blocks, block_tokens = k_blocks.shape[2:4]
  groups, top_k = ids.shape[2:]
  group_size = tokens // groups
  if q.dtype not in (jnp.bfloat16, jnp.float16) or not (q.dtype == k_blocks.dtype == v_blocks.dtype):
    raise NotImplementedError(f"pallas mosaic_gpu needs one 16-bit float dtype, got {q.dtype}, {k_blocks.dtype}, "
                              f"{v_blocks.dtype}")
  block_rows = max(8, 1 << (block_tokens - 1).bit_length())  # a power of two: 64 // block_rows blocks per step
  per_step = STEP_ROWS // block_rows
  if (head_dim % 64 or group_size > GROUP_ROWS or groups % groups_per_cta or block_tokens % 8
      or block_tokens > STEP_ROWS or top_k % per_step):
    raise NotImplementedError(
        f"pallas mosaic_gpu needs head_dim % 64 == 0 (got {head_dim}), groups of <= 16 queries (got {group_size}), "
        f"groups % {groups_per_cta} == 0 (got {groups}), blocks of a multiple of 8 tokens, at most {STEP_ROWS} "
        f"(TMA copies start on 8-row tiles; got {block_tokens}), and top_k % {per_step} == 0 (got {top_k})")
  # Each group's queries padded to 16 rows; under jit this pad fuses with the caller's transpose.
  q_tiles = jnp.pad(q.reshape(batch, heads, groups, group_size, head_dim),
                    ((0, 0), (0, 0), (0, 0), (0, GROUP_ROWS - group_size), (0, 0)))
  q_tiles = q_tiles.reshape(batch, heads, groups * GROUP_ROWS, head_dim)
  k_rows = k_blocks.reshape(batch, heads, num_blocks * block_tokens, head_dim)  # free: the store's layout
  v_rows = v_blocks.reshape(batch, heads, num_blocks * block_tokens, head_dim)
  rows = groups_per_cta * GROUP_ROWS
  kernel = functools.partial(_kernel, heads=heads, top_k=top_k, groups_per_cta=groups_per_cta,
                             block_tokens=block_tokens, block_rows=block_rows, scale_log2=scale / LN2,
                             stages=stages)
  out, lse = plgpu.kernel(
      kernel,
      out_type=(jax.ShapeDtypeStruct(q_tiles.shape, q.dtype),
                jax.ShapeDtypeStruct((batch, heads, groups * GROUP_ROWS), jnp.float32)),
      grid=(groups // groups_per_cta, batch * heads),
      grid_names=("item", "bh"),
      scratch_types=(plgpu.SMEM((rows, head_dim), q.dtype),
                     plgpu.SMEM((stages, STEP_ROWS, head_dim), k_blocks.dtype),
                     plgpu.SMEM((stages, STEP_ROWS, head_dim), v_blocks.dtype),
                     plgpu.Barrier(num_arrivals=1), plgpu.Barrier(num_arrivals=1, num_barriers=2 * per_step * stages)),
      compiler_params=plgpu.CompilerParams(approx_math=True,
                                           lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
  )(ids.astype(jnp.int32), q_tiles, k_rows, v_rows)
  out = out.reshape(batch, heads, groups, GROUP_ROWS, head_dim)[:, :, :, :group_size].reshape(q.shape)
  lse = lse.reshape(batch, heads, groups, GROUP_ROWS)[:, :, :, :group_size].reshape(batch, heads, tokens)
  return out, lse

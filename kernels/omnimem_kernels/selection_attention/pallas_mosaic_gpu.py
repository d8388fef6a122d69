"""Selection attention as a Pallas Mosaic GPU kernel (Hopper: `plgpu.kernel`, TMA, wgmma).

One CTA (one warpgroup) per (`groups_per_cta` consecutive query groups, batch x head). Each group's
queries are padded to 16 rows, so the CTA's query tile is 16 * groups_per_cta = 64 rows, the
smallest wgmma M (the group count is padded to a multiple of groups_per_cta with empty groups).

K/V are read in place from the store's row view `[b, h, num_blocks * block_tokens, d]`; no gathered
copy exists. Mosaic's TMA copies start on 8-row tiles, and block `id` starts at row `id * bt`, which
for the real 30-token blocks is 8-aligned only for every fourth id. So each listed block is fetched
as an aligned *window*: `fetch_rows` rows (a multiple of 8) from `start = 8 * floor(id * bt / 8)`,
clamped to `rows - fetch_rows` at the end of the store (no read past the end), and the block sits at
offset `r = id * bt - start` inside it (r in {0, 2, 4, 6} for bt = 30, r = 0 for 8-aligned blocks;
up to `fetch_rows - bt` where clamped). Windows land in SMEM slots of `slot_rows >= fetch_rows` rows;
`per_step` slots make one pipeline step of `per_step * slot_rows` keys, a multiple of 64 (the PV
wgmma's K) and at most 256 (the QK wgmma's N). Defaults (`window_geometry`): bt = 30 -> a 40-row
window in one 64-row slot per step (64 keys); bt = 32 -> 32-row windows, 2 per step (64 keys). Slot
rows past the window (when slot_rows > fetch_rows) are zeroed once in V (K's are masked) and never
written again.

A TMA pipeline of `stages` steps (as many as fit in SMEM, at most 3) walks the groups' block ids in
order (group 0's top-k, then group 1's, ...). Every step is one 64 x keys QK^T wgmma, a masked
online-softmax update (columns outside [r, r + bt) of each window, all columns of a -1 id, and the
rows of the tile's other groups are -inf), and one 64 x d PV wgmma from registers.

Launch order: the item axis is the grid's first (fastest) axis, so CTAs of neighbouring groups of
one head run together and share the blocks both selected through L2.

bf16 / f16 only, head_dim a multiple of 64, group size <= 16, a store of a multiple of 8 rows (the
TMA row tiling) and at least one window; a block size whose window geometry fits no wgmma step, or
SMEM too small for one stage, also raises `NotImplementedError` so the dispatcher falls through to
the next backend.
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
TMA_ROWS = 8  # TMA copies of the row view start on (and span whole) 8-row tiles
PV_K = 64  # the PV wgmma's K (keys per step) must be a multiple of 64 (128-byte swizzle, 16-bit)
QK_MAX_N = 256  # the QK wgmma's N (keys per step) is at most 256
SMEM_BYTES = 227 * 1024  # Hopper's per-CTA shared memory limit
MAX_STAGES = 3


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def window_geometry(block_tokens: int, top_k: int, fetch_rows: int | None = None,
                    slot_rows: int | None = None) -> tuple[int, int, int]:
  """(fetch_rows, slot_rows, per_step) for blocks of `block_tokens` rows; see the module docstring.

  fetch_rows defaults to the smallest multiple of 8 that holds a block at any 8-aligned offset;
  slot_rows to the multiple of 8 >= fetch_rows whose step (lcm(slot_rows, 64) keys, at most 256)
  divides top_k into whole steps and has the fewest keys, then the fewest rows: 64-key steps where
  possible (on an H100 at the real shape, 30-token blocks in one 64-row slot per step ran 6x faster
  than in four 48-row slots per 192-key step).

  Raises:
    NotImplementedError: no such geometry (or the given one does not satisfy these rules).
  """
  max_offset = TMA_ROWS - math.gcd(block_tokens, TMA_ROWS)  # largest (id * bt) % 8
  need = _round_up(block_tokens + max_offset, TMA_ROWS)
  fetch_rows = need if fetch_rows is None else fetch_rows
  candidates = [slot_rows] if slot_rows is not None else sorted(
      range(fetch_rows, QK_MAX_N + 1, TMA_ROWS), key=lambda rows: (math.lcm(rows, PV_K), rows))
  for rows in candidates:
    keys = math.lcm(rows, PV_K)
    if rows >= fetch_rows and rows % TMA_ROWS == 0 and keys <= QK_MAX_N and top_k % (keys // rows) == 0:
      if fetch_rows < need or fetch_rows % TMA_ROWS:
        break
      return fetch_rows, rows, keys // rows
  raise NotImplementedError(
      f"pallas mosaic_gpu: no window geometry for {block_tokens}-token blocks and top_k={top_k} "
      f"(fetch_rows={fetch_rows}, slot_rows={slot_rows}): windows must be multiples of {TMA_ROWS} rows "
      f"holding a block at any 8-aligned offset (>= {need} rows), and a step of lcm(slot_rows, {PV_K}) <= "
      f"{QK_MAX_N} keys must take a whole number of slots dividing top_k")


def _kernel(ids_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, qo_smem, k_smem, v_smem, q_barrier, kv_barriers, *,
            heads: int, top_k: int, groups_per_cta: int, block_tokens: int, fetch_rows: int, slot_rows: int,
            store_rows: int, scale_log2: float, stages: int):
  item = lax.axis_index("item")
  bh = lax.axis_index("bh")
  batch, head = lax.div(bh, heads), lax.rem(bh, heads)
  rows = groups_per_cta * GROUP_ROWS
  row0 = item * rows
  dtype = qo_smem.dtype
  head_dim = qo_smem.shape[-1]
  keys = k_smem.shape[1]
  per_step = keys // slot_rows  # windows of one group per step
  steps_per_group = top_k // per_step
  steps = groups_per_cta * steps_per_group

  plgpu.copy_gmem_to_smem(q_ref.at[batch, head, pl.ds(row0, rows)], qo_smem, q_barrier)

  if fetch_rows < slot_rows:  # slot rows no window reaches: zero V once so that p = 0 there adds 0, not NaN
    for slot in range(stages):
      v_smem.at[slot][...] = plgpu.layout_cast(jnp.zeros((keys, head_dim), dtype), plgpu.Layout.WGMMA)
    plgpu.commit_smem()

  def block_id(step, part):
    group = item * groups_per_cta + lax.div(step, steps_per_group)
    return ids_ref[batch, head, group, lax.rem(step, steps_per_group) * per_step + part]

  def window(block):
    """First row of the 8-aligned window holding block `block` (>= 0), and the block's offset in it."""
    first = block * block_tokens
    start = jnp.minimum(lax.div(first, TMA_ROWS) * TMA_ROWS, store_rows - fetch_rows)
    return start, first - start

  def fetch(step, slot):
    """TMA the step's windows (fetch_rows rows each) into the slot's per_step sub-slots."""
    for part in range(per_step):
      start, _ = window(jnp.maximum(block_id(step, part), 0))  # -1: fetch block 0, masked below
      rows_in_slot = pl.ds(part * slot_rows, fetch_rows)
      barrier = slot * 2 * per_step + 2 * part
      plgpu.copy_gmem_to_smem(k_ref.at[batch, head, pl.ds(start, fetch_rows)], k_smem.at[slot, rows_in_slot],
                              kv_barriers.at[barrier])
      plgpu.copy_gmem_to_smem(v_ref.at[batch, head, pl.ds(start, fetch_rows)], v_smem.at[slot, rows_in_slot],
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
    part_of_col = lax.div(col, slot_rows)
    in_slot = col - part_of_col * slot_rows
    offset = jnp.zeros_like(col)  # the block's first row in its window; slot_rows for a -1 id (all masked)
    for part in range(per_step):
      block = block_id(step, part)
      _, r = window(jnp.maximum(block, 0))
      offset = jnp.where(part_of_col == part, jnp.where(block >= 0, r, slot_rows), offset)
    valid = (in_slot >= offset) & (in_slot < offset + block_tokens)
    valid = valid & (lax.div(row, GROUP_ROWS) == lax.div(step, steps_per_group))
    s = jnp.where(valid, s * scale_log2, -jnp.inf)
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


@functools.partial(jax.jit, static_argnames=("scale", "groups_per_cta", "stages", "fetch_rows", "slot_rows"))
def selection_attention(q: Float[Array, "b h n d"], k_blocks: Float[Array, "b h nblk bt d"],
                        v_blocks: Float[Array, "b h nblk bt d"], ids: Int[Array, "b h g k"], *, scale: float,
                        groups_per_cta: int = 4, stages: int | None = None, fetch_rows: int | None = None,
                        slot_rows: int | None = None) -> tuple[Float[Array, "b h n d"], Float[Array, "b h n"]]:
  """Selection attention (see `api.selection_attention`) through Pallas Mosaic GPU (Hopper).

  Groups with no valid id give zero output: their rows see only masked keys, l stays 0.
  `stages` (default: as many as fit in SMEM, at most 3), `fetch_rows` and `slot_rows` (default: see
  `window_geometry`) are tuning knobs.

  Raises:
    NotImplementedError: a dtype other than bf16/f16, mixed dtypes, head_dim not a multiple of 64,
      groups of more than 16 queries, groups_per_cta * 16 != 64, a store whose row count
      (num_blocks * block_tokens) is not a multiple of 8 or is below one window, no window geometry
      (`window_geometry`), or no pipeline stage fitting in SMEM.
  """
  batch, heads, tokens, head_dim = q.shape
  num_blocks, block_tokens = k_blocks.shape[2:4]
  groups, top_k = ids.shape[2:]
  group_size = tokens // groups
  store_rows = num_blocks * block_tokens
  if q.dtype not in (jnp.bfloat16, jnp.float16) or not (q.dtype == k_blocks.dtype == v_blocks.dtype):
    raise NotImplementedError(f"pallas mosaic_gpu needs one 16-bit float dtype, got {q.dtype}, {k_blocks.dtype}, "
                              f"{v_blocks.dtype}")
  if head_dim % 64 or group_size > GROUP_ROWS or groups_per_cta * GROUP_ROWS != 64:
    raise NotImplementedError(
        f"pallas mosaic_gpu needs head_dim % 64 == 0 (got {head_dim}), groups of <= {GROUP_ROWS} queries "
        f"(got {group_size}) and groups_per_cta = 4 (64 query rows, got {groups_per_cta})")
  fetch_rows, slot_rows, per_step = window_geometry(block_tokens, top_k, fetch_rows, slot_rows)
  if store_rows % TMA_ROWS or store_rows < fetch_rows:
    raise NotImplementedError(
        f"pallas mosaic_gpu reads the store's row view in {TMA_ROWS}-row TMA tiles: it needs num_blocks * "
        f"block_tokens to be a multiple of {TMA_ROWS} and at least one {fetch_rows}-row window (got "
        f"{num_blocks} x {block_tokens} = {store_rows})")
  keys = per_step * slot_rows
  itemsize = jnp.dtype(q.dtype).itemsize
  rows = groups_per_cta * GROUP_ROWS
  stage_bytes = 2 * keys * head_dim * itemsize
  fitting = (SMEM_BYTES - rows * head_dim * itemsize - rows * 4 - 1024) // stage_bytes  # q/out, lse, barriers
  if stages is None:
    stages = min(MAX_STAGES, fitting)
  if not 1 <= stages <= fitting:
    raise NotImplementedError(
        f"pallas mosaic_gpu: {stages} pipeline stages of {keys} x {head_dim} K and V tiles do not fit in "
        f"{SMEM_BYTES} bytes of SMEM (at most {fitting})")
  padded_groups = _round_up(groups, groups_per_cta)  # empty groups (-1 ids, zero queries) fill the last CTA
  # Each group's queries padded to 16 rows; under jit this pad fuses with the caller's transpose.
  q_tiles = jnp.pad(q.reshape(batch, heads, groups, group_size, head_dim),
                    ((0, 0), (0, 0), (0, padded_groups - groups), (0, GROUP_ROWS - group_size), (0, 0)))
  q_tiles = q_tiles.reshape(batch, heads, padded_groups * GROUP_ROWS, head_dim)
  ids = jnp.pad(ids.astype(jnp.int32), ((0, 0), (0, 0), (0, padded_groups - groups), (0, 0)), constant_values=-1)
  k_rows = k_blocks.reshape(batch, heads, store_rows, head_dim)  # free: the store's layout
  v_rows = v_blocks.reshape(batch, heads, store_rows, head_dim)
  kernel = functools.partial(_kernel, heads=heads, top_k=top_k, groups_per_cta=groups_per_cta,
                             block_tokens=block_tokens, fetch_rows=fetch_rows, slot_rows=slot_rows,
                             store_rows=store_rows, scale_log2=scale / LN2, stages=stages)
  out, lse = plgpu.kernel(
      kernel,
      out_type=(jax.ShapeDtypeStruct(q_tiles.shape, q.dtype),
                jax.ShapeDtypeStruct((batch, heads, padded_groups * GROUP_ROWS), jnp.float32)),
      grid=(padded_groups // groups_per_cta, batch * heads),
      grid_names=("item", "bh"),
      scratch_types=(plgpu.SMEM((rows, head_dim), q.dtype),
                     plgpu.SMEM((stages, keys, head_dim), k_blocks.dtype),
                     plgpu.SMEM((stages, keys, head_dim), v_blocks.dtype),
                     plgpu.Barrier(num_arrivals=1), plgpu.Barrier(num_arrivals=1, num_barriers=2 * per_step * stages)),
      compiler_params=plgpu.CompilerParams(approx_math=True,
                                           lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
  )(ids, q_tiles, k_rows, v_rows)
  out = out.reshape(batch, heads, padded_groups, GROUP_ROWS, head_dim)[:, :, :groups, :group_size]
  lse = lse.reshape(batch, heads, padded_groups, GROUP_ROWS)[:, :, :groups, :group_size]
  return out.reshape(q.shape), lse.reshape(batch, heads, tokens)

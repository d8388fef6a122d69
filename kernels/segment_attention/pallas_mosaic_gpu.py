"""Segment attention as a warp-specialised Pallas Mosaic GPU kernel (Hopper: TMA, wgmma).

The keys are read in place from a heads-major row source (the store's `[b, h, rows, d]` view):
`count` segments of `length` rows, segment i starting at row `starts[i]`. One CTA per (head, 128
queries, batch entry), heads the fastest launch axis (80-chunk sliding window on the H100: 0.76
against 0.80 ms with query tiles fastest in one sweep, 0.77 against 0.79 across the two full
benchmark runs: a small gain at most).

A CTA is three warpgroups (the FlashAttention-3 structure): two compute warpgroups of 64 queries
each and one that only issues TMA copies of `block_kv`-row K and V tiles into a ring of `stages`
shared-memory slots. Mosaic's TMA views the source as 8-row tiles, so a segment is read from
`starts[i]` rounded down to 8 rows (offset r = starts[i] % 8) in `ceil((length + 7) / block_kv)`
tiles (enough for any offset); the first tile (when r > 0) and those past the last full one mask
the rows outside the segment (the rest run unmasked), so those rows only need to be finite (neighbouring
rows of the store, or TMA's zero fill past the source's end). A tile that ends up fully masked adds
nothing: it is never a segment's first. The
compute warpgroups take turns on the tensor cores (a schedule barrier), so one's softmax overlaps
the other's matmuls. The last query tile runs past the chunk: TMA zero-fills those rows on load and
drops them on store.
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

LOG2E = math.log2(math.e)
COMPUTE_WARPGROUPS = 2
BLOCK_KV = 128  # key rows per pipeline step
ROW_TILE = 8  # Mosaic's TMA row granularity
_META = 2  # meta = [count, length, starts // 8 ..., starts % 8 ...]


def _kernel(meta_ref, q_ref, k_ref, v_ref, out_ref, scratch, *, block_q: int, block_kv: int, stages: int,
            scale_log2: float):
  (qo_smem2, k_smem, v_smem), (k_ready, v_ready, q_ready), (k_free, v_free), schedule = scratch
  b, head, wg = lax.axis_index("batch"), lax.axis_index("head"), lax.axis_index("wg")
  count, length = meta_ref[0], meta_ref[1]
  max_segments = (meta_ref.shape[0] - _META) // 2
  tiles_per_segment = lax.div(length + (ROW_TILE - 1) + (block_kv - 1), block_kv)  # enough for any offset
  steps = count * tiles_per_segment
  dtype = qo_smem2.dtype
  head_dim = qo_smem2.shape[-1]

  def take_turn():
    plgpu.barrier_arrive(schedule)
    plgpu.barrier_wait(schedule)

  @pl.when(wg < COMPUTE_WARPGROUPS)
  def _compute():
    plgpu.set_max_registers(232, action="increase")
    qo_smem = qo_smem2.at[wg]
    q_base = lax.axis_index("q_tile") * (COMPUTE_WARPGROUPS * block_q) + wg * block_q
    plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q_base, block_q), head], qo_smem, q_ready.at[wg])
    plgpu.barrier_wait(q_ready.at[wg])
    column = plgpu.broadcasted_iota(jnp.int32, (block_q, block_kv), 1, layout=plgpu.Layout.WGMMA)

    @pl.when(steps > 0)
    def _():
      plgpu.barrier_wait(k_ready.at[0])

    pl.when(wg == 1)(take_turn)

    def step_fn(step, carry, valid: tuple[jax.Array, jax.Array] | None):
      acc, m, l = carry
      slot = lax.rem(step, stages)

      def qk(acc_ref):
        plgpu.wgmma(acc_ref, qo_smem, k_smem.at[slot].transpose((1, 0)))
        take_turn()
        return acc_ref[...]

      s = pl.run_scoped(qk, plgpu.ACC((block_q, block_kv), jnp.float32))
      plgpu.barrier_arrive(k_free.at[slot])
      if valid is not None:  # a segment's first or last tile: mask the rows outside [lo, hi)
        lo, hi = valid
        s = jnp.where((column >= lo) & (column < hi), s, -jnp.inf)
      m_new = jnp.maximum(m, s.max(axis=1) * scale_log2)
      alpha = jnp.exp2(m - m_new)
      p = jnp.exp2(s * scale_log2 - lax.broadcast_in_dim(m_new, s.shape, [0]))
      acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
      l = l * alpha + p.sum(axis=1)
      p16 = p.astype(dtype)
      acc, l, m_new, p16 = lax.optimization_barrier((acc, l, m_new, p16))
      plgpu.barrier_arrive(schedule)  # softmax done
      plgpu.barrier_wait(v_ready.at[slot])
      plgpu.barrier_wait(schedule)  # the tensor cores are ours

      def pv(acc_ref):
        plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
        next_step = step + 1

        @pl.when(next_step < steps)
        def _():
          plgpu.barrier_wait(k_ready.at[lax.rem(next_step, stages)])

      acc = pl.run_state(pv)(plgpu.ACC.init(acc))
      plgpu.barrier_arrive(v_free.at[slot])
      return acc, m_new, l

    def segment_fn(segment, carry):
      first = segment * tiles_per_segment
      offset = meta_ref[_META + max_segments + segment]

      def edge(step, carry):
        lo = offset - (step - first) * block_kv
        return step_fn(step, carry, valid=(lo, lo + length))

      masked_first = first + (offset > 0).astype(jnp.int32)  # an aligned start needs no mask on tile 0
      full_end = jnp.maximum(first + lax.div(offset + length, block_kv), masked_first)  # the full tiles' end
      carry = lax.fori_loop(first, masked_first, edge, carry)
      carry = lax.fori_loop(masked_first, full_end, functools.partial(step_fn, valid=None), carry)
      return lax.fori_loop(full_end, first + tiles_per_segment, edge, carry)

    row_layout = plgpu.Layout.WGMMA.reduce(1)
    init = (plgpu.layout_cast(jnp.zeros((block_q, head_dim), jnp.float32), plgpu.Layout.WGMMA),
            plgpu.layout_cast(jnp.full((block_q,), -jnp.inf, jnp.float32), row_layout),
            plgpu.layout_cast(jnp.zeros((block_q,), jnp.float32), row_layout))
    acc, _, l = lax.fori_loop(0, count, segment_fn, init)
    pl.when(wg == 0)(take_turn)
    l = jnp.where(l > 0, l, 1.0)  # no segments: zeros
    qo_smem[...] = (acc / lax.broadcast_in_dim(l, acc.shape, [0])).astype(dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(qo_smem, out_ref.at[b, pl.ds(q_base, block_q), head])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == COMPUTE_WARPGROUPS)
  def _memory():
    plgpu.set_max_registers(40, action="decrease")

    def fetch(step, slot, wait_free: bool):
      segment = lax.div(step, tiles_per_segment)
      # Starts are stored in 8-row units: the product shows Mosaic's layout inference that the TMA
      # source row is a multiple of 8, as the (8, 64)-tiled shared-memory slots need.
      row = meta_ref[_META + segment] * ROW_TILE + lax.rem(step, tiles_per_segment) * block_kv
      rows = (b, head, pl.ds(row, block_kv))
      if wait_free:
        plgpu.barrier_wait(k_free.at[slot])
      plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_ready.at[slot])
      if wait_free:
        plgpu.barrier_wait(v_free.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], v_ready.at[slot])

    for slot in range(stages):
      pl.when(slot < steps)(functools.partial(fetch, jnp.int32(slot), slot, wait_free=False))

    @pl.loop(0, jnp.maximum(steps - stages, 0))
    def _(step):
      fetch(step + stages, lax.rem(step, stages), wait_free=True)


@functools.partial(jax.jit, static_argnames=("scale", "block_q", "block_kv", "stages"))
def segment_attention(q: Float[Array, "b n h d"], keys: Float[Array, "b h r d"], values: Float[Array, "b h r d"],
                      starts: Int[Array, " segments"], count: Int[Array, ""], length: Int[Array, ""], *,
                      scale: float, block_q: int = 64, block_kv: int = BLOCK_KV,
                      stages: int = 2) -> Float[Array, "b n h d"]:
  """Segment attention (see `api.segment_attention`) through Pallas Mosaic GPU (Hopper).

  Raises:
    NotImplementedError: a dtype other than bf16 / f16, mixed dtypes, head_dim not a multiple of 64,
      or query tokens / source rows that Mosaic's 8-row TMA tiles cannot view (not a multiple of 8,
      or fewer source rows than one key tile).
  """
  batch, tokens, heads, head_dim = q.shape
  rows = keys.shape[2]
  if len({q.dtype, keys.dtype, values.dtype}) != 1 or q.dtype not in (jnp.bfloat16, jnp.float16):
    raise NotImplementedError(f"pallas mosaic_gpu segment attention needs one 16-bit float dtype, got {q.dtype}, "
                              f"{keys.dtype}, {values.dtype}")
  if head_dim % 64:
    raise NotImplementedError(f"pallas mosaic_gpu segment attention needs head_dim % 64 == 0, got {head_dim}")
  if tokens % ROW_TILE or rows % ROW_TILE or rows < block_kv:
    raise NotImplementedError(f"pallas mosaic_gpu segment attention views queries and source rows as {ROW_TILE}-row "
                              f"TMA tiles: it needs multiples of {ROW_TILE} and at least {block_kv} source rows, got "
                              f"{tokens} query tokens and {rows} source rows")
  starts = starts.astype(jnp.int32)
  count = jnp.where(length > 0, count, 0)  # an empty segment would leave a first tile with no valid row
  meta = jnp.concatenate([jnp.stack([count, length]).astype(jnp.int32), starts // ROW_TILE, starts % ROW_TILE])
  tiled = (plgpu.TilingTransform((ROW_TILE, 64)), plgpu.SwizzleTransform(128))
  kernel = functools.partial(_kernel, block_q=block_q, block_kv=block_kv, stages=stages, scale_log2=scale * LOG2E)
  return plgpu.kernel(
      lambda meta_ref, q_ref, k_ref, v_ref, out_ref: pl.run_scoped(
          lambda *scratch: kernel(meta_ref, q_ref, k_ref, v_ref, out_ref, scratch),
          (plgpu.SMEM((COMPUTE_WARPGROUPS, block_q, head_dim), q.dtype, transforms=tiled),
           plgpu.SMEM((stages, block_kv, head_dim), q.dtype, transforms=tiled),
           plgpu.SMEM((stages, block_kv, head_dim), q.dtype, transforms=tiled)),
          (plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
           plgpu.Barrier(num_barriers=COMPUTE_WARPGROUPS)),
          (plgpu.Barrier(num_arrivals=COMPUTE_WARPGROUPS, num_barriers=stages),) * 2,
          plgpu.Barrier(num_arrivals=COMPUTE_WARPGROUPS),
          collective_axes="wg"),
      out_type=jax.ShapeDtypeStruct(q.shape, q.dtype),
      grid=(heads, pl.cdiv(tokens, COMPUTE_WARPGROUPS * block_q), batch),
      grid_names=("head", "q_tile", "batch"),
      num_threads=COMPUTE_WARPGROUPS + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
  )(meta, q, keys, values)

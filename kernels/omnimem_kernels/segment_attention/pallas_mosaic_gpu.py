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
nothing (a CTA whose share of the steps starts with one shifts its softmax by 0 there). The
compute warpgroups take turns on the tensor cores (a schedule barrier), so one's softmax overlaps
the other's matmuls. The last query tile runs past the chunk: TMA zero-fills those rows on load and
drops them on store.

Wave filling: one CTA fills an SM, so 12 heads x 37 query tiles = 444 CTAs run on an H100's 132 SMs
in 4 waves, the last one 36% full. `splits` > 1 divides each query tile's key steps among that many
CTAs (888 half-length CTAs: 6.7 waves); each writes its normalised partial output and base-2
log-sum-exp, merged elementwise afterwards. In one sweep on an H100 at 80 chunks, two splits took
the sliding branch from 0.77 to 0.73 ms and the compressed branch from 0.67 to 0.61 ms (merge
included); three and four did worse than two.
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


def _kernel(meta_ref, q_ref, k_ref, v_ref, out_ref, lse_ref, scratch, *, batch: int, splits: int, block_q: int,
            block_kv: int, stages: int, scale_log2: float):
  (qo_smem2, lse_smem2, k_smem, v_smem), (k_ready, v_ready, q_ready), (k_free, v_free), schedule = scratch
  head, wg = lax.axis_index("head"), lax.axis_index("wg")
  b, split = lax.rem(lax.axis_index("piece"), batch), lax.div(lax.axis_index("piece"), batch)
  count, length = meta_ref[0], meta_ref[1]
  max_segments = (meta_ref.shape[0] - _META) // 2
  tiles_per_segment = lax.div(length + (ROW_TILE - 1) + (block_kv - 1), block_kv)  # enough for any offset
  # This CTA's share of the key steps (segment-major): [lo, hi), empty only with fewer steps than splits.
  total_steps = count * tiles_per_segment
  lo, hi = lax.div(split * total_steps, splits), lax.div((split + 1) * total_steps, splits)
  steps = hi - lo
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
      slot = lax.rem(step - lo, stages)

      def qk(acc_ref):
        plgpu.wgmma(acc_ref, qo_smem, k_smem.at[slot].transpose((1, 0)))
        take_turn()
        return acc_ref[...]

      s = pl.run_scoped(qk, plgpu.ACC((block_q, block_kv), jnp.float32))
      plgpu.barrier_arrive(k_free.at[slot])
      if valid is not None:  # a segment's first or last tile: mask the rows outside [row_lo, row_hi)
        row_lo, row_hi = valid
        s = jnp.where((column >= row_lo) & (column < row_hi), s, -jnp.inf)
      m_new = jnp.maximum(m, s.max(axis=1) * scale_log2)
      # A CTA's first tile can be wholly masked (a segment's spare last tile, once the key steps are
      # split): shift by 0 there, so that exp2(-inf - -inf) makes no NaN.
      m_shift = m_new if valid is None else jnp.where(m_new > -jnp.inf, m_new, 0.0)
      alpha = jnp.exp2(m - m_shift)
      p = jnp.exp2(s * scale_log2 - lax.broadcast_in_dim(m_shift, s.shape, [0]))
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

        @pl.when(next_step < hi)
        def _():
          plgpu.barrier_wait(k_ready.at[lax.rem(next_step - lo, stages)])

      acc = pl.run_state(pv)(plgpu.ACC.init(acc))
      plgpu.barrier_arrive(v_free.at[slot])
      return acc, m_new, l

    def segment_fn(segment, carry):
      first = segment * tiles_per_segment
      offset = meta_ref[_META + max_segments + segment]

      def edge(step, carry):
        row_lo = offset - (step - first) * block_kv
        return step_fn(step, carry, valid=(row_lo, row_lo + length))

      masked_first = first + (offset > 0).astype(jnp.int32)  # an aligned start needs no mask on tile 0
      full_end = jnp.maximum(first + lax.div(offset + length, block_kv), masked_first)  # the full tiles' end
      clip = lambda step: jnp.clip(step, lo, hi)  # noqa: E731  (this CTA's steps only)
      carry = lax.fori_loop(clip(first), clip(masked_first), edge, carry)
      carry = lax.fori_loop(clip(masked_first), clip(full_end), functools.partial(step_fn, valid=None), carry)
      return lax.fori_loop(clip(full_end), clip(first + tiles_per_segment), edge, carry)

    row_layout = plgpu.Layout.WGMMA.reduce(1)
    init = (plgpu.layout_cast(jnp.zeros((block_q, head_dim), jnp.float32), plgpu.Layout.WGMMA),
            plgpu.layout_cast(jnp.full((block_q,), -jnp.inf, jnp.float32), row_layout),
            plgpu.layout_cast(jnp.zeros((block_q,), jnp.float32), row_layout))
    first_segment = lax.div(lo, jnp.maximum(tiles_per_segment, 1))
    last_segment = lax.div(hi + tiles_per_segment - 1, jnp.maximum(tiles_per_segment, 1))
    acc, m, l = lax.fori_loop(first_segment, jnp.where(steps > 0, last_segment, first_segment), segment_fn, init)
    pl.when(wg == 0)(take_turn)
    rows = pl.ds(q_base, block_q)
    qo_smem[...] = (acc / lax.broadcast_in_dim(jnp.where(l > 0, l, 1.0), acc.shape, [0])).astype(dtype)  # none: 0
    if splits > 1:  # partial results, merged by their log-sum-exp (base 2)
      lse_smem = lse_smem2.at[wg]
      lse_smem[...] = m + jnp.log(l) * LOG2E
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(qo_smem, out_ref.at[split, b, rows, head])
      plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[split, b, head, rows])
    else:
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(qo_smem, out_ref.at[b, rows, head])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == COMPUTE_WARPGROUPS)
  def _memory():
    plgpu.set_max_registers(40, action="decrease")

    def fetch(local_step, slot, wait_free: bool):
      step = lo + local_step
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


def default_splits(ctas: int, multiprocessors: int, max_splits: int = 4) -> int:
  """Key splits per query tile that best fill the GPU's waves of one-CTA-per-SM launches.

  With 12 heads x 37 query tiles = 444 CTAs on an H100's 132 SMs, the fourth wave runs 48 CTAs and
  leaves 84 SMs idle (84% of the machine used); two splits make 888 half-length CTAs in 6.7 waves.
  Ties go to fewer splits (each split adds a prologue and a partial result to merge).
  """
  waves = lambda s: -(-ctas * s // multiprocessors) / s  # noqa: E731  (in units of one unsplit CTA)
  return min(range(1, max_splits + 1), key=lambda s: (waves(s), s))


def merge_partials(parts: Float[Array, "s b n h d"], lse: Float[Array, "s b h n"]) -> Float[Array, "b n h d"]:
  """Softmax results over disjoint key sets, each normalised with its base-2 log-sum-exp, merged.

  Written elementwise over the (few) parts, with no reduction, so XLA can fuse the merge into the
  consumer of the result (the layer's gate sum).
  """
  lse = [jnp.moveaxis(part_lse, 2, 1)[..., None] for part_lse in lse]  # [b, n, h, 1] each
  top = functools.reduce(jnp.maximum, lse)
  weights = [jnp.where(top > -jnp.inf, jnp.exp2(part_lse - top), 0.0) for part_lse in lse]
  total = functools.reduce(jnp.add, weights)
  merged = functools.reduce(jnp.add, [w * part.astype(jnp.float32) for w, part in zip(weights, parts, strict=True)])
  return (merged / jnp.where(total > 0, total, 1.0)).astype(parts.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "block_q", "block_kv", "stages", "splits"))
def segment_attention(q: Float[Array, "b n h d"], keys: Float[Array, "b h r d"], values: Float[Array, "b h r d"],
                      starts: Int[Array, " segments"], count: Int[Array, ""], length: Int[Array, ""], *,
                      scale: float, block_q: int = 64, block_kv: int = BLOCK_KV, stages: int = 2,
                      splits: int | None = None) -> Float[Array, "b n h d"]:
  """Segment attention (see `api.segment_attention`) through Pallas Mosaic GPU (Hopper).

  `splits` divides each query tile's key steps among that many CTAs, merged afterwards by their
  log-sum-exp; default `default_splits` for this GPU.

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
  q_tiles = pl.cdiv(tokens, COMPUTE_WARPGROUPS * block_q)
  if splits is None:
    splits = default_splits(heads * q_tiles * batch, jax.local_devices()[0].core_count)
  starts = starts.astype(jnp.int32)
  count = jnp.where(length > 0, count, 0)  # an empty segment would leave a first tile with no valid row
  meta = jnp.concatenate([jnp.stack([count, length]).astype(jnp.int32), starts // ROW_TILE, starts % ROW_TILE])
  tiled = (plgpu.TilingTransform((ROW_TILE, 64)), plgpu.SwizzleTransform(128))
  kernel = functools.partial(_kernel, batch=batch, splits=splits, block_q=block_q, block_kv=block_kv, stages=stages,
                             scale_log2=scale * LOG2E)
  if splits > 1:
    # The log-sum-exp rows are padded to whole query tiles: Mosaic's TMA store does not clip a
    # 1-D row slice at the array's last dimension (the overflow landed in the next row).
    out_type = (jax.ShapeDtypeStruct((splits, *q.shape), q.dtype),
                jax.ShapeDtypeStruct((splits, batch, heads, q_tiles * COMPUTE_WARPGROUPS * block_q), jnp.float32))
  else:
    out_type = jax.ShapeDtypeStruct(q.shape, q.dtype)
  result = plgpu.kernel(
      lambda meta_ref, q_ref, k_ref, v_ref, out_ref, lse_ref=None: pl.run_scoped(
          lambda *scratch: kernel(meta_ref, q_ref, k_ref, v_ref, out_ref, lse_ref, scratch),
          (plgpu.SMEM((COMPUTE_WARPGROUPS, block_q, head_dim), q.dtype, transforms=tiled),
           plgpu.SMEM((COMPUTE_WARPGROUPS, block_q), jnp.float32) if splits > 1 else None,
           plgpu.SMEM((stages, block_kv, head_dim), q.dtype, transforms=tiled),
           plgpu.SMEM((stages, block_kv, head_dim), q.dtype, transforms=tiled)),
          (plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
           plgpu.Barrier(num_barriers=COMPUTE_WARPGROUPS)),
          (plgpu.Barrier(num_arrivals=COMPUTE_WARPGROUPS, num_barriers=stages),) * 2,
          plgpu.Barrier(num_arrivals=COMPUTE_WARPGROUPS),
          collective_axes="wg"),
      out_type=out_type,
      # Heads fastest, splits slowest: CTAs running together read the same keys (L2 reuse).
      grid=(heads, q_tiles, batch * splits),
      grid_names=("head", "q_tile", "piece"),
      num_threads=COMPUTE_WARPGROUPS + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
  )(meta, q, keys, values)
  if splits == 1:
    return result
  parts, lse = result
  return merge_partials(parts, lse[..., :tokens])

"""Causal Wan2.1 DiT in Flax NNX, with OmniMem (or baseline) self-attention over the KV store.

The architecture is exactly Wan2.1's (docs/architecture.md, 'The Wan2.1 models'): a Conv3d patch embedding; a
[cos, sin] timestep sinusoid, time MLP and 6-row modulation per block; non-affine LayerNorms around
modulated self-attention and FFN; RMSNorm on q and k over the full width before the head split;
an affine LayerNorm before unmasked, ungated cross-attention over the 512 text tokens; a GELU-tanh
FFN; a 2-row modulated head; unpatchify. What makes it causal is only the self-attention: each call
processes one chunk of latent frames, writes its post-RoPE K/V into the store and attends over the
history as `config.memory` says (`model/attention.py`).

Tokens run in block order inside the model (`model/layout.py`), so every KV block is contiguous; the
velocity comes back in the caller's `[B, C, F, H, W]` layout. The residual stream, norms,
modulation and timestep path run in float32; projections run in `dtype` (bfloat16 at scale).

The blocks are one stacked module (`nnx.vmap` at construction, `jax.lax.scan` at call time), so the
30 layers compile as one, and every parameter carries logical axis names for `omnimem_jax.sharding`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from omnimem_kernels.backends import Backends
from omnimem_kernels.masked_attention import masked_attention
from omnimem_jax import sharding
from omnimem_jax.config import ModelConfig
from omnimem_jax.memory.store import KVStore, LayerKV, assign
from omnimem_jax.model import rope
from omnimem_jax.model.attention import GATE_ORDER, chunk_self_attention
from omnimem_jax.model.layout import from_block_order, to_block_order

GATE_INIT_STDDEV = 1e-3  # official `initialize_gate`: g_proj ~ N(0, 1e-3), bias 0 (all gates ~0.5)
gate_kernel_init = nnx.initializers.normal(GATE_INIT_STDDEV)

# attend(q, k, v, gate_logits, (stacked store or None, layer index)) -> (output [B, N, H, D], (store, extra))
AttendFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array | None, Any], tuple[jax.Array, tuple[Any, Any]]]
# The self-attention of `CausalWanModel.forward_sequence`, per layer: (q, k, v, gate_logits) -> (output, extra),
# q [B, M, H, D] and k, v [B, M, H, D] after RoPE, gate_logits [B, M, H, 3] (omnimem mode) or None; the
# output [B, M, H, D] goes to the output projection, the extras (any pytree) come back stacked over layers.
SequenceAttention = Callable[[jax.Array, jax.Array, jax.Array, jax.Array | None], tuple[jax.Array, Any]]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CrossKV:
  """Cross-attention keys and values of one prompt, for every layer: computed once, reused per call."""

  k: Float[Array, "l b text h d"]
  v: Float[Array, "l b text h d"]


def _param(key: jax.Array, init: Callable[..., jax.Array], shape: Sequence[int], dtype: Any,
           names: tuple[str | None, ...]) -> nnx.Param:
  return nnx.Param(nnx.with_partitioning(init, names)(key, tuple(shape), dtype))


def _linear(in_features: int, out_features: int, names: tuple[str | None, str | None], rngs: nnx.Rngs, *,
            dtype: Any, param_dtype: Any, kernel_init: Callable[..., jax.Array] = nnx.initializers.xavier_uniform(),
            ) -> nnx.Linear:
  """A Linear with bias whose kernel carries logical axis `names` (in, out) and bias (out,)."""
  return nnx.Linear(in_features, out_features, dtype=dtype, param_dtype=param_dtype,
                    kernel_init=nnx.with_partitioning(kernel_init, names),
                    bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), names[1:]), rngs=rngs)


def layer_norm(x: Float[Array, "... c"], eps: float, scale: jax.Array | None = None,
               bias: jax.Array | None = None) -> Float[Array, "... c"]:
  """LayerNorm over the last axis in float32 (affine only when scale / bias are given)."""
  x = x.astype(jnp.float32)
  mean = x.mean(axis=-1, keepdims=True)
  var = jnp.square(x - mean).mean(axis=-1, keepdims=True)
  y = (x - mean) * jax.lax.rsqrt(var + eps)
  if scale is not None:
    y = y * scale.astype(jnp.float32)
  if bias is not None:
    y = y + bias.astype(jnp.float32)
  return y


def rms_norm(x: Float[Array, "... c"], scale: jax.Array, eps: float) -> Float[Array, "... c"]:
  """RMSNorm over the last axis in float32, returned in x's dtype."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(axis=-1, keepdims=True) + eps)
  return (y * scale.astype(jnp.float32)).astype(x.dtype)


def timestep_sinusoid(timestep: Float[Array, " b"], dim: int) -> Float[Array, "b dim"]:
  """[cos(t w_j), sin(t w_j)] with w_j = 10000^(-j / (dim/2)), float32 (Wan / diffusers order)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
  angles = timestep.astype(jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


def _per_chunk(x: Float[Array, "b n c"], chunks: int) -> Float[Array, "b s n/s c"]:
  return x.reshape(x.shape[0], chunks, -1, x.shape[-1])


def modulate(x: Float[Array, "b n dim"], shift: Float[Array, "b s dim"], scale: Float[Array, "b s dim"],
             eps: float) -> Float[Array, "b n dim"]:
  """layer_norm(x) (1 + scale) + shift in float32, chunk by chunk: the tokens (chunk-major) form S equal runs
  and run s takes row s of shift and scale (S = 1: one modulation for the whole sequence)."""
  y = _per_chunk(layer_norm(x, eps), shift.shape[1])
  return (y * (1 + scale[:, :, None]) + shift[:, :, None]).reshape(x.shape)


def gated(y: Float[Array, "b n dim"], gate: Float[Array, "b s dim"]) -> Float[Array, "b n dim"]:
  """y gate, chunk by chunk as in `modulate`."""
  return (_per_chunk(y, gate.shape[1]) * gate[:, :, None]).reshape(y.shape)


def masked_dense_attention(attention_mask: Bool[Array, "m m"]) -> SequenceAttention:
  """Plain softmax self-attention where `attention_mask[i, j]` says whether query token i sees key token j
  (tokens in block order, frame-major), no gates: `forward_sequence`'s reference attention, e.g. with a
  block-causal mask over chunks, which the causal rollout must equal in "dense" / "window" modes."""

  def attention(q: jax.Array, k: jax.Array, v: jax.Array, gate_logits: jax.Array | None) -> tuple[jax.Array, None]:
    del gate_logits  # masked dense attention has a single branch
    if attention_mask.shape != (q.shape[1], k.shape[1]):
      raise ValueError(f"attention_mask must be [{q.shape[1]}, {k.shape[1]}] (query x key tokens of the sequence), "
                       f"got {tuple(attention_mask.shape)}")
    return jax.nn.dot_product_attention(q, k, v, mask=attention_mask[None, None]), None

  return attention


def _heads(x: jax.Array, num_heads: int) -> jax.Array:
  return x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)


class MLP(nnx.Module):
  """Linear -> activation -> Linear (time and text embeddings, FFN)."""

  def __init__(self, in_features: int, hidden: int, out_features: int, activation: Callable[[jax.Array], jax.Array],
               names: tuple[str | None, str | None, str | None], rngs: nnx.Rngs, *, dtype: Any, param_dtype: Any):
    self.activation = activation
    self.linear_in = _linear(in_features, hidden, names[:2], rngs, dtype=dtype, param_dtype=param_dtype)
    self.linear_out = _linear(hidden, out_features, names[1:], rngs, dtype=dtype, param_dtype=param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.linear_out(self.activation(self.linear_in(x)))


def gelu_tanh(x: jax.Array) -> jax.Array:
  return jax.nn.gelu(x, approximate=True)


class Attention(nnx.Module):
  """q, k, v, o projections with RMSNorm on q and k over the full width (Wan's qk_norm)."""

  def __init__(self, config: ModelConfig, rngs: nnx.Rngs, *, with_gates: bool, dtype: Any, param_dtype: Any):
    dim, self.num_heads, self.eps = config.dim, config.num_heads, config.eps
    make = lambda names: _linear(dim, dim, names, rngs, dtype=dtype, param_dtype=param_dtype)  # noqa: E731
    self.q, self.k, self.v = make(("embed", "heads")), make(("embed", "heads")), make(("embed", "heads"))
    self.o = make(("heads", "embed"))
    self.norm_q = _param(rngs.params(), nnx.initializers.ones_init(), (dim,), param_dtype, ("heads",))
    self.norm_k = _param(rngs.params(), nnx.initializers.ones_init(), (dim,), param_dtype, ("heads",))
    # Gate logits per head in the order (cmp, slc, swa): output feature h * 3 + branch.
    self.g_proj = _linear(dim, len(GATE_ORDER) * config.num_heads, ("embed", "heads"), rngs, dtype=dtype,
                          param_dtype=param_dtype,
                          kernel_init=gate_kernel_init) if with_gates else None

  def queries(self, x: jax.Array) -> jax.Array:
    return _heads(rms_norm(self.q(x), self.norm_q[...], self.eps), self.num_heads)

  def keys_values(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return _heads(rms_norm(self.k(x), self.norm_k[...], self.eps), self.num_heads), _heads(self.v(x), self.num_heads)

  def gate_logits(self, x: jax.Array) -> jax.Array | None:
    return None if self.g_proj is None else _heads(self.g_proj(x), self.num_heads)

  def project_out(self, heads_out: jax.Array) -> jax.Array:
    return self.o(heads_out.reshape(*heads_out.shape[:-2], -1))


class WanBlock(nnx.Module):
  """One Wan attention block: modulated self-attention, cross-attention, modulated FFN."""

  def __init__(self, config: ModelConfig, rngs: nnx.Rngs, *, dtype: Any, param_dtype: Any):
    dim, self.eps = config.dim, config.eps
    self.modulation = _param(rngs.params(), nnx.initializers.normal(1.0 / math.sqrt(dim)), (6, dim), param_dtype,
                             (None, "embed"))
    self.self_attn = Attention(config, rngs, with_gates=config.memory.mode == "omnimem", dtype=dtype,
                               param_dtype=param_dtype)
    self.norm_cross_scale = _param(rngs.params(), nnx.initializers.ones_init(), (dim,), param_dtype, ("embed",))
    self.norm_cross_bias = _param(rngs.params(), nnx.initializers.zeros_init(), (dim,), param_dtype, ("embed",))
    self.cross_attn = Attention(config, rngs, with_gates=False, dtype=dtype, param_dtype=param_dtype)
    self.ffn = MLP(dim, config.ffn_dim, dim, gelu_tanh, ("embed", "mlp", "embed"), rngs, dtype=dtype,
                   param_dtype=param_dtype)
    self.dtype = dtype

  def __call__(self, x: Float[Array, "b n dim"], e0: Float[Array, "b s 6 dim"], cos: jax.Array, sin: jax.Array,
               cross: tuple[jax.Array, jax.Array], attend: AttendFn, store_and_index: tuple[Any, jax.Array]
               ) -> tuple[jax.Array, Any]:
    """x [B, N, dim] float32, tokens chunk-major; e0 holds the modulation of each of S chunks (`modulate`)."""
    shift_sa, scale_sa, gate_sa, shift_ffn, scale_ffn, gate_ffn = jnp.unstack(
        self.modulation[...].astype(jnp.float32)[None, None] + e0, axis=2)

    x_sa = modulate(x, shift_sa, scale_sa, self.eps).astype(self.dtype)
    q, (k, v) = self.self_attn.queries(x_sa), self.self_attn.keys_values(x_sa)
    q, k = rope.apply_rope(q, cos, sin), rope.apply_rope(k, cos, sin)
    attended, attend_output = attend(q, k, v, self.self_attn.gate_logits(x_sa), store_and_index)
    x = x + gated(self.self_attn.project_out(attended).astype(jnp.float32), gate_sa)

    x_ca = layer_norm(x, self.eps, self.norm_cross_scale[...], self.norm_cross_bias[...]).astype(self.dtype)
    cross_k, cross_v = cross
    q = self.cross_attn.queries(x_ca)
    attended = masked_attention(q, cross_k, cross_v)
    x = x + self.cross_attn.project_out(attended).astype(jnp.float32)

    x_ffn = modulate(x, shift_ffn, scale_ffn, self.eps).astype(self.dtype)
    return x + gated(self.ffn(x_ffn).astype(jnp.float32), gate_ffn), attend_output


class CausalWanModel(nnx.Module):
  """Wan2.1 T2V DiT run one chunk at a time over a KV store (see module docstring).

  Usage:
    model = CausalWanModel(ModelConfig.from_preset("wan2.1-t2v-1.3b"), rngs=nnx.Rngs(0))
    cross = model.cross_kv(text_embeddings)           # once per prompt
    store = init_store(model.config, batch_size=1)
    velocity, store = model(latents, timestep, cross, store, chunk_index)
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32):
    self.config, self.dtype = config, dtype
    dim = config.dim
    # Parameters carry logical names, which need no mesh; shardings are attached at restore time.
    with nnx.use_eager_sharding(False):
      self.patch_embedding = nnx.Conv(
          config.in_channels, dim, kernel_size=config.patch_size, strides=config.patch_size, padding="VALID",
          dtype=dtype, param_dtype=param_dtype, rngs=rngs,
          kernel_init=nnx.with_partitioning(nnx.initializers.xavier_uniform(), (None, None, None, None, "embed")),
          bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("embed",)))
      self.text_embedding = MLP(config.text_dim, dim, dim, gelu_tanh, (None, "embed", "embed"), rngs, dtype=dtype,
                                param_dtype=param_dtype)
      # The timestep path stays in float32 whatever the compute dtype (as Wan and diffusers do).
      self.time_embedding = MLP(config.freq_dim, dim, dim, jax.nn.silu, (None, "embed", "embed"), rngs,
                                dtype=jnp.float32, param_dtype=param_dtype)
      self.time_projection = _linear(dim, 6 * dim, ("embed", None), rngs, dtype=jnp.float32,
                                     param_dtype=param_dtype)

      @nnx.split_rngs(splits=config.num_layers)
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
      def make_blocks(block_rngs: nnx.Rngs) -> WanBlock:
        return WanBlock(config, block_rngs, dtype=dtype, param_dtype=param_dtype)

      self.blocks = make_blocks(rngs)
      self.head_modulation = _param(rngs.params(), nnx.initializers.normal(1.0 / math.sqrt(dim)), (2, dim),
                                    param_dtype, (None, "embed"))
      self.head = _linear(dim, config.out_channels * math.prod(config.patch_size), ("embed", None), rngs,
                          dtype=dtype, param_dtype=param_dtype)

  # ---- prompt ----------------------------------------------------------------------------------

  def cross_kv(self, text_embeddings: Float[Array, "b text text_dim"]) -> CrossKV:
    """Every layer's cross-attention K/V for a prompt's text-encoder output (zero-padded, no mask)."""
    if text_embeddings.ndim != 3 or text_embeddings.shape[-1] != self.config.text_dim:
      raise ValueError(f"text_embeddings must be [batch, tokens, {self.config.text_dim}], got "
                       f"{tuple(text_embeddings.shape)}")
    context = self.text_embedding(text_embeddings.astype(self.dtype))
    graphdef, params = nnx.split(self.blocks)

    def layer_kv(block_params):
      k, v = nnx.merge(graphdef, block_params).cross_attn.keys_values(context)
      return k, v

    k, v = jax.lax.map(layer_kv, params)
    return CrossKV(k=k, v=v)

  # ---- shared pieces ---------------------------------------------------------------------------

  def check_latents(self, latents: jax.Array, frames: int | None = None) -> None:
    """Raises ValueError unless latents are [B, in_channels, frames (any if None), latent_h, latent_w]."""
    c = self.config
    ok = (latents.ndim == 5 and latents.shape[1] == c.in_channels
          and tuple(latents.shape[3:]) == (c.latent_height, c.latent_width)
          and (frames is None or latents.shape[2] == frames))
    if not ok:
      shown = "frames" if frames is None else frames
      raise ValueError(f"latents must be [batch, {c.in_channels}, {shown}, {c.latent_height}, {c.latent_width}] "
                       f"for this config, got {tuple(latents.shape)}")

  def _embed(self, latents: Float[Array, "b c f h w"], timestep: Float[Array, "b"] | Float[Array, "b s"]
             ) -> tuple[Float[Array, "b n dim"], Float[Array, "b s dim"], Float[Array, "b s 6 dim"]]:
    """Patch tokens in block order [B, N, dim] (float32) plus e [B, S, dim] and e0 [B, S, 6, dim]: one
    modulation per chunk of F / S frames (S = 1 for a timestep [B])."""
    c = self.config
    batch, frames = latents.shape[0], latents.shape[2]
    timestep = timestep[:, None] if timestep.ndim == 1 else timestep
    if timestep.ndim != 2 or timestep.shape[0] != batch or frames % timestep.shape[1]:
      raise ValueError(f"timestep must be [batch] = [{batch}] (one float per video) or [batch, chunks] with the "
                       f"chunks dividing the {frames} frames (one float per chunk), got {tuple(timestep.shape)}")
    x = self.patch_embedding(latents.transpose(0, 2, 3, 4, 1).astype(self.dtype))  # [B, F, gh, gw, dim]
    x = x.reshape(batch, -1, c.dim).astype(jnp.float32)
    x = to_block_order(x, (frames, c.grid_h, c.grid_w), (c.memory.block_h, c.memory.block_w))
    e = self.time_embedding(timestep_sinusoid(timestep.reshape(-1), c.freq_dim))
    e0 = self.time_projection(jax.nn.silu(e)).reshape(batch, -1, 6, c.dim)
    return x, e.reshape(batch, -1, c.dim), e0

  def _run_blocks(self, x: jax.Array, e0: jax.Array, cos: jax.Array, sin: jax.Array, cross: CrossKV,
                  attend: AttendFn, layers: LayerKV | None) -> tuple[jax.Array, LayerKV | None, Any]:
    """Scans the stacked blocks. The stacked store rides in the carry: each layer's `attend` gets
    (store, layer index), writes its chunk in place and reads its layer without copying it (as scan
    inputs and outputs the store would need a second store-sized buffer, and per-layer slices would
    be copied for the kernels).

    Returns (x, updated layers, per-layer extras stacked by the scan).
    """
    graphdef, params = nnx.split(self.blocks)

    def body(carry, per_layer):
      x, layers = carry
      block_params, cross_k, cross_v, index = per_layer
      block = nnx.merge(graphdef, block_params)
      x, (layers, extra) = block(x, e0, cos, sin, (cross_k, cross_v), attend, (layers, index))
      return (x, layers), extra

    indices = jnp.arange(self.config.num_layers, dtype=jnp.int32)
    (x, layers), extras = jax.lax.scan(body, (x, layers), (params, cross.k, cross.v, indices))
    return x, layers, extras

  def _unembed(self, x: Float[Array, "b n dim"], e: Float[Array, "b s dim"], frames: int
               ) -> Float[Array, "b c f h w"]:
    """Head (2-row modulation with e, not e0; per chunk as in the blocks) and unpatchify of the tokens of
    `frames` frames back to [B, C, F, H, W], float32."""
    c = self.config
    shift, scale = jnp.unstack(self.head_modulation[...].astype(jnp.float32)[None, None] + e[:, :, None], axis=2)
    y = self.head(modulate(x, shift, scale, c.eps).astype(self.dtype))
    y = from_block_order(y.astype(jnp.float32), (frames, c.grid_h, c.grid_w), (c.memory.block_h, c.memory.block_w))
    pt, ph, pw = c.patch_size
    y = y.reshape(y.shape[0], frames, c.grid_h, c.grid_w, pt, ph, pw, c.out_channels)
    y = y.transpose(0, 7, 1, 4, 2, 5, 3, 6)
    return y.reshape(y.shape[0], c.out_channels, frames * pt, c.grid_h * ph, c.grid_w * pw)

  def _cross(self, text: CrossKV | jax.Array, batch: int) -> CrossKV:
    cross = text if isinstance(text, CrossKV) else self.cross_kv(text)
    c = self.config
    if cross.k.ndim != 5 or cross.k.shape[0] != c.num_layers or cross.k.shape[1] != batch or \
       cross.k.shape[3:] != (c.num_heads, c.head_dim) or cross.v.shape != cross.k.shape:
      raise ValueError(f"cross K/V must be [{c.num_layers} layers, {batch}, tokens, {c.num_heads}, {c.head_dim}] "
                       f"(from model.cross_kv), got {tuple(cross.k.shape)} and {tuple(cross.v.shape)}")
    return cross

  # ---- the causal call -------------------------------------------------------------------------

  def __call__(self, latents: Float[Array, "b c f h w"], timestep: Float[Array, " b"], text: CrossKV | jax.Array,
               store: KVStore, chunk_index: int | Int[Array, ""], *,
               backends: Backends = Backends(), return_ids: bool = False
               ) -> tuple[Float[Array, "b c f h w"], KVStore] | tuple[Float[Array, "b c f h w"], KVStore, jax.Array]:
    """Velocity of one chunk, and the store with this chunk's K/V written into its slot.

    Args:
      latents: the chunk's noisy latents [B, in_channels, frames_per_chunk, latent_h, latent_w].
      timestep: flow-matching time in [0, 1000] per batch entry [B] (float; 0 for the context pass), or
        per entry and equal run of the chunk's frames [B, S].
      text: text-encoder output [B, tokens, text_dim] (zero-padded, no mask), or `cross_kv(...)` of it.
      store: the KV store (`memory.store.init_store`), all layers; donate it under `jax.jit`.
      chunk_index: absolute chunk index c (traceable: one compilation for the whole rollout). Frames
        3c..3c+2 must lie in the RoPE table: check the rollout length up front (`rope.check_frames`).
      backends: the backend of each attention op (`omnimem_kernels.backends`); default per platform.
      return_ids: omnimem mode: also return the pooled block ids each layer's selection chose
        ([num_layers, B, heads, groups, top_k] int32, best first, -1 pads; `memory.select`), e.g. for
        retrieval statistics.

    Returns:
      (velocity [B, out_channels, frames_per_chunk, latent_h, latent_w] float32, updated store), plus the
      selected ids when asked for.
    """
    c = self.config
    self.check_latents(latents, c.memory.frames_per_chunk)
    batch = latents.shape[0]
    cross = self._cross(text, batch)
    layers = store.layers
    if layers.k.ndim != 6 or layers.k.shape[:3] != (batch, c.num_heads, c.num_layers):
      raise ValueError(f"store must hold {c.num_layers} layers for batch {batch} (init_store(config, {batch})), "
                       f"got k of shape {tuple(layers.k.shape)}")
    chunk_index = jnp.asarray(chunk_index, jnp.int32)
    x, e, e0 = self._embed(latents, timestep)
    cos, sin = rope.rope_cos_sin(c, chunk_index * c.memory.frames_per_chunk)

    if return_ids and c.memory.mode != "omnimem":
      raise ValueError(f"selected block ids exist in omnimem mode only, not {c.memory.mode}")
    tables = assign(store.tables, chunk_index, c.memory)

    mesh = sharding.context_mesh()

    def local_attention(q, k, v, gate_logits, layers, index, table, chunk):
      """Self-attention of the heads (and batch entries) this device holds."""
      heads = q.shape[2]
      local = dataclasses.replace(c, dim=heads * c.head_dim, num_heads=heads)
      out, layers, ids = chunk_self_attention(q, k, v, layers, table, chunk, gate_logits, local,
                                              backends=backends, layer_index=index)
      return out, layers, ids if return_ids else None

    if mesh is not None:  # heads over "model", batch over "data": kernels see local arrays only
      tokens = sharding.logical_to_mesh_spec(sharding.TOKEN_HEAD_AXES, sharding.LOGICAL_RULES, mesh)
      per_head = sharding.logical_to_mesh_spec(("batch", "heads"), sharding.LOGICAL_RULES, mesh)
      replicated = jax.sharding.PartitionSpec()
      local_attention = jax.shard_map(
          local_attention, mesh=mesh, check_vma=False,
          in_specs=(tokens, tokens, tokens, tokens, per_head, replicated, replicated, replicated),
          out_specs=(tokens, per_head, per_head if return_ids else None))

    def attend(q, k, v, gate_logits, store_and_index):
      layers, index = store_and_index
      out, layers, ids = local_attention(q, k, v, gate_logits, layers, index, store.tables, chunk_index)
      return out, (layers, ids)

    x, new_layers, ids = self._run_blocks(x, e0, cos, sin, cross, attend, layers)
    velocity = self._unembed(x, e, c.memory.frames_per_chunk)
    new_store = KVStore(layers=new_layers, tables=tables)
    return (velocity, new_store, ids) if return_ids else (velocity, new_store)

  # ---- whole sequences (references, teacher forcing) --------------------------------------------

  def forward_sequence(self, latents: Float[Array, "b c f h w"], timestep: Float[Array, "b"] | Float[Array, "b s"],
                       text: CrossKV | jax.Array, attention: SequenceAttention, *,
                       frame_positions: Sequence[int] | np.ndarray | None = None, first_output_frame: int = 0
                       ) -> tuple[Float[Array, "b c f_out h w"], Any]:
    """One forward over all frames at once, no store, with the caller's self-attention.

    The blocks, embedding and head are the causal call's; only the self-attention is `attention`:
    `masked_dense_attention(mask)` gives the reference the causal rollout must equal in "dense" /
    "window" modes; teacher forcing (`omnimem_jax.training`) passes the [clean | noisy] sequence with
    its own masks and branches (docs/architecture.md, 'Teacher forcing').

    Args:
      latents: [B, in_channels, F, latent_h, latent_w]; tokens run frame-major in block order.
      timestep: [B] (one time per video) or [B, S]: the time of each of S equal runs of frames (chunks).
      text: text-encoder output [B, tokens, text_dim], or `cross_kv(...)` of it.
      attention: each layer's self-attention (`SequenceAttention`).
      frame_positions: the RoPE frame index of each of the F frames (concrete ints, default 0 .. F-1);
        teacher forcing gives the noisy frames their clean twins' positions.
      first_output_frame: the head runs on frames from here on only (a multiple of F / S when S > 1).

    Returns:
      (velocity [B, out_channels, F - first_output_frame, latent_h, latent_w] float32, the extras of
      `attention` stacked over layers).
    """
    c = self.config
    self.check_latents(latents)
    frames = latents.shape[2]
    cross = self._cross(text, latents.shape[0])
    x, e, e0 = self._embed(latents, timestep)
    chunk_frames = frames // e.shape[1]
    if not 0 <= first_output_frame < frames or (e.shape[1] > 1 and first_output_frame % chunk_frames):
      raise ValueError(f"first_output_frame must lie in [0, {frames}) and, with a timestep per chunk, start a chunk "
                       f"({chunk_frames} frames each), got {first_output_frame}")
    cos, sin = self._sequence_rope(frames, frame_positions)

    def attend(q, k, v, gate_logits, store_and_index):
      out, extra = attention(q, k, v, gate_logits)
      return out, (store_and_index[0], extra)

    x, _, extras = self._run_blocks(x, e0, cos, sin, cross, attend, None)
    x = x[:, first_output_frame * c.tokens_per_frame:]
    return self._unembed(x, e[:, first_output_frame // chunk_frames:], frames - first_output_frame), extras

  def _sequence_rope(self, frames: int, frame_positions: Sequence[int] | np.ndarray | None
                     ) -> tuple[Float[Array, "n pairs"], Float[Array, "n pairs"]]:
    """RoPE cos and sin of `frames` frames at the given frame positions (default 0 .. frames-1)."""
    positions = np.arange(frames) if frame_positions is None else np.asarray(frame_positions)
    if positions.shape != (frames,) or not np.issubdtype(positions.dtype, np.integer):
      raise ValueError(f"frame_positions must be {frames} integers (one per frame), got {positions!r}")
    first = int(positions.min())
    tables = rope.rope_cos_sin(self.config, first, int(positions.max()) - first + 1)  # range-checked
    pairs = tables[0].shape[-1]
    cos, sin = (table.reshape(-1, self.config.tokens_per_frame, pairs)[positions - first].reshape(-1, pairs)
                for table in tables)
    return cos, sin


def initial_gate_params(config: ModelConfig, key: jax.Array, dtype: Any = jnp.float32) -> dict[str, jax.Array]:
  """Freshly initialised gate projections of all layers, {"kernel": [L, dim, 3H], "bias": [L, 3H]}: what
  `CausalWanModel` starts from, for checkpoints trained without OmniMem gates."""
  outputs = len(GATE_ORDER) * config.num_heads
  return {"kernel": gate_kernel_init(key, (config.num_layers, config.dim, outputs), dtype),
          "bias": jnp.zeros((config.num_layers, outputs), dtype)}


def count_parameters(model: nnx.Module) -> int:
  """Number of parameter elements (works on abstract models from `nnx.eval_shape`)."""
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))

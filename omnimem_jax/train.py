"""OmniMem stage-1 teacher-forcing causal training (paper/official code section 7, masks of section 4.4).

One training example is a clip of N chunks. The model sees the sequence `[clean chunks | noisy chunks]`
at once (2N chunks of tokens):

  clean -> clean   block-causal (chunk c sees clean chunks <= c); timestep 0, as the rollout's
                   context pass that writes clean K/V;
  noisy -> clean   strictly causal (noisy chunk i sees clean chunks < i);
  noisy -> noisy   its own chunk only;  clean -> noisy: never.

Every noisy chunk has its own sigma ~ logit-normal(mean, std) (optionally shifted toward high noise),
`x_i = (1 - sigma_i) x0_i + sigma_i eps_i` at timestep 1000 sigma_i, and the loss is the flow-matching
MSE of the predicted velocity against `eps - x0` on the noisy half. In "omnimem" mode each layer
runs the three branches of `model/attention.py` over this sequence with the same visibility rule:

  cmp  dense over the mean-pooled blocks of every visible chunk;
  swa  dense over the full K/V of the visible chunks of the last `window_chunks` chunks;
  slc  each (query group, head) attends to its top-k blocks among the candidates: the visible clean
       chunks up to c - exclude_window_chunks (Adaptive Window Exclusion on the clean half; all
       visible chunks while c < exclude_window_chunks), plus, as in the official code, a noisy
       query's own noisy chunk (`TrainConfig.select_own_noisy_chunk`; the rollout never selects the
       current chunk once c >= exclude_window_chunks);

gated by sigmoid(clip(x_sa Wg + bg)). Everything is the differentiable XLA path: masked dense
attention over the whole sequence, the selection expressed as a block mask (the top-k ids are not
differentiable; every gathered key and value is). With `select_own_noisy_chunk=False` the noisy half
equals, chunk by chunk, the rollout's `CausalWanModel.__call__` on a store holding the clean chunks
before it (tests/test_train.py checks outputs and gradients). "window" and "dense" baselines use the
same masks with one dense branch and no gates.

The model code runs one timestep per video; teacher forcing needs one per chunk, so the block
forward below is WanBlock's with per-chunk modulation (same modules, same parameters).

Usage:
  config = TrainConfig(model=demo_model_config("omnimem"))
  trainer = Trainer(config, "runs/omnimem")      # restores the latest checkpoint there, if any
  while trainer.step_count < 1000:
    metrics = trainer.step()                     # {"loss": ..., "grad_norm": ...}
  trainer.save(); trainer.export("runs/omnimem/export")
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from omnimem_jax import checkpoints
from omnimem_jax.config import MemoryConfig, ModelConfig
from omnimem_jax.data import synthetic
from omnimem_jax.model import rope
from omnimem_jax.model.attention import gate_branches
from omnimem_jax.model.layout import from_block_order, to_block_order
from omnimem_jax.model.wan import CausalWanModel, layer_norm, timestep_sinusoid



def demo_model_config(mode: str = "omnimem", num_chunks: int = 12, **overrides: Any) -> ModelConfig:
  """The small DiT the synthetic-world demo trains: the tiny preset's token geometry (4 x 16 x 8 latents,
  2 x 2 blocks, groups of 2, top-4) with a little more width and depth. The baselines see the same
  3-chunk window as omnimem's sliding branch ("window": local_attn_frames = 9)."""
  memory = MemoryConfig(mode=mode, block_h=2, block_w=2, group_size=2, top_k=4, window_chunks=3,
                        exclude_window_chunks=3, capacity_chunks=max(num_chunks, 3), local_attn_frames=9,
                        sink_frames=3)
  fields = dict(dim=128, ffn_dim=256, num_heads=4, num_layers=4, in_channels=4, out_channels=4, text_dim=32,
                text_len=8, freq_dim=64, latent_height=8, latent_width=16, memory=memory)
  fields.update(overrides)
  return ModelConfig(**fields)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything one training run depends on (its checkpoints record it).

  Attributes:
    model: architecture and attention mode; the store capacity is irrelevant to training.
    world: the synthetic world the clips come from (frames = latents).
    num_chunks: chunks per training clip (the sequence is 2 x num_chunks chunks long).
    batch_size: clips per step (split over the mesh's "data" axis).
    learning_rate, warmup_steps, weight_decay, beta1, beta2, grad_clip: AdamW with linear warm-up and
      global-norm clipping (official stage 1: lr 1e-5, betas (0.9, 0.999) from a pretrained Wan).
    ema_decay: EMA of the parameters (official 0.99); the EMA is what `export` writes.
    sigma_mean, sigma_std: logit-normal parameters of the per-chunk noise level (official (0, 1)).
    sigma_shift: s -> shift s / (1 + (shift - 1) s) on the drawn sigma (1: none); > 1 trains the
      high-noise levels the 4-step sampler uses more often.
    select_own_noisy_chunk: the official teacher-forcing AWE keeps a noisy query's own chunk among the
      selection candidates; False matches the rollout exactly.
    seed: data, noise and initialisation seed.
  """

  model: ModelConfig = dataclasses.field(default_factory=demo_model_config)
  world: synthetic.WorldConfig = synthetic.WorldConfig()
  num_chunks: int = 12
  batch_size: int = 8
  learning_rate: float = 3e-4
  warmup_steps: int = 100
  weight_decay: float = 0.01
  beta1: float = 0.9
  beta2: float = 0.999
  grad_clip: float = 1.0
  ema_decay: float = 0.99
  sigma_mean: float = 0.0
  sigma_std: float = 1.0
  sigma_shift: float = 1.0
  select_own_noisy_chunk: bool = True
  seed: int = 0

  def __post_init__(self) -> None:
    model, world = self.model, self.world
    if (world.channels, world.height, world.width) != (model.in_channels, model.latent_height, model.latent_width):
      raise ValueError(f"world frames {world.channels}x{world.height}x{world.width} must match the model's latents "
                       f"{model.in_channels}x{model.latent_height}x{model.latent_width}")
    if world.frames_per_chunk != model.memory.frames_per_chunk:
      raise ValueError(f"world frames_per_chunk {world.frames_per_chunk} != model's {model.memory.frames_per_chunk}")
    for name in ("num_chunks", "batch_size", "warmup_steps"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"invalid TrainConfig field '{name}': must be a positive integer, got {value!r}")
    if 2 * self.num_chunks * model.memory.frames_per_chunk > model.rope_max_frames:
      raise ValueError(f"num_chunks={self.num_chunks} leaves the RoPE table of {model.rope_max_frames} frames")
    if not 0.0 <= self.ema_decay < 1.0:
      raise ValueError(f"invalid TrainConfig field 'ema_decay': must lie in [0, 1), got {self.ema_decay}")
    if not (self.learning_rate > 0 and self.sigma_std > 0 and self.sigma_shift > 0 and self.grad_clip > 0):
      raise ValueError("learning_rate, sigma_std, sigma_shift and grad_clip must be > 0")

  def to_dict(self) -> dict[str, Any]:
    fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    fields["model"] = self.model.to_dict()
    fields["world"] = dataclasses.asdict(self.world)
    return fields


# ---- data --------------------------------------------------------------------------------------------


def make_batch(config: TrainConfig, step: int, batch_size: int | None = None) -> dict[str, np.ndarray]:
  """The batch of training step `step`, a pure function of (config, step): every random input of the
  loss (clips, text, sigma per chunk, noise), so a resumed run sees exactly what it would have seen.

  Returns float32 arrays: latents [B, C, F, H, W] (clean clips), noise (same shape), sigma [B, N],
  text [B, text_len, text_dim] (a random, uninformative embedding: the world has no prompt).
  """
  batch_size = config.batch_size if batch_size is None else batch_size
  model, frames = config.model, config.num_chunks * config.model.memory.frames_per_chunk
  rng = np.random.default_rng(np.random.SeedSequence([config.seed, 0x7EA1, int(step)]))
  seeds = rng.integers(0, 2**31 - 1, batch_size)
  latents = synthetic.batch(config.world, seeds, frames)
  noise = rng.standard_normal(latents.shape, dtype=np.float32)
  logits = rng.normal(config.sigma_mean, config.sigma_std, (batch_size, config.num_chunks))
  sigma = 1.0 / (1.0 + np.exp(-logits))
  sigma = config.sigma_shift * sigma / (1.0 + (config.sigma_shift - 1.0) * sigma)
  text = rng.standard_normal((batch_size, model.text_len, model.text_dim), dtype=np.float32)
  return {"latents": latents, "noise": noise, "sigma": sigma.astype(np.float32), "text": text}


# ---- masks -------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ChunkMasks:
  """Chunk-level rules over the 2N-chunk teacher-forcing sequence ([2N, 2N] bool, query x key)."""

  visible: np.ndarray  # the causal teacher-forcing rule (dense mode, compressed branch)
  recent: np.ndarray  # visible and within the dense window (window mode, sliding branch)
  candidates: np.ndarray  # selection candidates (AWE)


def chunk_masks(memory: MemoryConfig, num_chunks: int, select_own_noisy_chunk: bool) -> ChunkMasks:
  """The teacher-forcing masks (section 4.4 of the reference notes) for `memory`'s mode."""
  total = 2 * num_chunks
  chunk = np.arange(total)
  noisy, index = chunk >= num_chunks, chunk % num_chunks
  q_noisy, k_noisy = noisy[:, None], noisy[None, :]
  q_index, k_index = index[:, None], index[None, :]
  visible = np.where(q_noisy, np.where(k_noisy, k_index == q_index, k_index < q_index),
                     ~k_noisy & (k_index <= q_index))
  window = memory.recent_chunks if memory.mode != "dense" else total
  recent = visible & (q_index - k_index < window)
  exclude = memory.exclude_window_chunks
  last = q_index - exclude
  if memory.progressive_exclude:
    last = np.where(q_index < exclude, q_index, last)
  own = k_noisy & (k_index == q_index)
  candidates = visible & (k_index <= last)
  if select_own_noisy_chunk:
    candidates = candidates | (visible & own)
  return ChunkMasks(visible=visible, recent=recent, candidates=candidates)


# ---- attention over the sequence ---------------------------------------------------------------------


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """Softmax attention [B, M, H, D] of q [B, M, H, D] over k, v [B, K, H, D] where `mask` (broadcast to
  [B, H, M, K]) holds, in float32; rows without a visible key give zeros (as the selection kernel)."""
  logits = jnp.einsum("bmhd,bkhd->bhmk", q.astype(jnp.float32), k.astype(jnp.float32)) / math.sqrt(q.shape[-1])
  return _softmax_apply(logits, mask, v)


def _softmax_apply(logits: jax.Array, mask: jax.Array, v: jax.Array) -> jax.Array:
  logits = jnp.where(mask, logits, -1e30)
  probs = jax.nn.softmax(logits, axis=-1) * mask
  return jnp.einsum("bhmk,bkhd->bmhd", probs, v.astype(jnp.float32))


def selected_blocks(q: jax.Array, k_pooled: jax.Array, candidates: jax.Array, config: ModelConfig) -> jax.Array:
  """Which pooled blocks each (query group, head) selects: [B, H, groups, blocks] bool.

  Query-shared scores (group-mean query . pooled key / sqrt(d), fp32), candidates only, top_k of them
  (fewer when fewer candidates exist), as `memory.select.select_blocks`.
  """
  memory = config.memory
  batch, tokens, heads, head_dim = q.shape
  groups = tokens // memory.group_size
  q_bar = q.astype(jnp.float32).reshape(batch, groups, memory.group_size, heads, head_dim).mean(axis=2)
  scores = jnp.einsum("bghd,bjhd->bhgj", q_bar, k_pooled.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST) / jnp.sqrt(jnp.float32(head_dim))
  scores = jnp.where(candidates[None, None], scores, -jnp.inf)
  top_k = min(memory.top_k, k_pooled.shape[1])
  values, ids = jax.lax.top_k(jax.lax.stop_gradient(scores), top_k)
  chosen = jax.nn.one_hot(ids, k_pooled.shape[1], dtype=jnp.bool_) & jnp.isfinite(values)[..., None]
  return jnp.any(chosen, axis=3)


def sequence_attention(q: jax.Array, k: jax.Array, v: jax.Array, gate_logits: jax.Array | None,
                       masks: ChunkMasks, config: ModelConfig, with_recall: bool = False
                       ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """One layer's self-attention over the teacher-forcing sequence (tokens in block order, chunk-major).

  Returns the attention output [B, M, H, D] before the output projection, and per-layer statistics
  (with `with_recall` in omnimem mode: `recall`, the share of the dense attention mass over the
  selection candidates that the selected blocks hold, averaged over the queries of chunks >=
  exclude_window_chunks; otherwise NaN).
  """
  memory = config.memory
  per_chunk, block_tokens = config.tokens_per_chunk, memory.block_tokens
  repeat = lambda rule, rows, cols: jnp.asarray(np.kron(rule, np.ones((rows, cols), bool)))  # noqa: E731
  nan = {"recall": jnp.float32(jnp.nan)}
  if memory.mode in ("dense", "window"):
    rule = masks.visible if memory.mode == "dense" else masks.recent
    return masked_attention(q, k, v, repeat(rule, per_chunk, per_chunk)[None, None]), nan
  if memory.mode != "omnimem":
    raise ValueError(f"teacher forcing supports omnimem, window and dense modes, not {memory.mode}")
  batch, tokens, heads, head_dim = q.shape
  blocks_per_chunk = config.blocks_per_chunk
  pool = lambda x: x.astype(jnp.float32).reshape(batch, -1, block_tokens, heads, head_dim).mean(axis=2)  # noqa: E731
  k_pooled, v_pooled = pool(k), pool(v)
  o_cmp = masked_attention(q, k_pooled, v_pooled, repeat(masks.visible, per_chunk, blocks_per_chunk)[None, None])

  logits = jnp.einsum("bmhd,bkhd->bhmk", q.astype(jnp.float32), k.astype(jnp.float32)) / math.sqrt(head_dim)
  o_swa = _softmax_apply(logits, repeat(masks.recent, per_chunk, per_chunk)[None, None], v)
  groups_per_chunk = per_chunk // memory.group_size
  chosen = selected_blocks(q, k_pooled, repeat(masks.candidates, groups_per_chunk, blocks_per_chunk), config)
  token_mask = jnp.repeat(jnp.repeat(chosen, memory.group_size, axis=2), block_tokens, axis=3)
  o_slc = _softmax_apply(logits, token_mask, v)
  gate_logits = gate_logits.reshape(batch, tokens, heads, 3)
  out = gate_branches(gate_logits, o_cmp, o_slc, o_swa).astype(q.dtype)
  if not with_recall:
    return out, nan

  # Retrieval recall against the dense oracle over the same candidates (statistics only).
  candidate_tokens = repeat(masks.candidates, per_chunk, per_chunk)[None, None]
  oracle = jax.nn.softmax(jnp.where(candidate_tokens, jax.lax.stop_gradient(logits), -1e30), axis=-1)
  recall = jnp.sum(oracle * token_mask, axis=-1)  # [B, H, M]
  index = np.arange(2 * config_chunks(masks)) % config_chunks(masks)
  beyond = np.repeat(index >= memory.exclude_window_chunks, per_chunk)
  stats = {"recall": jnp.sum(recall * beyond) / max(1, batch * heads * int(beyond.sum()))}
  return out, stats


def config_chunks(masks: ChunkMasks) -> int:
  """N of a 2N-chunk mask set."""
  return masks.visible.shape[0] // 2


# ---- the teacher-forcing forward ---------------------------------------------------------------------


def _block_forward(block: Any, x: jax.Array, e0: jax.Array, cos: jax.Array, sin: jax.Array, cross_k: jax.Array,
                   cross_v: jax.Array, masks: ChunkMasks, config: ModelConfig, with_recall: bool
                   ) -> tuple[jax.Array, dict]:
  """`WanBlock.__call__` with one modulation per chunk: x [B, S*n, dim], e0 [B, S, 6, dim]."""
  batch, chunks = e0.shape[:2]
  dtype = block.dtype
  mods = jnp.unstack(block.modulation[...].astype(jnp.float32)[None, None] + e0, axis=2)  # 6 x [B, S, dim]
  shift_sa, scale_sa, gate_sa, shift_ffn, scale_ffn, gate_ffn = (m[:, :, None] for m in mods)

  def per_chunk(y: jax.Array) -> jax.Array:
    return y.reshape(batch, chunks, -1, y.shape[-1])

  def modulate(y: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    return (per_chunk(layer_norm(y, block.eps)) * (1 + scale) + shift).reshape(y.shape)

  x_sa = modulate(x, shift_sa, scale_sa).astype(dtype)
  q, (k, v) = block.self_attn.queries(x_sa), block.self_attn.keys_values(x_sa)
  q, k = rope.apply_rope(q, cos, sin), rope.apply_rope(k, cos, sin)
  attended, stats = sequence_attention(q, k, v, block.self_attn.gate_logits(x_sa), masks, config,
                                       with_recall)
  x = x + (per_chunk(block.self_attn.project_out(attended).astype(jnp.float32)) * gate_sa).reshape(x.shape)

  x_ca = layer_norm(x, block.eps, block.norm_cross_scale[...], block.norm_cross_bias[...]).astype(dtype)
  q = block.cross_attn.queries(x_ca)
  attended = jax.nn.dot_product_attention(q, cross_k.astype(q.dtype), cross_v.astype(q.dtype))
  x = x + block.cross_attn.project_out(attended).astype(jnp.float32)

  x_ffn = modulate(x, shift_ffn, scale_ffn).astype(dtype)
  return x + (per_chunk(block.ffn(x_ffn).astype(jnp.float32)) * gate_ffn).reshape(x.shape), stats


def teacher_forcing_forward(model: CausalWanModel, clean: jax.Array, noisy: jax.Array, noisy_timestep: jax.Array,
                            text: jax.Array, *, select_own_noisy_chunk: bool = True, with_recall: bool = False
                            ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Velocity of every noisy chunk given the clean clip, in one pass over [clean | noisy].

  Args:
    model: the causal DiT (omnimem, window or dense mode).
    clean, noisy: latents [B, C, 3N, H, W]: the clean clip and its per-chunk noised version.
    noisy_timestep: [B, N] flow-matching time (1000 sigma) of each noisy chunk; clean chunks use 0.
    text: text-encoder output [B, text_len, text_dim].
    select_own_noisy_chunk: see `TrainConfig`.
    with_recall: also measure each layer's retrieval recall (`sequence_attention`; one more softmax).

  Returns:
    (velocity of the noisy chunks [B, C, 3N, H, W] float32, per-layer statistics {"recall": [L]}).
  """
  config = model.config
  memory = config.memory
  frames_per_chunk = memory.frames_per_chunk
  model._check_latents(clean, None)  # noqa: SLF001 (shape check shared with the model)
  if noisy.shape != clean.shape or clean.shape[2] % frames_per_chunk:
    raise ValueError(f"clean and noisy latents must share a shape with whole chunks of {frames_per_chunk} frames, "
                     f"got {tuple(clean.shape)} and {tuple(noisy.shape)}")
  batch, frames = clean.shape[0], clean.shape[2]
  num_chunks = frames // frames_per_chunk
  if noisy_timestep.shape != (batch, num_chunks):
    raise ValueError(f"noisy_timestep must be [batch, chunks] = [{batch}, {num_chunks}], got "
                     f"{tuple(noisy_timestep.shape)}")
  grid = (frames, config.grid_h, config.grid_w)
  block = (memory.block_h, memory.block_w)

  def embed(latents: jax.Array) -> jax.Array:
    x = model.patch_embedding(latents.transpose(0, 2, 3, 4, 1).astype(model.dtype))
    return to_block_order(x.reshape(batch, -1, config.dim).astype(jnp.float32), grid, block)

  x = jnp.concatenate([embed(clean), embed(noisy)], axis=1)  # [B, 2T, dim]
  timesteps = jnp.concatenate([jnp.zeros((batch, num_chunks), jnp.float32), noisy_timestep.astype(jnp.float32)], 1)
  e = model.time_embedding(timestep_sinusoid(timesteps.reshape(-1), config.freq_dim))
  e0 = model.time_projection(jax.nn.silu(e)).reshape(batch, 2 * num_chunks, 6, config.dim)
  e = e.reshape(batch, 2 * num_chunks, config.dim)
  cos, sin = rope.rope_cos_sin(config, 0, frames)
  cos, sin = jnp.concatenate([cos, cos]), jnp.concatenate([sin, sin])
  cross = model.cross_kv(text)
  masks = chunk_masks(memory, num_chunks, select_own_noisy_chunk)

  graphdef, params = nnx.split(model.blocks)

  def body(x, per_layer):
    block_params, cross_k, cross_v = per_layer
    x, stats = _block_forward(nnx.merge(graphdef, block_params), x, e0, cos, sin, cross_k, cross_v, masks, config,
                               with_recall)
    return x, stats

  x, stats = jax.lax.scan(body, x, (params, cross.k, cross.v))

  # Head with per-chunk modulation (CausalWanModel._unembed), noisy half only.
  tokens = num_chunks * config.tokens_per_chunk
  shift, scale = jnp.unstack(model.head_modulation[...].astype(jnp.float32)[None, None] + e[:, :, None], axis=2)
  x = layer_norm(x[:, tokens:], config.eps).reshape(batch, num_chunks, -1, config.dim)
  x = x * (1 + scale[:, num_chunks:, None]) + shift[:, num_chunks:, None]
  y = model.head(x.reshape(batch, tokens, config.dim).astype(model.dtype)).astype(jnp.float32)
  y = from_block_order(y, grid, block)
  pt, ph, pw = config.patch_size
  y = y.reshape(batch, frames, config.grid_h, config.grid_w, pt, ph, pw, config.out_channels)
  y = y.transpose(0, 7, 1, 4, 2, 5, 3, 6).reshape(batch, config.out_channels, frames * pt, config.grid_h * ph,
                                                   config.grid_w * pw)
  return y, stats


def noised(batch: dict[str, jax.Array], frames_per_chunk: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(noisy latents, timesteps [B, N], velocity target eps - x0) of a batch from `make_batch`."""
  sigma = jnp.repeat(batch["sigma"], frames_per_chunk, axis=1)[:, None, :, None, None]
  latents, noise = batch["latents"], batch["noise"]
  return (1.0 - sigma) * latents + sigma * noise, 1000.0 * batch["sigma"], noise - latents


def loss_fn(model: CausalWanModel, batch: dict[str, jax.Array], select_own_noisy_chunk: bool = True
            ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Flow-matching v-loss (MSE on the noisy half) and per-layer statistics."""
  noisy, timesteps, target = noised(batch, model.config.memory.frames_per_chunk)
  velocity, stats = teacher_forcing_forward(model, batch["latents"], noisy, timesteps, batch["text"],
                                            select_own_noisy_chunk=select_own_noisy_chunk)
  return jnp.mean(jnp.square(velocity - target)), stats


# ---- state and the train step ------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
  """Everything that changes during training (a pytree: checkpointed as a whole)."""

  step: jax.Array  # int32 scalar: steps taken
  params: nnx.State
  ema: nnx.State
  opt_state: Any


def optimizer(config: TrainConfig) -> optax.GradientTransformation:
  schedule = optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps)
  return optax.chain(optax.clip_by_global_norm(config.grad_clip),
                     optax.adamw(schedule, b1=config.beta1, b2=config.beta2, weight_decay=config.weight_decay))


def _train_step(graphdef: nnx.GraphDef, rest: nnx.State, config: TrainConfig, state: TrainState,
                batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
  def loss_of(params):
    return loss_fn(nnx.merge(graphdef, params, rest), batch, config.select_own_noisy_chunk)

  (loss, stats), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
  updates, opt_state = optimizer(config).update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = jax.tree.map(lambda e, p: config.ema_decay * e + (1.0 - config.ema_decay) * p, state.ema, params)
  del stats
  metrics = {"loss": loss, "grad_norm": jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))}
  return TrainState(step=state.step + 1, params=params, ema=ema, opt_state=opt_state), metrics


@functools.lru_cache(maxsize=8)
def compiled_step(config: TrainConfig, mesh: Mesh) -> Any:
  """The jitted, donated train step for `config` on `mesh` (state replicated, batch split over "data").
  Cached, so every Trainer of the same config and mesh shares one compilation."""
  graphdef, _, rest = nnx.split(nnx.eval_shape(lambda: CausalWanModel(config.model, rngs=nnx.Rngs(0))),
                                nnx.Param, ...)
  replicated, split = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("data"))
  return jax.jit(lambda state, batch: _train_step(graphdef, rest, config, state, batch),
                 in_shardings=(replicated, split), out_shardings=(replicated, replicated), donate_argnums=0)


def default_mesh(batch_size: int) -> Mesh:
  """A 1-D "data" mesh over as many local devices as divide the batch (data parallel)."""
  devices = jax.local_devices()
  count = max(n for n in range(1, len(devices) + 1) if batch_size % n == 0)
  return Mesh(np.asarray(devices[:count]), ("data",))


class Trainer:
  """Teacher-forcing training of one model on the synthetic world, with Orbax checkpoints.

  The constructor restores the latest checkpoint under `directory` (if any), so re-running the same
  command resumes. Parameters are replicated over the mesh, batches split over its "data" axis;
  `step()` is one jitted, donated update.
  """

  def __init__(self, config: TrainConfig, directory: str | os.PathLike | None = None, *, mesh: Mesh | None = None,
               max_to_keep: int = 2):
    self.config = config
    self.mesh = default_mesh(config.batch_size) if mesh is None else mesh
    self.replicated = NamedSharding(self.mesh, PartitionSpec())
    self.batch_sharding = NamedSharding(self.mesh, PartitionSpec("data"))
    model = CausalWanModel(config.model, rngs=nnx.Rngs(config.seed))
    self.graphdef, params, self._rest = nnx.split(model, nnx.Param, ...)
    tx = optimizer(config)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, ema=jax.tree.map(jnp.copy, params),
                       opt_state=tx.init(params))
    self.state = jax.device_put(state, self.replicated)
    self.manager = None
    if directory is not None:
      self.manager = ocp.CheckpointManager(Path(directory).absolute(),
                                           options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))
      latest = self.manager.latest_step()
      if latest is not None:
        self.restore(latest)
    self._step = compiled_step(config, self.mesh)

  @property
  def step_count(self) -> int:
    return int(self.state.step)

  def batch(self, step: int | None = None) -> dict[str, jax.Array]:
    """The (sharded) batch of step `step` (default: the next one)."""
    data = make_batch(self.config, self.step_count if step is None else step)
    return jax.device_put(data, self.batch_sharding)

  def step(self, batch: dict[str, jax.Array] | None = None) -> dict[str, float]:
    """One update on `batch` (default: the next step's batch); returns the metrics as floats."""
    self.state, metrics = self._step(self.state, self.batch() if batch is None else batch)
    return {name: float(value) if value.ndim == 0 else np.asarray(value).tolist() for name, value in metrics.items()}

  def save(self, wait: bool = True) -> None:
    """Checkpoints the whole state at its step (no-op without a directory)."""
    if self.manager is None:
      return
    self.manager.save(self.step_count, args=ocp.args.StandardSave(self._pure(self.state)), force=True)
    if wait:
      self.manager.wait_until_finished()

  def restore(self, step: int) -> None:
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.replicated),
                            self._pure(self.state))
    restored = self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
    params = self._state_from(restored["params"], self.state.params)
    ema = self._state_from(restored["ema"], self.state.ema)
    leaves = [restored["opt_state"][name] for name in sorted(restored["opt_state"])]
    opt_state = jax.tree.unflatten(jax.tree.structure(self.state.opt_state), leaves)
    self.state = TrainState(step=jnp.asarray(restored["step"], jnp.int32), params=params, ema=ema,
                            opt_state=opt_state)

  @staticmethod
  def _pure(state: TrainState) -> dict[str, Any]:
    return {"step": state.step, "params": nnx.to_pure_dict(state.params), "ema": nnx.to_pure_dict(state.ema),
            "opt_state": {f"{i:05d}": leaf for i, leaf in enumerate(jax.tree.leaves(state.opt_state))}}

  @staticmethod
  def _state_from(pure: dict[str, Any], like: nnx.State) -> nnx.State:
    state = jax.tree.map(lambda x: x, like)
    nnx.replace_by_pure_dict(state, pure)
    return state

  def model(self, ema: bool = True) -> CausalWanModel:
    """The trained model (EMA parameters by default)."""
    return nnx.merge(self.graphdef, self.state.ema if ema else self.state.params, self._rest)

  def close(self) -> None:
    if self.manager is not None:
      self.manager.wait_until_finished()
      self.manager.close()

  def export(self, directory: str | os.PathLike, *, ema: bool = True, notes: dict[str, Any] | None = None,
             overwrite: bool = False) -> Path:
    """Writes the (EMA) weights as a `wan_dit` checkpoint that `wan_dit.restore_model` and
    `experiments/generate.py --checkpoint=...` read."""
    params = jax.device_get(nnx.to_pure_dict(self.state.ema if ema else self.state.params))
    config = self.config.model
    record = checkpoints.CheckpointRecord(
        kind=checkpoints.Kind.DIT, config=config.to_dict(), param_dtype="float32",
        has_gates=config.memory.mode == "omnimem", source="omnimem_jax.train (synthetic world)",
        training={"steps": self.step_count, "ema": ema, **self.config.to_dict(), **(notes or {})})
    return checkpoints.save_checkpoint(directory, params, record, overwrite=overwrite)

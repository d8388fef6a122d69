"""The umT5-XXL text encoder in Flax NNX, and the tokenizer glue that turns prompts into what the
Wan DiT consumes: `[B, 512, 4096]` embeddings, exactly zero after each prompt's last token.

Architecture (docs/architecture.md, 'The Wan2.1 models'; HF `UMT5EncoderModel`, Wan `T5Encoder`): token
embedding; 24 pre-norm layers of self-attention and a gated-GELU (tanh) FFN, each layer with its
own relative position bias (umT5: `shared_pos=False`; 32 buckets, bidirectional, max distance 128);
T5 RMS norms (no mean subtraction, eps 1e-6) and no 1/sqrt(d) scaling of the attention logits; a
final norm. The 24 layers are one stacked set of parameters run under `jax.lax.scan`.

Output semantics (Wan `T5EncoderModel.__call__` and diffusers `_get_t5_prompt_embeds`): the prompt
is cleaned (HTML unescaped, whitespace collapsed), tokenised with EOS appended, padded or truncated
to `text_len` (512; longer prompts are cut with a warning, keeping EOS), encoded with padding masked
out of the attention, and every position past the prompt is set to zero. The DiT gets no mask.

The tokenizer is read from a directory the user points to (e.g. Wan2.1's `google/umt5-xxl/`):
`tokenizer.json` through the `tokenizers` package, else `spiece.model` through `sentencepiece`
(`pip install 'omnimem-jax[text]'`).
"""

from __future__ import annotations

import dataclasses
import functools
import html
import math
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from omnimem_jax.config import build_preset, checked_fields


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig:
  """umT5 encoder geometry.

  Attributes:
    vocab_size, dim, num_heads, head_dim, ffn_dim, num_layers: sizes (attention width is
      num_heads * head_dim).
    num_buckets, max_distance: relative position buckets (half per direction) and the distance
      from which all positions share the last bucket.
    eps: RMS norm epsilon.
    text_len: tokens per prompt after padding / truncation (Wan: 512).
    dtype: activation dtype of the projections (norms, softmax and the residual stream run in f32).
    param_dtype: parameter dtype.
  """

  vocab_size: int = 256384
  dim: int = 4096
  num_heads: int = 64
  head_dim: int = 64
  ffn_dim: int = 10240
  num_layers: int = 24
  num_buckets: int = 32
  max_distance: int = 128
  eps: float = 1e-6
  text_len: int = 512
  dtype: str = "bfloat16"
  param_dtype: str = "bfloat16"

  def __post_init__(self) -> None:
    for name in ("vocab_size", "dim", "num_heads", "head_dim", "ffn_dim", "num_layers", "num_buckets",
                 "max_distance", "text_len"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"invalid text encoder config field '{name}': must be a positive integer, got {value!r}")
    if self.num_buckets % 4:
      raise ValueError(f"invalid text encoder config field 'num_buckets': must be a multiple of 4 (half per "
                       f"direction, half of that exact), got {self.num_buckets}")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"invalid text encoder config field '{name}': float32, bfloat16 or float16, got "
                         f"{getattr(self, name)!r}")

  @classmethod
  def from_preset(cls, name: str, **overrides: Any) -> TextEncoderConfig:
    """A named preset (`PRESETS`) with fields replaced by `overrides` (validated again)."""
    return build_preset(PRESETS, name, cls.__name__, overrides)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, fields: Mapping[str, Any]) -> TextEncoderConfig:
    """A config from `to_dict` output (e.g. a checkpoint's JSON); unknown fields are an error."""
    return cls(**checked_fields(cls, fields))


PRESETS: dict[str, Callable[..., TextEncoderConfig]] = {
    "umt5-xxl": TextEncoderConfig,  # Wan's text encoder, bf16
    "tiny": functools.partial(TextEncoderConfig, vocab_size=64, dim=32, num_heads=4, head_dim=8, ffn_dim=48,
                              num_layers=2, num_buckets=8, max_distance=16, text_len=16, dtype="float32",
                              param_dtype="float32"),  # tests, float32
}


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
  """Bidirectional T5 buckets of (key - query) for every (query, key) pair, `[length, length]` int32.

  Half the buckets per direction (positive distances in the upper half); in each half, distances
  below a quarter of the buckets get one bucket each and larger ones share log-spaced buckets up to
  `max_distance`. The log is taken in float32, like torch, so boundary distances (16, 32, ...) land
  in the same bucket as in HF / Wan.
  """
  relative = np.arange(length)[None, :] - np.arange(length)[:, None]
  half = num_buckets // 2
  exact = half // 2
  distance = np.abs(relative)
  ratio = np.maximum(distance, 1).astype(np.float32) / np.float32(exact)
  scaled = np.log(ratio) / np.float32(math.log(max_distance / exact)) * np.float32(half - exact)
  large = np.minimum(exact + scaled.astype(np.int64), half - 1)  # truncation toward zero, as torch .long()
  return (np.where(relative > 0, half, 0) + np.where(distance < exact, distance, large)).astype(np.int32)


def _param(rngs: nnx.Rngs, shape: Sequence[int], dtype: Any, names: tuple[str | None, ...], stddev: float
           ) -> nnx.Param:
  init = nnx.initializers.normal(stddev) if stddev else nnx.initializers.ones_init()
  return nnx.Param(nnx.with_partitioning(init, names)(rngs.params(), tuple(shape), dtype))


def _rms_norm(x: Float[Array, "... d"], scale: jax.Array, eps: float) -> Float[Array, "... d"]:
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps) * scale.astype(jnp.float32)


class UMT5Layers(nnx.Module):
  """The encoder layers' parameters, stacked on a leading "layers" axis."""

  def __init__(self, config: TextEncoderConfig, rngs: nnx.Rngs):
    n, d, inner, f = config.num_layers, config.dim, config.num_heads * config.head_dim, config.ffn_dim
    dt = jnp.dtype(config.param_dtype)
    self.attn_norm = _param(rngs, (n, d), dt, ("layers", "embed"), 0.0)
    self.q = _param(rngs, (n, d, inner), dt, ("layers", "embed", "heads"), (d * config.head_dim) ** -0.5)
    self.k = _param(rngs, (n, d, inner), dt, ("layers", "embed", "heads"), d ** -0.5)
    self.v = _param(rngs, (n, d, inner), dt, ("layers", "embed", "heads"), d ** -0.5)
    self.o = _param(rngs, (n, inner, d), dt, ("layers", "heads", "embed"), inner ** -0.5)
    self.relative_bias = _param(rngs, (n, config.num_buckets, config.num_heads), dt, ("layers", None, "heads"),
                                (2 * config.num_buckets * config.num_heads) ** -0.5)
    self.ffn_norm = _param(rngs, (n, d), dt, ("layers", "embed"), 0.0)
    self.ffn_gate = _param(rngs, (n, d, f), dt, ("layers", "embed", "mlp"), d ** -0.5)
    self.ffn_up = _param(rngs, (n, d, f), dt, ("layers", "embed", "mlp"), d ** -0.5)
    self.ffn_down = _param(rngs, (n, f, d), dt, ("layers", "mlp", "embed"), f ** -0.5)


class UMT5Encoder(nnx.Module):
  """umT5 encoder: ids and mask -> hidden states, zero at masked positions.

  Usage:
    encoder = UMT5Encoder(TextEncoderConfig.from_preset("umt5-xxl"), rngs=nnx.Rngs(0))  # or converted
    tokenizer = load_tokenizer("/path/to/google/umt5-xxl", text_len=512)
    context = encode_prompts(encoder, tokenizer, ["a red fox running through snow"])  # [1, 512, 4096]
  """

  def __init__(self, config: TextEncoderConfig, *, rngs: nnx.Rngs):
    self.config = config
    with nnx.use_eager_sharding(False):
      self.token_embedding = _param(rngs, (config.vocab_size, config.dim), jnp.dtype(config.param_dtype),
                                    ("vocab", "embed"), 1.0)
      self.layers = UMT5Layers(config, rngs)
      self.final_norm = _param(rngs, (config.dim,), jnp.dtype(config.param_dtype), ("embed",), 0.0)

  def __call__(self, ids: Int[Array, "b l"], mask: Int[Array, "b l"]) -> Float[Array, "b l d"]:
    """Hidden states `[B, L, dim]` (float32) of token `ids` where `mask` is 1, exactly 0 elsewhere."""
    cfg = self.config
    if ids.ndim != 2 or ids.shape != mask.shape:
      raise ValueError(f"ids and mask must both be [B, L], got {ids.shape} and {mask.shape}")
    batch, length = ids.shape
    dtype = jnp.dtype(cfg.dtype)
    valid = mask.astype(bool)
    buckets = jnp.asarray(relative_position_buckets(length, cfg.num_buckets, cfg.max_distance))
    x = jnp.take(self.token_embedding[...], ids, axis=0).astype(jnp.float32)

    def layer(x: jax.Array, p: dict[str, jax.Array]) -> tuple[jax.Array, None]:
      h = _rms_norm(x, p["attn_norm"], cfg.eps).astype(dtype)
      q, k, v = ((h @ p[name].astype(dtype)).reshape(batch, length, cfg.num_heads, cfg.head_dim)
                 for name in ("q", "k", "v"))
      bias = jnp.take(p["relative_bias"].astype(jnp.float32), buckets, axis=0).transpose(2, 0, 1)  # [H, L, L]
      attn = jax.nn.dot_product_attention(q, k, v, bias=bias[None].astype(dtype), mask=valid[:, None, None, :],
                                          scale=1.0)
      x = x + (attn.reshape(batch, length, -1) @ p["o"].astype(dtype)).astype(jnp.float32)
      h = _rms_norm(x, p["ffn_norm"], cfg.eps).astype(dtype)
      gated = jax.nn.gelu(h @ p["ffn_gate"].astype(dtype), approximate=True) * (h @ p["ffn_up"].astype(dtype))
      return x + (gated @ p["ffn_down"].astype(dtype)).astype(jnp.float32), None

    params = {name: getattr(self.layers, name)[...] for name in
              ("attn_norm", "q", "k", "v", "o", "relative_bias", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}
    x, _ = jax.lax.scan(layer, x, params)
    x = _rms_norm(x, self.final_norm[...], cfg.eps)
    return jnp.where(valid[..., None], x, 0.0)


# ----------------------------------------------------------------------------------------------------
# Tokenizer glue


def clean_prompt(text: str) -> str:
  """Wan's clean='whitespace': ftfy.fix_text when ftfy is installed, HTML unescaped twice, runs of
  whitespace collapsed to one space, stripped."""
  try:
    import ftfy  # noqa: PLC0415 (optional: only repairs mis-encoded text)
    text = ftfy.fix_text(text)
  except ImportError:
    pass
  text = html.unescape(html.unescape(text)).strip()
  return re.sub(r"\s+", " ", text).strip()


class Tokenizer:
  """umT5 tokenizer from `tokenizer.json` (package `tokenizers`) or `spiece.model` (`sentencepiece`).

  `__call__(prompts)` returns `(ids, mask)`, both `[B, text_len]` int32 numpy arrays: cleaned prompt
  tokens, EOS, then padding (mask 0). Prompts longer than `text_len` tokens are truncated (keeping
  EOS last) with a warning.
  """

  def __init__(self, path: str | os.PathLike, text_len: int = 512):
    path = Path(path)
    if text_len < 2:
      raise ValueError(f"text_len must be >= 2 (a token and EOS), got {text_len}")
    self.text_len = text_len
    json_file = path if path.name == "tokenizer.json" else path / "tokenizer.json"
    spiece_file = path if path.suffix == ".model" else path / "spiece.model"
    if json_file.is_file():
      tokenizers = _import_optional("tokenizers")
      self._fast = tokenizers.Tokenizer.from_file(str(json_file))
      self._fast.no_padding()
      self._fast.enable_truncation(max_length=text_len)
      self.pad_id = self._fast.token_to_id("<pad>") or 0
      self.source = json_file
    elif spiece_file.is_file():
      sentencepiece = _import_optional("sentencepiece")
      self._fast = None
      self._spiece = sentencepiece.SentencePieceProcessor(model_file=str(spiece_file))
      if self._spiece.eos_id() < 0:
        raise ValueError(f"{spiece_file} defines no EOS token, which umT5 needs")
      self.pad_id = max(self._spiece.pad_id(), 0)
      self.source = spiece_file
    else:
      raise FileNotFoundError(
          f"no tokenizer at {path}: expected a directory holding tokenizer.json (read with the `tokenizers` "
          "package) or spiece.model (read with `sentencepiece`), e.g. Wan2.1-T2V-1.3B/google/umt5-xxl")

  def _token_ids(self, index: int, prompt: str) -> list[int]:
    if self._fast is not None:
      encoding = self._fast.encode(prompt)
      truncated = bool(encoding.overflowing)
      ids = list(encoding.ids)
    else:
      pieces = self._spiece.encode(prompt)
      truncated = len(pieces) + 1 > self.text_len
      ids = [*pieces[:self.text_len - 1], self._spiece.eos_id()]
    if truncated:
      warnings.warn(f"prompt {index} is longer than text_len = {self.text_len} tokens; it is truncated (as Wan "
                    "does), so its end does not reach the model", stacklevel=3)
    return ids

  def __call__(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(prompts, str):
      raise TypeError("pass a list of prompts, not a single string")
    ids = np.full((len(prompts), self.text_len), self.pad_id, np.int32)
    mask = np.zeros((len(prompts), self.text_len), np.int32)
    for row, prompt in enumerate(prompts):
      tokens = self._token_ids(row, clean_prompt(prompt))
      ids[row, :len(tokens)] = tokens
      mask[row, :len(tokens)] = 1
    return ids, mask


def _import_optional(name: str) -> Any:
  try:
    return __import__(name)
  except ImportError as err:
    raise ImportError(f"reading the umT5 tokenizer needs the `{name}` package: pip install 'omnimem-jax[text]'"
                      ) from err


def load_tokenizer(path: str | os.PathLike, text_len: int = 512) -> Tokenizer:
  """The tokenizer in directory `path` (tokenizer.json preferred, else spiece.model)."""
  return Tokenizer(path, text_len)


def encode_prompts(encoder: UMT5Encoder, tokenizer: Tokenizer, prompts: Sequence[str]
                   ) -> Float[Array, "b text_len d"]:
  """Prompts -> `[B, text_len, dim]` float32 context for the DiT, zero past each prompt's tokens."""
  if tokenizer.text_len != encoder.config.text_len:
    raise ValueError(f"tokenizer text_len {tokenizer.text_len} != encoder config text_len {encoder.config.text_len}")
  ids, mask = tokenizer(prompts)
  return _encode_jit(encoder, jnp.asarray(ids), jnp.asarray(mask))


@nnx.jit
def _encode_jit(encoder: UMT5Encoder, ids: jax.Array, mask: jax.Array) -> jax.Array:
  return encoder(ids, mask)

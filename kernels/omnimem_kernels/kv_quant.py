"""Compact formats of the KV store's blocks: one float32 scale per block, values stored in 8 or 4 bits.

A block is the last two axes `[block_tokens, head_dim]`; every leading index (batch, head, block) has
its own scale, so one outlier block costs no precision elsewhere.

- "bf16": the values as bfloat16, no scale (the plain store).
- "fp8": float8_e4m3fn of x / scale, scale = amax / 448 (448: e4m3's largest finite value), stored as
  its bytes (uint8): every XLA backend updates a uint8 store in place, while a float8 one is widened and
  copied where the backend lacks float8 (XLA:CPU copies the whole store at each write).
- "int4": symmetric integers q = clip(round(x / scale), -7, 7), scale = amax / 7, stored as the nibble
  q + 8, two per uint8 along head_dim: byte j of a row holds element 2j in its low nibble, 2j + 1 in
  its high nibble.

Both compact formats store uint8; the row length tells them apart (`format_of`). A block of zeros gets
scale 0 and codes that decode to 0. The decoded codes (`decode`) are exact in
bfloat16, which lets the selection kernels decode in the kernel and apply the scale to logits and
probabilities (`omnimem_kernels/selection_attention/pallas_triton.py`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike
from jaxtyping import Array, Float, Shaped

FORMATS = ("bf16", "fp8", "int4")
FP8_MAX = 448.0  # float8_e4m3fn's largest finite value
INT4_MAX = 7  # symmetric codes -7..7
INT4_OFFSET = 8  # a code is stored as the nibble code + 8 (1..15; 8 is zero)

_STORAGE = {"bf16": jnp.bfloat16, "fp8": jnp.uint8, "int4": jnp.uint8}
_CODE_MAX = {"fp8": FP8_MAX, "int4": float(INT4_MAX)}


def _check_format(fmt: str) -> None:
  if fmt not in FORMATS:
    raise ValueError(f"unknown KV format {fmt!r}; known: {FORMATS}")


def storage_dtype(fmt: str) -> jnp.dtype:
  """The dtype a block's data is stored in: bfloat16, or uint8 (an fp8 value's bytes, two int4 codes)."""
  _check_format(fmt)
  return jnp.dtype(_STORAGE[fmt])


def stored_head_dim(head_dim: int, fmt: str) -> int:
  """The data's last axis for `head_dim` values: head_dim / 2 for int4 (which needs an even head_dim)."""
  _check_format(fmt)
  if fmt != "int4":
    return head_dim
  if head_dim % 2:
    raise ValueError(f"int4 packs two values a byte along head_dim, which must be even; got {head_dim}")
  return head_dim // 2


def format_of(data: Shaped[Array, "... stored"], head_dim: int) -> str:
  """The format of data stored for rows of `head_dim` values: a float dtype (bfloat16, float32, ...) ->
  "bf16", the plain unscaled format; uint8 rows of head_dim bytes -> "fp8", of head_dim / 2 -> "int4"."""
  dtype = jnp.dtype(data.dtype)
  if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize >= 2:
    return "bf16"
  if dtype == jnp.uint8 and data.shape[-1] in (head_dim, head_dim // 2):
    return "fp8" if data.shape[-1] == head_dim else "int4"
  raise ValueError(f"no KV format stores {dtype} rows of {data.shape[-1]} for head_dim {head_dim}: plain floats "
                   f"(bf16), or uint8 rows of head_dim (fp8) or head_dim / 2 (int4) bytes")


def quantize(x: Float[Array, "*blocks bt d"],
             fmt: str) -> tuple[Shaped[Array, "*blocks bt stored"], Float[Array, "*blocks"] | None]:
  """(data, scale) of x in `fmt`; scale is float32 of shape x.shape[:-2] (None for "bf16")."""
  stored_head_dim(x.shape[-1], fmt)  # checks fmt and, for int4, an even head_dim
  if fmt == "bf16":
    return x.astype(jnp.bfloat16), None
  x = x.astype(jnp.float32)
  scale = jnp.max(jnp.abs(x), axis=(-2, -1)) / _CODE_MAX[fmt]
  scaled = x / jnp.where(scale > 0, scale, 1.0)[..., None, None]  # a zero block stays zero
  if fmt == "fp8":
    return jax.lax.bitcast_convert_type(jnp.clip(scaled, -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn), jnp.uint8), scale
  nibbles = (jnp.clip(jnp.round(scaled), -INT4_MAX, INT4_MAX) + INT4_OFFSET).astype(jnp.uint8)
  return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4), scale


def decode(data: Shaped[Array, "*rows stored"], fmt: str, dtype: DTypeLike) -> Shaped[Array, "*rows d"]:
  """The unscaled codes of `data` as `dtype` (exact in bfloat16 and wider): fp8 values, or int4 codes
  -8..7 unpacked to [..., 2 * stored] in element order. Uses only ops the Pallas Triton lowering has
  (a bitcast, masks, shifts, a last-axis stack), so the kernels call it on loaded rows."""
  _check_format(fmt)
  if fmt == "fp8":
    return jax.lax.bitcast_convert_type(data, jnp.float8_e4m3fn).astype(dtype)
  if fmt == "bf16":
    return data.astype(dtype)
  low = (data & 0xF).astype(jnp.int32) - INT4_OFFSET
  high = (data >> 4).astype(jnp.int32) - INT4_OFFSET
  pairs = jnp.stack([low, high], axis=-1)  # [..., stored, 2]: element 2j, then 2j + 1
  return pairs.reshape(*data.shape[:-1], 2 * data.shape[-1]).astype(dtype)


def dequantize(data: Shaped[Array, "*blocks bt stored"], scale: Float[Array, "*blocks"] | None,
               fmt: str) -> Float[Array, "*blocks bt d"]:
  """float32 values of stored blocks: decoded codes times each block's scale ("bf16": no scale)."""
  _check_format(fmt)
  if (scale is None) != (fmt == "bf16"):
    raise ValueError(f"format {fmt!r} {'takes no' if fmt == 'bf16' else 'needs a'} scale")
  values = decode(data, fmt, jnp.float32)
  return values if scale is None else values * scale.astype(jnp.float32)[..., None, None]

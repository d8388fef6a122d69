"""The Wan 2.1 video VAE in Flax NNX, channel-last, with a streaming feature cache.

Architecture (docs/architecture.md, 'The Wan2.1 models'): causal 3-D convolutions (zero padding of 2 frames in
front, none behind), L2 "RMS" norms (`x / max(|x|, 1e-12) * sqrt(C) * gamma`), residual blocks, one
single-head spatial attention block per frame in the middle, and temporal / spatial resampling.
Compression is 4x in time and 8x in space: latent frame 0 stands for video frame 0 alone and every
later latent frame for 4 video frames.

Streaming. Each causal convolution carries the last 2 frames of its input (zeros before the video
starts), so decoding a video chunk by chunk with the carried cache gives exactly the frames of
decoding it at once, and exactly what diffusers' frame-by-frame decode gives. The one place where
the first frame is special is the temporal upsampler: its time convolution skips latent frame 0
(Wan's "Rep" sentinel), which is why chunk 0 (latent frames 0..2) decodes to 1 + 4 + 4 = 9 frames
and every later chunk of 3 latent frames to 12. The cache is a pytree of arrays (nested dicts), so
a jitted per-chunk decode carries it; `first` is a static flag that marks the first chunk of a video.
`jit_decode_chunk` is that jitted decode, compiled with `COMPILER_OPTIONS`.

Speed. On Hopper GPUs XLA lays 3-D cuDNN convolutions out as NCDHW and transposes every activation
around each one; `xla_gpu_force_conv_nhwc` keeps them channel-last (NDHWC) instead, which took a
steady 480x832 bf16 chunk on an H100 from 114 ms (convolutions rewritten as 2-D ones over frames)
or 136 ms (plain) to 96.5 ms. Each nearest-2x upsample + 3x3 convolution runs as one sub-pixel
convolution (`Conv2d.upsample_2x`).

Layout: video `[B, T, H, W, 3]` in [-1, 1], latents `[B, T', H/8, W/8, 16]` normalised with the
Wan 2.1 latent statistics (what the DiT consumes and produces). Parameters carry logical axis names
("conv_in", "conv_out", "channels") that no sharding rule maps, so the VAE is replicated.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, UInt8

from omnimem_jax.config import build_preset, checked_fields

# Per-channel statistics of Wan 2.1 latents (WanVAE.__init__, diffusers latents_mean / latents_std).
WAN21_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715,
                      0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652,
                     1.5579, 1.6382, 1.1253, 2.8251, 1.9160)
CACHE_FRAMES = 2  # frames a 3-tap causal convolution needs from the past
NORM_EPS = 1e-12  # F.normalize's eps
# Which 3x3 taps of a conv over a nearest-2x-upsampled axis land on each of the 2 low-res taps an
# output phase reads: phase 0 reads (i - 1: tap 0; i: taps 1, 2), phase 1 (i: taps 0, 1; i + 1: tap 2).
_UPSAMPLE_PHASE_TAPS = np.array([[[1, 0, 0], [0, 1, 1]], [[1, 1, 0], [0, 0, 1]]], np.float32)

Cache = dict[str, Any]  # nested dicts of arrays; None for modules without temporal state


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """Geometry and dtypes of the Wan 2.1 VAE.

  Attributes:
    base_dim: channels of the first encoder stage (and of the last decoder stage).
    z_dim: latent channels.
    dim_mult: channel multiplier per resolution stage.
    num_res_blocks: residual blocks per encoder stage (the decoder has one more).
    temporal_downsample: per encoder downsampling step, whether it also halves time (the decoder
      reverses the list).
    latents_mean, latents_std: per-channel latent statistics; `decode` takes normalised latents.
    dtype: activation dtype (norms and the attention softmax still run in float32).
    param_dtype: parameter dtype.
  """

  base_dim: int = 96
  z_dim: int = 16
  dim_mult: tuple[int, ...] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  temporal_downsample: tuple[bool, ...] = (False, True, True)
  latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
  latents_std: tuple[float, ...] = WAN21_LATENTS_STD
  dtype: str = "float32"
  param_dtype: str = "float32"

  def __post_init__(self) -> None:
    for name in ("base_dim", "z_dim", "num_res_blocks"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"invalid VAE config field '{name}': must be a positive integer, got {value!r}")
    if len(self.dim_mult) < 2 or any(m < 1 for m in self.dim_mult):
      raise ValueError(f"invalid VAE config field 'dim_mult': needs >= 2 positive entries, got {self.dim_mult}")
    if len(self.temporal_downsample) != len(self.dim_mult) - 1:
      raise ValueError(f"invalid VAE config field 'temporal_downsample': needs len(dim_mult) - 1 = "
                       f"{len(self.dim_mult) - 1} entries, got {self.temporal_downsample}")
    for name in ("latents_mean", "latents_std"):
      if len(getattr(self, name)) != self.z_dim:
        raise ValueError(f"invalid VAE config field '{name}': needs z_dim = {self.z_dim} entries, "
                         f"got {len(getattr(self, name))}")
    if any(s <= 0 for s in self.latents_std):
      raise ValueError(f"invalid VAE config field 'latents_std': must be positive, got {self.latents_std}")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"invalid VAE config field '{name}': float32, bfloat16 or float16, got "
                         f"{getattr(self, name)!r}")

  @property
  def spatial_compression(self) -> int:
    return 2 ** (len(self.dim_mult) - 1)

  @property
  def temporal_compression(self) -> int:
    return 2 ** sum(self.temporal_downsample)

  @classmethod
  def from_preset(cls, name: str, **overrides: Any) -> VAEConfig:
    """A named preset (`PRESETS`) with fields replaced by `overrides` (validated again)."""
    return build_preset(PRESETS, name, cls.__name__, overrides)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, fields: Mapping[str, Any]) -> VAEConfig:
    """A config from `to_dict` output (e.g. a checkpoint's JSON); unknown fields are an error."""
    return cls(**checked_fields(cls, fields))


PRESETS: dict[str, Callable[..., VAEConfig]] = {
    "wan2.1": VAEConfig,  # the released Wan2.1_VAE
    "tiny": functools.partial(VAEConfig, base_dim=4, z_dim=4, latents_mean=(0.1, -0.2, 0.3, 0.05),
                              latents_std=(1.5, 0.8, 1.2, 2.0)),  # tests
}


def _param(rngs: nnx.Rngs, init: Callable[..., jax.Array], shape: Sequence[int], dtype: Any,
           names: tuple[str | None, ...]) -> nnx.Param:
  return nnx.Param(nnx.with_partitioning(init, names)(rngs.params(), tuple(shape), dtype))


def _zeros(batch: int, frames: int, height: int, width: int, channels: int, dtype: Any) -> jax.Array:
  return jnp.zeros((batch, frames, height, width, channels), dtype)


class Conv3d(nnx.Module):
  """3-D convolution, channel-last, kernel `[kt, kh, kw, in, out]`.

  No padding in time (callers prepend cached or zero frames, which is what makes it causal), 'same'
  zero padding in space, stride only in time.
  """

  def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, int, int], rngs: nnx.Rngs, *,
               dtype: Any, param_dtype: Any, time_stride: int = 1):
    self.kernel = _param(rngs, nnx.initializers.lecun_normal(), (*kernel, in_channels, out_channels), param_dtype,
                         (None, None, None, "conv_in", "conv_out"))
    self.bias = _param(rngs, nnx.initializers.zeros_init(), (out_channels,), param_dtype, ("conv_out",))
    self.time_stride, self.dtype = time_stride, dtype

  def __call__(self, x: Float[Array, "b t h w ci"]) -> Float[Array, "b t2 h w co"]:
    kh, kw = self.kernel.shape[1:3]
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), self.kernel[...].astype(self.dtype), window_strides=(self.time_stride, 1, 1),
        padding=((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2)), dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    return y + self.bias[...].astype(self.dtype)


def causal_conv(conv: Conv3d, x: Float[Array, "b t h w c"], cache: Float[Array, "b k h w c"]
                ) -> tuple[Float[Array, "b t h w co"], Float[Array, "b k h w c"]]:
  """Runs `conv` over [cached frames, x]; the new cache is the last `k` frames of that input."""
  joined = jnp.concatenate([cache.astype(x.dtype), x], axis=1)
  return conv(joined), joined[:, -cache.shape[1]:]


class Conv2d(nnx.Module):
  """Per-frame 2-D convolution, channel-last, kernel `[kh, kw, in, out]`, explicit spatial padding."""

  def __init__(self, in_channels: int, out_channels: int, rngs: nnx.Rngs, *, dtype: Any, param_dtype: Any,
               stride: int = 1, padding: tuple[tuple[int, int], tuple[int, int]] = ((1, 1), (1, 1))):
    self.kernel = _param(rngs, nnx.initializers.lecun_normal(), (3, 3, in_channels, out_channels), param_dtype,
                         (None, None, "conv_in", "conv_out"))
    self.bias = _param(rngs, nnx.initializers.zeros_init(), (out_channels,), param_dtype, ("conv_out",))
    self.stride, self.padding, self.dtype = stride, padding, dtype

  def __call__(self, x: Float[Array, "b t h w ci"]) -> Float[Array, "b t h2 w2 co"]:
    b, t = x.shape[:2]
    y = jax.lax.conv_general_dilated(
        x.reshape(b * t, *x.shape[2:]).astype(self.dtype), self.kernel[...].astype(self.dtype),
        window_strides=(self.stride, self.stride), padding=self.padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y = y + self.bias[...].astype(self.dtype)
    return y.reshape(b, t, *y.shape[1:])

  def upsample_2x(self, x: Float[Array, "b t h w ci"]) -> Float[Array, "b t h2 w2 co"]:
    """`self(nearest 2x upsample of x)` without the upsampled input (a sub-pixel convolution).

    Output pixel (2i + a, 2j + c) of a 3x3 convolution over the upsampled frame reads low-res rows
    (i - 1, i, i) for a = 0 and (i, i, i + 1) for a = 1 (columns likewise), so each of the 4 output
    phases is a 2x2 convolution of the low-res frame with summed taps. All 4 run as one 2x2
    convolution (4 * out channels) over the frame zero-padded by 1, whose (h + 1) x (w + 1) outputs
    are interleaved: 16 instead of 36 taps per low-res pixel and output channel, and the 4x larger
    upsampled input is never written.
    """
    kh, kw, ci, co = self.kernel.shape
    if (kh, kw, self.stride, self.padding) != (3, 3, 1, ((1, 1), (1, 1))):
      raise ValueError("upsample_2x needs a 3x3, stride-1, padding-1 convolution")
    b, t, h, w, _ = x.shape
    phase_taps = jnp.asarray(_UPSAMPLE_PHASE_TAPS)  # [phase, 2 low-res taps, 3 upsampled taps]
    kernel = jnp.einsum("api,cqj,ijxo->pqxaco", phase_taps, phase_taps, self.kernel[...].astype(jnp.float32))
    z = jax.lax.conv_general_dilated(
        x.reshape(b * t, h, w, ci).astype(self.dtype), kernel.reshape(2, 2, ci, 4 * co).astype(self.dtype),
        window_strides=(1, 1), padding=((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    z = z.reshape(b * t, h + 1, w + 1, 2, 2, co)
    rows = [jnp.stack([z[:, a:a + h, c:c + w, a, c] for c in (0, 1)], axis=3) for a in (0, 1)]
    y = jnp.stack(rows, axis=2).reshape(b, t, 2 * h, 2 * w, co)  # [.., h, a, w, c, ..] -> rows 2i + a
    return y + self.bias[...].astype(self.dtype)


class RMSNorm(nnx.Module):
  """Wan's RMS_norm: an L2 normalisation over channels times sqrt(C) and a learned gain (float32)."""

  def __init__(self, channels: int, rngs: nnx.Rngs, *, param_dtype: Any):
    self.scale = _param(rngs, nnx.initializers.ones_init(), (channels,), param_dtype, ("channels",))

  def __call__(self, x: Float[Array, "... c"]) -> Float[Array, "... c"]:
    x32 = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(jnp.square(x32), axis=-1, keepdims=True))
    y = x32 / jnp.maximum(norm, NORM_EPS) * math.sqrt(x.shape[-1]) * self.scale[...].astype(jnp.float32)
    return y.astype(x.dtype)


class ResidualBlock(nnx.Module):
  """norm -> SiLU -> causal conv 3x3x3 -> norm -> SiLU -> causal conv 3x3x3, plus a 1x1x1 shortcut
  when the channel count changes."""

  def __init__(self, in_dim: int, out_dim: int, rngs: nnx.Rngs, *, dtype: Any, param_dtype: Any):
    self.in_dim, self.out_dim = in_dim, out_dim
    self.norm1 = RMSNorm(in_dim, rngs, param_dtype=param_dtype)
    self.conv1 = Conv3d(in_dim, out_dim, (3, 3, 3), rngs, dtype=dtype, param_dtype=param_dtype)
    self.norm2 = RMSNorm(out_dim, rngs, param_dtype=param_dtype)
    self.conv2 = Conv3d(out_dim, out_dim, (3, 3, 3), rngs, dtype=dtype, param_dtype=param_dtype)
    self.conv_shortcut = (Conv3d(in_dim, out_dim, (1, 1, 1), rngs, dtype=dtype, param_dtype=param_dtype)
                          if in_dim != out_dim else None)

  def init_cache(self, batch: int, height: int, width: int, dtype: Any) -> Cache:
    return {"conv1": _zeros(batch, CACHE_FRAMES, height, width, self.in_dim, dtype),
            "conv2": _zeros(batch, CACHE_FRAMES, height, width, self.out_dim, dtype)}

  def __call__(self, x: Float[Array, "b t h w ci"], cache: Cache) -> tuple[Float[Array, "b t h w co"], Cache]:
    shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
    h, cache1 = causal_conv(self.conv1, jax.nn.silu(self.norm1(x)), cache["conv1"])
    h, cache2 = causal_conv(self.conv2, jax.nn.silu(self.norm2(h)), cache["conv2"])
    return h + shortcut.astype(h.dtype), {"conv1": cache1, "conv2": cache2}


class AttentionBlock(nnx.Module):
  """Single-head self-attention over the h*w positions of each frame (d = channels), plus a residual."""

  def __init__(self, dim: int, rngs: nnx.Rngs, *, dtype: Any, param_dtype: Any):
    self.norm = RMSNorm(dim, rngs, param_dtype=param_dtype)
    init = nnx.initializers.lecun_normal()
    self.to_qkv_kernel = _param(rngs, init, (dim, 3 * dim), param_dtype, ("conv_in", "conv_out"))
    self.to_qkv_bias = _param(rngs, nnx.initializers.zeros_init(), (3 * dim,), param_dtype, ("conv_out",))
    self.proj_kernel = _param(rngs, init, (dim, dim), param_dtype, ("conv_in", "conv_out"))
    self.proj_bias = _param(rngs, nnx.initializers.zeros_init(), (dim,), param_dtype, ("conv_out",))
    self.dtype = dtype

  def __call__(self, x: Float[Array, "b t h w c"]) -> Float[Array, "b t h w c"]:
    b, t, h, w, c = x.shape
    tokens = self.norm(x).reshape(b * t, h * w, c).astype(self.dtype)
    qkv = tokens @ self.to_qkv_kernel[...].astype(self.dtype) + self.to_qkv_bias[...].astype(self.dtype)
    q, k, v = (part[:, :, None, :] for part in jnp.split(qkv, 3, axis=-1))  # one head
    o = jax.nn.dot_product_attention(q, k, v)[:, :, 0, :]
    o = o @ self.proj_kernel[...].astype(self.dtype) + self.proj_bias[...].astype(self.dtype)
    return x + o.reshape(b, t, h, w, c).astype(x.dtype)


class MidBlock(nnx.Module):
  """Residual block, attention, residual block (encoder and decoder middle)."""

  def __init__(self, dim: int, rngs: nnx.Rngs, *, dtype: Any, param_dtype: Any):
    kw = {"dtype": dtype, "param_dtype": param_dtype}
    self.resnets = nnx.List([ResidualBlock(dim, dim, rngs, **kw), ResidualBlock(dim, dim, rngs, **kw)])
    self.attentions = nnx.List([AttentionBlock(dim, rngs, **kw)])

  def init_cache(self, batch: int, height: int, width: int, dtype: Any) -> Cache:
    return {"resnets": [r.init_cache(batch, height, width, dtype) for r in self.resnets]}

  def __call__(self, x: Float[Array, "b t h w c"], cache: Cache) -> tuple[Float[Array, "b t h w c"], Cache]:
    x, cache0 = self.resnets[0](x, cache["resnets"][0])
    x = self.attentions[0](x)
    x, cache1 = self.resnets[1](x, cache["resnets"][1])
    return x, {"resnets": [cache0, cache1]}


class Resample(nnx.Module):
  """Spatial 2x up / down sampling, optionally with a temporal step.

  upsample2d:   nearest 2x, conv 3x3 (dim -> dim / 2), one sub-pixel convolution (`Conv2d.upsample_2x`).
  upsample3d:   time conv (3, 1, 1) dim -> 2 dim whose two halves become consecutive frames (t -> 2t),
                skipped for the video's first frame; then as upsample2d.
  downsample2d: zero pad right / bottom by 1, conv 3x3 stride 2.
  downsample3d: as downsample2d, then a stride-2 time conv (3, 1, 1) over [previous frame, frames],
                the first frame passing through unchanged.
  """

  def __init__(self, dim: int, mode: str, rngs: nnx.Rngs, *, dtype: Any, param_dtype: Any):
    kw = {"dtype": dtype, "param_dtype": param_dtype}
    self.dim, self.mode = dim, mode
    if mode in ("upsample2d", "upsample3d"):
      self.resample = Conv2d(dim, dim // 2, rngs, **kw)
    elif mode in ("downsample2d", "downsample3d"):
      self.resample = Conv2d(dim, dim, rngs, stride=2, padding=((0, 1), (0, 1)), **kw)
    else:
      raise ValueError(f"unknown resample mode {mode!r}")
    if mode == "upsample3d":
      self.time_conv = Conv3d(dim, 2 * dim, (3, 1, 1), rngs, **kw)
    elif mode == "downsample3d":
      self.time_conv = Conv3d(dim, dim, (3, 1, 1), rngs, time_stride=2, **kw)
    else:
      self.time_conv = None

  def init_cache(self, batch: int, height: int, width: int, dtype: Any) -> Cache | None:
    """Cache at this block's input resolution (height, width)."""
    if self.mode == "upsample3d":
      return _zeros(batch, CACHE_FRAMES, height, width, self.dim, dtype)
    if self.mode == "downsample3d":
      return _zeros(batch, 1, height // 2, width // 2, self.dim, dtype)
    return None

  def _time_upsample(self, x: Float[Array, "b t h w c"], cache: jax.Array) -> tuple[jax.Array, jax.Array]:
    y, cache = causal_conv(self.time_conv, x, cache)
    b, t, h, w, _ = y.shape
    y = y.reshape(b, t, h, w, 2, self.dim).transpose(0, 1, 4, 2, 3, 5)  # [first half, second half] in time
    return y.reshape(b, 2 * t, h, w, self.dim), cache

  def __call__(self, x: Float[Array, "b t h w c"], cache: Cache | None, first: bool
               ) -> tuple[Float[Array, "b t2 h2 w2 c2"], Cache | None]:
    if self.mode == "upsample3d":
      if first:  # frame 0 bypasses the time conv, whose history starts at frame 1
        head, rest = x[:, :1], x[:, 1:]
        if rest.shape[1]:
          rest, cache = self._time_upsample(rest, cache)
          x = jnp.concatenate([head, rest.astype(head.dtype)], axis=1)
      else:
        x, cache = self._time_upsample(x, cache)
    x = self.resample.upsample_2x(x) if self.mode.startswith("upsample") else self.resample(x)
    if self.mode == "downsample3d":
      if first:  # frame 0 passes; the stride-2 windows start at frame 0: (0, 1, 2), (2, 3, 4), ...
        body = self.time_conv(x) if x.shape[1] >= 3 else x[:, :0]
        new_cache = x[:, -1:]
        x = jnp.concatenate([x[:, :1], body.astype(x.dtype)], axis=1)
      else:
        new_cache = x[:, -1:]
        x = self.time_conv(jnp.concatenate([cache.astype(x.dtype), x], axis=1))
      cache = new_cache
    return x, cache


class UpBlock(nnx.Module):
  """Decoder stage: residual blocks, then an optional upsampler."""

  def __init__(self, in_dim: int, out_dim: int, num_blocks: int, upsample_mode: str | None, rngs: nnx.Rngs, *,
               dtype: Any, param_dtype: Any):
    kw = {"dtype": dtype, "param_dtype": param_dtype}
    self.resnets = nnx.List([ResidualBlock(in_dim if i == 0 else out_dim, out_dim, rngs, **kw)
                             for i in range(num_blocks)])
    self.upsampler = Resample(out_dim, upsample_mode, rngs, **kw) if upsample_mode else None

  def init_cache(self, batch: int, height: int, width: int, dtype: Any) -> Cache:
    cache: Cache = {"resnets": [r.init_cache(batch, height, width, dtype) for r in self.resnets]}
    if self.upsampler is not None:
      cache["upsampler"] = self.upsampler.init_cache(batch, height, width, dtype)
    return cache

  def __call__(self, x: Float[Array, "b t h w c"], cache: Cache, first: bool) -> tuple[jax.Array, Cache]:
    new: Cache = {"resnets": []}
    for resnet, resnet_cache in zip(self.resnets, cache["resnets"], strict=True):
      x, resnet_cache = resnet(x, resnet_cache)
      new["resnets"].append(resnet_cache)
    if self.upsampler is not None:
      x, new["upsampler"] = self.upsampler(x, cache["upsampler"], first)
    return x, new


class Decoder3d(nnx.Module):
  """conv_in -> middle -> up stages -> norm, SiLU, conv_out (to RGB)."""

  def __init__(self, config: VAEConfig, rngs: nnx.Rngs, *, dtype: Any, param_dtype: Any):
    kw = {"dtype": dtype, "param_dtype": param_dtype}
    mult = config.dim_mult
    dims = [config.base_dim * m for m in (mult[-1], *mult[::-1])]
    temporal_upsample = config.temporal_downsample[::-1]
    self.conv_in = Conv3d(config.z_dim, dims[0], (3, 3, 3), rngs, **kw)
    self.mid_block = MidBlock(dims[0], rngs, **kw)
    blocks = []
    for i, (in_dim, out_dim) in enumerate(itertools.pairwise(dims)):
      in_dim = in_dim // 2 if i > 0 else in_dim  # every upsampler halves the channels
      mode = None
      if i != len(mult) - 1:
        mode = "upsample3d" if temporal_upsample[i] else "upsample2d"
      blocks.append(UpBlock(in_dim, out_dim, config.num_res_blocks + 1, mode, rngs, **kw))
    self.up_blocks = nnx.List(blocks)
    self.norm_out = RMSNorm(dims[-1], rngs, param_dtype=param_dtype)
    self.conv_out = Conv3d(dims[-1], 3, (3, 3, 3), rngs, **kw)
    self.z_dim = config.z_dim

  def init_cache(self, batch: int, height: int, width: int, dtype: Any) -> Cache:
    """Zero cache for latents of `height` x `width`."""
    cache: Cache = {"conv_in": _zeros(batch, CACHE_FRAMES, height, width, self.z_dim, dtype),
                    "mid_block": self.mid_block.init_cache(batch, height, width, dtype), "up_blocks": []}
    for block in self.up_blocks:
      cache["up_blocks"].append(block.init_cache(batch, height, width, dtype))
      if block.upsampler is not None:
        height, width = 2 * height, 2 * width
    cache["conv_out"] = _zeros(batch, CACHE_FRAMES, height, width, self.conv_out.kernel.shape[3], dtype)
    return cache

  def __call__(self, x: Float[Array, "b t h w z"], cache: Cache, first: bool) -> tuple[jax.Array, Cache]:
    new: Cache = {"up_blocks": []}
    x, new["conv_in"] = causal_conv(self.conv_in, x, cache["conv_in"])
    x, new["mid_block"] = self.mid_block(x, cache["mid_block"])
    for block, block_cache in zip(self.up_blocks, cache["up_blocks"], strict=True):
      x, block_cache = block(x, block_cache, first)
      new["up_blocks"].append(block_cache)
    x, new["conv_out"] = causal_conv(self.conv_out, jax.nn.silu(self.norm_out(x)), cache["conv_out"])
    return x, new


class Encoder3d(nnx.Module):
  """conv_in -> stages of residual blocks and downsamplers (a flat list) -> middle -> norm, SiLU,
  conv_out (to mean and log-variance)."""

  def __init__(self, config: VAEConfig, rngs: nnx.Rngs, *, dtype: Any, param_dtype: Any):
    kw = {"dtype": dtype, "param_dtype": param_dtype}
    dims = [config.base_dim * m for m in (1, *config.dim_mult)]
    self.conv_in = Conv3d(3, dims[0], (3, 3, 3), rngs, **kw)
    blocks: list[nnx.Module] = []
    for i, (in_dim, out_dim) in enumerate(itertools.pairwise(dims)):
      for _ in range(config.num_res_blocks):
        blocks.append(ResidualBlock(in_dim, out_dim, rngs, **kw))
        in_dim = out_dim
      if i != len(config.dim_mult) - 1:
        mode = "downsample3d" if config.temporal_downsample[i] else "downsample2d"
        blocks.append(Resample(out_dim, mode, rngs, **kw))
    self.down_blocks = nnx.List(blocks)
    self.mid_block = MidBlock(dims[-1], rngs, **kw)
    self.norm_out = RMSNorm(dims[-1], rngs, param_dtype=param_dtype)
    self.conv_out = Conv3d(dims[-1], 2 * config.z_dim, (3, 3, 3), rngs, **kw)

  def init_cache(self, batch: int, height: int, width: int, dtype: Any) -> Cache:
    """Zero cache for video frames of `height` x `width`."""
    cache: Cache = {"conv_in": _zeros(batch, CACHE_FRAMES, height, width, 3, dtype), "down_blocks": []}
    for block in self.down_blocks:
      cache["down_blocks"].append(block.init_cache(batch, height, width, dtype))
      if isinstance(block, Resample):
        height, width = height // 2, width // 2
    cache["mid_block"] = self.mid_block.init_cache(batch, height, width, dtype)
    cache["conv_out"] = _zeros(batch, CACHE_FRAMES, height, width, self.conv_out.kernel.shape[3], dtype)
    return cache

  def __call__(self, x: Float[Array, "b t h w 3"], cache: Cache, first: bool) -> tuple[jax.Array, Cache]:
    new: Cache = {"down_blocks": []}
    x, new["conv_in"] = causal_conv(self.conv_in, x, cache["conv_in"])
    for block, block_cache in zip(self.down_blocks, cache["down_blocks"], strict=True):
      if isinstance(block, Resample):
        x, block_cache = block(x, block_cache, first)
      else:
        x, block_cache = block(x, block_cache)
      new["down_blocks"].append(block_cache)
    x, new["mid_block"] = self.mid_block(x, cache["mid_block"])
    x, new["conv_out"] = causal_conv(self.conv_out, jax.nn.silu(self.norm_out(x)), cache["conv_out"])
    return x, new


def compiler_options() -> dict[str, Any] | None:
  """XLA options for jitting VAE work: channel-last (NDHWC) 3-D convolutions on GPUs (see module docstring)."""
  return {"xla_gpu_force_conv_nhwc": True} if jax.default_backend() == "gpu" else None


class WanVAE(nnx.Module):
  """The Wan 2.1 VAE: encoder + quant conv, post-quant conv + decoder, latent (de)normalisation.

  Usage (streaming decode, one DiT chunk at a time):
    vae = WanVAE(VAEConfig.from_preset("wan2.1"), rngs=nnx.Rngs(0))   # or a converted checkpoint
    cache = vae.init_decode_cache(batch=1, latent_height=60, latent_width=104)
    video, cache = vae.decode_chunk(latents[:, 0:3], cache, first=True)    # 9 frames
    video, cache = vae.decode_chunk(latents[:, 3:6], cache, first=False)   # 12 frames
    frames = to_uint8(video)

  Under `jax.jit`, mark `first` static (`static_argnames="first"`): the two traces differ only in
  the temporal upsamplers' first-frame rule. `jit_decode_chunk(vae)` does that, with the cache
  donated and the GPU compiler options.
  """

  def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs):
    self.config = config
    dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
    kw = {"dtype": dtype, "param_dtype": param_dtype}
    z = config.z_dim
    # Parameters carry logical names, which need no mesh; shardings are attached at restore time.
    with nnx.use_eager_sharding(False):
      self.encoder = Encoder3d(config, rngs, **kw)
      self.quant_conv = Conv3d(2 * z, 2 * z, (1, 1, 1), rngs, **kw)
      self.post_quant_conv = Conv3d(z, z, (1, 1, 1), rngs, **kw)
      self.decoder = Decoder3d(config, rngs, **kw)

  def _stats(self) -> tuple[jax.Array, jax.Array]:
    return (jnp.asarray(self.config.latents_mean, jnp.float32), jnp.asarray(self.config.latents_std, jnp.float32))

  def init_decode_cache(self, batch: int, latent_height: int, latent_width: int) -> Cache:
    """The zero feature cache a video's first `decode_chunk` call starts from."""
    return self.decoder.init_cache(batch, latent_height, latent_width, jnp.dtype(self.config.dtype))

  def init_encode_cache(self, batch: int, height: int, width: int) -> Cache:
    """The zero feature cache a video's first `encode_chunk` call starts from."""
    self._check_frame_size(height, width)
    return self.encoder.init_cache(batch, height, width, jnp.dtype(self.config.dtype))

  def _check_frame_size(self, height: int, width: int) -> None:
    factor = self.config.spatial_compression
    if height % factor or width % factor:
      raise ValueError(f"video frames must be multiples of {factor} in height and width, got {height}x{width}")

  def decode_chunk(self, latents: Float[Array, "b t h w z"], cache: Cache, *, first: bool
                   ) -> tuple[Float[Array, "b frames hh ww 3"], Cache]:
    """Decodes consecutive normalised latent frames, carrying the feature cache.

    Args:
      latents: `[B, T, h, w, z_dim]`, normalised (as the DiT produces them).
      cache: from `init_decode_cache` for the first chunk, else the previous call's cache.
      first: whether `latents[:, 0]` is latent frame 0 of the video.

    Returns:
      video frames in [-1, 1], `[B, 1 + 4 (T - 1), 8h, 8w, 3]` when `first`, else `[B, 4T, ...]`,
      and the cache for the next chunk.
    """
    if latents.ndim != 5 or latents.shape[-1] != self.config.z_dim:
      raise ValueError(f"latents must be [B, T, h, w, {self.config.z_dim}], got {latents.shape}")
    expected = cache["conv_in"].shape  # [B, 2, h, w, z]
    if (latents.shape[0], *latents.shape[2:]) != (expected[0], *expected[2:]):
      raise ValueError(f"latents {latents.shape} do not match the cache, made for batch {expected[0]} and "
                       f"{expected[2]}x{expected[3]} latents")
    mean, std = self._stats()
    z = latents.astype(jnp.float32) * std + mean
    x = self.post_quant_conv(z)
    video, cache = self.decoder(x, cache, first)
    return jnp.clip(video, -1.0, 1.0), cache

  def decode(self, latents: Float[Array, "b t h w z"]) -> Float[Array, "b frames hh ww 3"]:
    """Decodes a whole latent video (1 + 4 (T - 1) frames), one latent frame at a time under a scan,
    so memory does not grow with T."""
    batch, frames, height, width, _ = latents.shape
    cache = self.init_decode_cache(batch, height, width)
    video, cache = self.decode_chunk(latents[:, :1], cache, first=True)
    if frames == 1:
      return video

    def step(carry: Cache, frame: jax.Array) -> tuple[Cache, jax.Array]:
      out, carry = self.decode_chunk(frame[:, None], carry, first=False)
      return carry, out

    _, rest = jax.lax.scan(step, cache, jnp.moveaxis(latents[:, 1:], 1, 0))  # [T-1, B, 4, H, W, 3]
    rest = jnp.moveaxis(rest, 0, 1).reshape(batch, -1, *rest.shape[3:])
    return jnp.concatenate([video, rest], axis=1)

  def posterior_chunk(self, video: Float[Array, "b t hh ww 3"], cache: Cache, *, first: bool
                      ) -> tuple[Float[Array, "b t2 h w z"], Float[Array, "b t2 h w z"], Cache]:
    """The encoder's Gaussian posterior of consecutive video frames, un-normalised: (mean, log-variance,
    cache). `first` chunks hold 1 + 4k frames (-> 1 + k latents), later chunks 4k frames (-> k latents)."""
    if video.ndim != 5 or video.shape[-1] != 3:
      raise ValueError(f"video must be [B, T, H, W, 3], got {video.shape}")
    self._check_frame_size(*video.shape[2:4])
    step = self.config.temporal_compression
    frames = video.shape[1]
    if (first and frames % step != 1 % step) or (not first and (frames % step or frames == 0)):
      rule = f"1 + {step}k frames" if first else f"a positive multiple of {step} frames"
      raise ValueError(f"a {'first' if first else 'later'} encode chunk needs {rule}, got {frames}")
    x, cache = self.encoder(video, cache, first)
    moments = self.quant_conv(x).astype(jnp.float32)
    return moments[..., :self.config.z_dim], moments[..., self.config.z_dim:], cache

  def encode_chunk(self, video: Float[Array, "b t hh ww 3"], cache: Cache, *, first: bool
                   ) -> tuple[Float[Array, "b t2 h w z"], Cache]:
    """Encodes consecutive video frames to normalised latent means (the posterior mode), carrying the
    feature cache; frame counts as `posterior_chunk`."""
    mean, _, cache = self.posterior_chunk(video, cache, first=first)
    return self.normalise(mean), cache

  def normalise(self, latents: Float[Array, "*b z"]) -> Float[Array, "*b z"]:
    """Raw latents -> the normalised latents the DiT consumes (per-channel statistics of the config)."""
    mean, std = self._stats()
    return (latents - mean) / std

  def posterior(self, video: Float[Array, "b t hh ww 3"]) -> tuple[Float[Array, "b t2 h w z"],
                                                                   Float[Array, "b t2 h w z"]]:
    """The posterior (mean, log-variance), un-normalised, of a whole video of 1 + 4k frames in [-1, 1]:
    frame 0 first, then 4 frames at a time under a scan (memory does not grow with k)."""
    batch, frames, height, width, _ = video.shape
    step = self.config.temporal_compression
    if frames % step != 1 % step:
      raise ValueError(f"encode needs 1 + {step}k frames, got {frames}")
    cache = self.init_encode_cache(batch, height, width)
    mean, logvar, cache = self.posterior_chunk(video[:, :1], cache, first=True)
    if frames == 1:
      return mean, logvar
    groups = video[:, 1:].reshape(batch, (frames - 1) // step, step, height, width, 3)

    def body(carry: Cache, group: jax.Array) -> tuple[Cache, tuple[jax.Array, jax.Array]]:
      group_mean, group_logvar, carry = self.posterior_chunk(group, carry, first=False)
      return carry, (group_mean[:, 0], group_logvar[:, 0])

    _, (rest_mean, rest_logvar) = jax.lax.scan(body, cache, jnp.moveaxis(groups, 1, 0))
    return (jnp.concatenate([mean, jnp.moveaxis(rest_mean, 0, 1)], axis=1),
            jnp.concatenate([logvar, jnp.moveaxis(rest_logvar, 0, 1)], axis=1))

  def encode(self, video: Float[Array, "b t hh ww 3"]) -> Float[Array, "b t2 h w z"]:
    """Encodes a whole video of 1 + 4k frames in [-1, 1] to 1 + k normalised latent means (the
    posterior mode)."""
    return self.normalise(self.posterior(video)[0])


def to_uint8(video: Float[Array, "*b t h w 3"]) -> UInt8[Array, "*b t h w 3"]:
  """[-1, 1] frames -> uint8 RGB, rounding as diffusers' video processor does."""
  return jnp.round((jnp.clip(video.astype(jnp.float32), -1.0, 1.0) + 1.0) * 127.5).astype(jnp.uint8)


def video_frames(latent_frames: int, *, first: bool, temporal_compression: int = 4) -> int:
  """Video frames that `latent_frames` latent frames decode to (9 for chunk 0 of 3, then 12)."""
  if latent_frames < 1:
    raise ValueError(f"latent_frames must be >= 1, got {latent_frames}")
  return 1 + temporal_compression * (latent_frames - 1) if first else temporal_compression * latent_frames


def count_parameters(module: nnx.Module) -> int:
  """Number of parameter scalars."""
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(module, nnx.Param))))


def decode_step(graphdef: nnx.GraphDef) -> Callable[..., tuple[jax.Array, Cache]]:
  """`decode_chunk` of the VAE `graphdef` describes, jitted over its state: `step(state, latents, cache, first)`,
  `first` static, the cache donated, with `compiler_options()`. Its `.lower` takes shapes alone (the memory
  plan's working set of the decode: `omnimem_jax.budget`)."""
  return jax.jit(lambda state, latents, cache, first: nnx.merge(graphdef, state).decode_chunk(latents, cache,
                                                                                              first=first),
                 static_argnames="first", donate_argnames="cache", compiler_options=compiler_options())


def jit_decode_chunk(vae: WanVAE) -> Callable[..., tuple[jax.Array, Cache]]:
  """`vae.decode_chunk` jitted once per (shape, first): `fn(latents, cache, first=...) -> (video, cache)`,
  with the cache donated and `compiler_options()` (`decode_step`)."""
  graphdef, state = nnx.split(vae)
  step = decode_step(graphdef)
  return lambda latents, cache, *, first: step(state, latents, cache, first)

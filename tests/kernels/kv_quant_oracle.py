"""Float64 NumPy oracle of the compact KV formats (`omnimem_kernels/kv_quant.py`), written independently.

Per block (the last two axes) a scale amax / 448 (fp8) or amax / 7 (int4); a code is the scaled value
rounded to the nearest e4m3 value (3 mantissa bits, subnormals below 2^-6, ties to even) or integer
(ties to even, clipped to [-7, 7]).
"""

import numpy as np

FP8_MAX = 448.0
INT4_MAX = 7


def round_e4m3(v: np.ndarray) -> np.ndarray:
  """v (|v| <= 448) rounded to float8_e4m3fn's grid, ties to even."""
  magnitude = np.abs(v)
  exponent = np.floor(np.log2(np.where(magnitude > 0, magnitude, 1.0)))
  spacing = 2.0 ** (np.maximum(exponent, -6) - 3)  # 3 mantissa bits; subnormals keep 2^-6's spacing
  return np.round(v / spacing) * spacing


def code_candidates(x: np.ndarray, fmt: str, slack: float = 1e-6) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(codes, codes, scale): the codes of x with its scaled values nudged towards and away from zero by
  a relative `slack`.

  Float32 arithmetic may put a value within rounding of a tie on either side; where the two code arrays
  differ either code is right, elsewhere they agree.
  """
  x = np.asarray(x, np.float64)
  top = FP8_MAX if fmt == "fp8" else INT4_MAX
  scale = np.abs(x).max(axis=(-2, -1)) / top
  scaled = x / np.where(scale > 0, scale, 1.0)[..., None, None]
  nudged = [scaled * (1 - slack), scaled * (1 + slack)]
  if fmt == "fp8":
    return round_e4m3(nudged[0]), round_e4m3(nudged[1]), scale
  return np.clip(np.round(nudged[0]), -INT4_MAX, INT4_MAX), np.clip(np.round(nudged[1]), -INT4_MAX, INT4_MAX), scale


def unpack_int4(data: np.ndarray) -> np.ndarray:
  """Codes -8..7 of packed uint8 data: byte j holds element 2j (low nibble) and 2j + 1 (high nibble)."""
  data = np.asarray(data, np.uint8)
  codes = np.empty((*data.shape[:-1], 2 * data.shape[-1]), np.int64)
  codes[..., 0::2] = (data % 16).astype(np.int64) - 8
  codes[..., 1::2] = (data // 16).astype(np.int64) - 8
  return codes


def decode_e4m3(data: np.ndarray) -> np.ndarray:
  """float64 values of float8_e4m3fn bytes: sign bit 7, exponent bits 6..3 (bias 7, 0: subnormal), mantissa
  bits 2..0; 0x7f and 0xff are NaN (e4m3fn has no infinities)."""
  data = np.asarray(data, np.uint8).astype(np.int64)
  sign = np.where(data >> 7, -1.0, 1.0)
  exponent, mantissa = (data >> 3) & 0xF, data & 0x7
  magnitude = np.where(exponent == 0, mantissa / 8.0 * 2.0 ** -6, (1 + mantissa / 8.0) * 2.0 ** (exponent - 7.0))
  return np.where((data & 0x7F) == 0x7F, np.nan, sign * magnitude)


def dequantize(data: np.ndarray, scale: np.ndarray, fmt: str) -> np.ndarray:
  """float64 values of stored blocks (uint8: fp8 bytes or packed int4 codes): codes times the block's scale."""
  codes = unpack_int4(data) if fmt == "int4" else decode_e4m3(data)
  return codes * np.asarray(scale, np.float64)[..., None, None]

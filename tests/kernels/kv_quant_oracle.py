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


def dequantize(data: np.ndarray, scale: np.ndarray, fmt: str) -> np.ndarray:
  """float64 values of stored blocks: codes times the block's scale."""
  codes = unpack_int4(data) if fmt == "int4" else np.asarray(data).astype(np.float64)
  return codes * np.asarray(scale, np.float64)[..., None, None]

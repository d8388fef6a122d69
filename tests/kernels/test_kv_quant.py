"""The compact KV formats (`omnimem_kernels/kv_quant.py`) against the float64 NumPy oracle."""

import jax.numpy as jnp
import numpy as np
import pytest

from omnimem_kernels import kv_quant
from tests.kernels import kv_quant_oracle


def random_blocks(seed: int, dtype) -> np.ndarray:
  """[2, 3, 5, 4, 8] blocks of mixed magnitudes: a zero block, an outlier block, an all-negative block."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((2, 3, 5, 4, 8)) * 10.0 ** rng.uniform(-3, 3, (2, 3, 5, 1, 1))
  x[0, 0, 0] = 0.0
  x[0, 1, 2, 1, 3] = 1e3 * np.abs(x[0, 1, 2]).max()  # one outlier: every other value is tiny next to it
  x[1, 2, 4] = -np.abs(x[1, 2, 4])
  return np.asarray(jnp.asarray(x, dtype), np.float64)  # the values the quantiser sees


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("fmt", ["fp8", "int4"])
@pytest.mark.parametrize("seed", [0, 1])
def test_round_trip_matches_numpy_oracle(fmt, dtype, seed):
  x = random_blocks(seed, dtype)
  data, scale = kv_quant.quantize(jnp.asarray(x, dtype), fmt)
  assert data.dtype == kv_quant.storage_dtype(fmt) and scale.dtype == jnp.float32
  assert data.shape == (*x.shape[:-1], kv_quant.stored_head_dim(x.shape[-1], fmt)) and scale.shape == x.shape[:-2]
  low, high, expected_scale = kv_quant_oracle.code_candidates(x, fmt)
  np.testing.assert_allclose(np.asarray(scale), expected_scale, rtol=2e-7, atol=0)
  codes = kv_quant_oracle.dequantize(np.asarray(data), np.ones(scale.shape), fmt)  # NumPy's unpacking
  assert ((codes == low) | (codes == high)).all()
  assert (low != high).mean() < 1e-2  # ties are rare (bf16 inputs, with fewer bits, hit more)
  values = np.asarray(kv_quant.dequantize(data, scale, fmt))
  assert values.dtype == np.float32 and np.isfinite(values).all()
  np.testing.assert_allclose(values, codes * np.asarray(scale, np.float64)[..., None, None], rtol=1e-6, atol=0)
  assert np.asarray(scale)[0, 0, 0] == 0 and not values[0, 0, 0].any()  # the zero block


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("fmt", ["fp8", "int4"])
def test_error_bounds(fmt, dtype):
  """fp8: half a spacing of e4m3 (2^-4 relative, 2^-10 of the scale among subnormals); int4: half the scale."""
  x = random_blocks(2, dtype)
  data, scale = kv_quant.quantize(jnp.asarray(x, dtype), fmt)
  error = np.abs(np.asarray(kv_quant.dequantize(data, scale, fmt), np.float64) - x)
  scale = np.asarray(scale, np.float64)[..., None, None]
  amax = np.abs(x).max(axis=(-2, -1), keepdims=True)
  bound = 2.0 ** -4 * np.abs(x) + 2.0 ** -10 * scale if fmt == "fp8" else scale / 2
  assert (error <= bound + 1e-6 * amax).all()
  assert (error <= amax / (16 if fmt == "fp8" else 14) + 1e-6 * amax).all()


def test_int4_packing_layout():
  rng = np.random.default_rng(3)
  codes = rng.integers(-7, 8, (3, 4, 6))
  codes[:, 0, 0] = 7  # amax 7 in every block: scale 1, the values are the codes
  data, scale = kv_quant.quantize(jnp.asarray(codes, jnp.float32), "int4")
  assert (np.asarray(scale) == 1).all()
  expected = np.zeros((3, 4, 3), np.uint8)
  for index in np.ndindex(expected.shape):
    low, high = codes[index[:-1]][2 * index[-1]: 2 * index[-1] + 2]
    expected[index] = (low + 8) + 16 * (high + 8)
  np.testing.assert_array_equal(np.asarray(data), expected)
  packed, _ = kv_quant.quantize(jnp.asarray([[[-7.0, 7.0, 0.0, -1.0]]]), "int4")
  np.testing.assert_array_equal(np.asarray(packed), [[[0xF1, 0x78]]])
  np.testing.assert_array_equal(np.asarray(kv_quant.decode(data, "int4", jnp.float32)), codes)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_bf16_format_is_a_cast(dtype):
  x = jnp.asarray(random_blocks(4, dtype), dtype)
  data, scale = kv_quant.quantize(x, "bf16")
  assert scale is None and data.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(data), np.asarray(x.astype(jnp.bfloat16)))
  np.testing.assert_array_equal(np.asarray(kv_quant.dequantize(data, None, "bf16")), np.asarray(data, np.float32))


def test_helpers():
  assert [kv_quant.storage_dtype(fmt) for fmt in kv_quant.FORMATS] == [jnp.bfloat16, jnp.uint8, jnp.uint8]
  assert [kv_quant.stored_head_dim(128, fmt) for fmt in kv_quant.FORMATS] == [128, 128, 64]
  for fmt in kv_quant.FORMATS:
    stored = jnp.zeros((2, kv_quant.stored_head_dim(128, fmt)), kv_quant.storage_dtype(fmt))
    assert kv_quant.format_of(stored, 128) == fmt
  assert kv_quant.format_of(jnp.zeros((2, 128), jnp.float32), 128) == "bf16"
  with pytest.raises(ValueError, match="no KV format stores int8"):
    kv_quant.format_of(jnp.zeros((2, 128), jnp.int8), 128)
  with pytest.raises(ValueError, match="no KV format stores uint8 rows of 32 for head_dim 128"):
    kv_quant.format_of(jnp.zeros((2, 32), jnp.uint8), 128)


def test_bad_inputs_raise_clear_errors():
  x = jnp.ones((2, 4, 6))
  with pytest.raises(ValueError, match=r"unknown KV format 'int8'; known: \('bf16', 'fp8', 'int4'\)"):
    kv_quant.quantize(x, "int8")
  with pytest.raises(ValueError, match="head_dim, which must be even; got 5"):
    kv_quant.quantize(x[..., :5], "int4")
  with pytest.raises(ValueError, match="must be even; got 7"):
    kv_quant.stored_head_dim(7, "int4")
  data, scale = kv_quant.quantize(x, "fp8")
  with pytest.raises(ValueError, match="format 'fp8' needs a scale"):
    kv_quant.dequantize(data, None, "fp8")
  with pytest.raises(ValueError, match="format 'bf16' takes no scale"):
    kv_quant.dequantize(x, scale, "bf16")

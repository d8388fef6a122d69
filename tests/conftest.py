"""pytest setup: 4 fake CPU devices before JAX initialises; `gpu` / `tpu` markers skip without hardware.

Tests not marked `gpu` or `tpu` check float32 numerics against float64 oracles and references at
CPU precision, so they run with float32 matmuls at full precision: on GPUs JAX's default would use
TF32 (about 1e-3 relative error). Tests of the accelerator kernels keep the default the library runs
with.
"""

import jax
import pytest

jax.config.update("jax_num_cpu_devices", 4)


def pytest_collection_modifyitems(config, items):
  del config
  platform = jax.default_backend()
  for item in items:
    for marker in ("gpu", "tpu"):
      if marker in item.keywords and platform != marker:
        item.add_marker(pytest.mark.skip(reason=f"needs a {marker.upper()} (running on {platform})"))


@pytest.fixture(autouse=True)
def _float32_matmul_precision(request):
  """Full float32 matmul precision for the tests that mean it (all but the accelerator-kernel tests)."""
  if "gpu" in request.keywords or "tpu" in request.keywords:
    yield
    return
  with jax.default_matmul_precision("highest"):
    yield

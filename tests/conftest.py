"""pytest setup: 4 fake CPU devices before JAX initialises; `gpu` / `tpu` markers skip without hardware.

Tests not marked `gpu` or `tpu` check float32 numerics against float64 oracles and references at
CPU precision, so they run with float32 matmuls at full precision: on GPUs JAX's default would use
TF32 (about 1e-3 relative error). Tests of the accelerator kernels keep the default the library runs
with. The setting is a function-scoped fixture: a module-scoped fixture that computes is set up
before it and sets the precision itself (tests/test_vae.py's whole decode).

Tests that need several devices (meshes) call `tests.configs.require_devices`: CI has the 4 fake CPU
devices made here, a machine with one accelerator has one.

The session shares one persistent compilation cache (a temporary folder, removed at the end) with the
command-line tools the tests start: the same tiny programs compiled again by another test or process
load in milliseconds instead of seconds. XLA compiles without LLVM's optimisations: the tests'
programs are tiny, so compiling them dominated the suite's time (a tiny rollout: 13 s to compile at the
default level, 2 s at level 0), and the level changes no floating-point semantics.
"""

import os
import shutil
import tempfile

import jax
import pytest

from omnimem_jax import environment

jax.config.update("jax_num_cpu_devices", 4)

environment.compile_without_llvm_optimisations()  # inherited by the tools the tests start
_COMPILATION_CACHE = tempfile.mkdtemp(prefix="omnimem-jax-test-cache-")
os.environ["JAX_COMPILATION_CACHE_DIR"] = _COMPILATION_CACHE  # inherited by the tools the tests start
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
jax.config.update("jax_compilation_cache_dir", _COMPILATION_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def pytest_sessionfinish(session, exitstatus):
  del session, exitstatus
  shutil.rmtree(_COMPILATION_CACHE, ignore_errors=True)


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

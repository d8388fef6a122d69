"""The test harness itself: CPU runs see the 4 fake devices that sharding tests rely on; compilation is
fast and cached (conftest.py)."""

import os

import jax

from omnimem_jax import environment


def test_cpu_runs_have_four_devices():
  if jax.default_backend() == "cpu":
    assert jax.device_count() == 4


def test_fast_compilation_flag_is_added_once_and_never_overrides_a_level(monkeypatch):
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  environment.compile_without_llvm_optimisations()
  assert os.environ["XLA_FLAGS"] == "--xla_backend_optimization_level=0"
  environment.compile_without_llvm_optimisations()
  assert os.environ["XLA_FLAGS"] == "--xla_backend_optimization_level=0"
  monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/dev/null")
  environment.compile_without_llvm_optimisations()
  assert os.environ["XLA_FLAGS"] == "--xla_dump_to=/dev/null --xla_backend_optimization_level=0"
  monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=3")
  environment.compile_without_llvm_optimisations()
  assert os.environ["XLA_FLAGS"] == "--xla_backend_optimization_level=3"


def test_the_tests_compile_fast_and_share_a_compilation_cache():
  assert "--xla_backend_optimization_level=0" in os.environ["XLA_FLAGS"]
  assert jax.config.jax_compilation_cache_dir == os.environ["JAX_COMPILATION_CACHE_DIR"]

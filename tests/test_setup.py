"""The test harness itself: CPU runs see the 4 fake devices that sharding tests rely on."""

import jax


def test_cpu_runs_have_four_devices():
  if jax.default_backend() == "cpu":
    assert jax.device_count() == 4

"""pytest setup: 4 fake CPU devices before JAX initialises; `gpu` / `tpu` markers skip without hardware."""

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

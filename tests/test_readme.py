"""The README's library examples run as written."""

import pathlib
import re

import numpy as np


def readme_python_blocks():
  readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
  blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
  assert len(blocks) >= 2, "README.md lacks its python examples"
  return blocks


def run_block(block):
  namespace: dict = {}
  exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102
  return namespace


def test_readme_attention_example_runs():
  namespace = run_block(readme_python_blocks()[0])
  out = np.asarray(namespace["out"])
  assert out.shape == namespace["shape"] and np.isfinite(out).all() and np.abs(out).sum() > 0
  np.testing.assert_array_equal(namespace["tables"].full[:5], np.arange(5))


def test_readme_dit_example_runs():
  namespace = run_block(readme_python_blocks()[1])
  velocity = np.asarray(namespace["velocity"])
  assert velocity.shape == namespace["latents"].shape and np.isfinite(velocity).all()
  np.testing.assert_array_equal(namespace["kv"].slot_chunk[:4], [0, 1, 2, -1])

"""The README's library example runs as written."""

import pathlib
import re

import numpy as np


def test_readme_python_example_runs():
  readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
  blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
  assert blocks, "README.md has no python example"
  namespace: dict = {}
  exec(compile(blocks[0], "README.md", "exec"), namespace)  # noqa: S102
  out = np.asarray(namespace["out"])
  assert out.shape == namespace["shape"] and np.isfinite(out).all() and np.abs(out).sum() > 0
  np.testing.assert_array_equal(namespace["slot_chunk"][:5], np.arange(5))

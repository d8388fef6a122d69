"""The command-line convention of the scripts in experiments/: bad input, flag errors included, is one
line `error: ...` on stderr and exit code 2, before any heavy work.

  app.run(main, flags_parser=cli.parse_flags)   # flag errors -> one line, exit 2
  cli.fail(f"--output={path} already exists")   # any other bad input
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import NoReturn

from absl import flags, logging


def fail(message: object) -> NoReturn:
  """Prints `error: message` on one line (whitespace collapsed) to stderr and exits with code 2.

  That line is the last word: errors that abandoned work raises while the process shuts down (Orbax's
  reads of a damaged checkpoint, finishing in their threads) are not printed after it.
  """
  print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
  sys.unraisablehook = lambda unraisable: None
  sys.exit(2)


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's flag parser for `app.run(..., flags_parser=...)`: flag errors go through `fail`; logging
  stays at WARNING unless --verbosity is given (keeps JAX's backend-probing INFO lines out)."""
  try:
    argv = flags.FLAGS(argv)
  except flags.Error as err:
    fail(err)
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  return argv

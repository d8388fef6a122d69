"""Atomic output files: every file the project writes (mp4, JSON, npy, benchmark results) is written
under a hidden temporary name beside its target and renamed into place, so an interrupted write
never leaves a half-written file and never damages the one that was there."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def partial_path(path: str | os.PathLike) -> Path:
  """The hidden temporary sibling a write of `path` goes to before its rename (unique per process)."""
  path = Path(path)
  return path.with_name(f".{path.stem}.partial-{os.getpid()}{path.suffix}")


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
  """Yields a temporary path beside `path`; on normal exit it replaces `path`, on error it is removed.

  For writers that open the file themselves (an mp4 encoder, `np.save` by name).
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  partial = partial_path(path)
  try:
    yield partial
    os.replace(partial, path)
  finally:
    partial.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
  """Calls `write(file)` on a temporary binary file beside `path`, then renames it to `path`."""
  path = Path(path)
  with atomic_file(path) as partial, open(partial, "wb") as file:
    write(file)
  return path


def write_json(path: str | os.PathLike, record: Any) -> Path:
  """`record` as indented JSON (with a final newline), written atomically."""
  text = json.dumps(record, indent=2) + "\n"
  return atomic_write(path, lambda file: file.write(text.encode()))


def temporary_directory_beside(path: str | os.PathLike) -> Path:
  """A fresh hidden directory next to `path` (same file system, so it can be renamed into place).

  Made by `mkdir`, so it gets the permissions any new directory gets (the umask applies): renamed
  into place it is a normal directory, not an owner-only one as `tempfile.mkdtemp` would make.
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  while True:
    staging = path.with_name(f".{path.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
    try:
      staging.mkdir()
      return staging
    except FileExistsError:  # another writer drew the same name: draw again
      continue


def check_writable(path: str | os.PathLike) -> None:
  """Raises an OSError saying why `path` could not be created or written, before any work: its nearest
  existing ancestor (itself, if it exists) must be a directory this process may write into."""
  ancestor = Path(path).absolute()
  while not ancestor.exists():
    ancestor = ancestor.parent
  if not ancestor.is_dir():
    raise NotADirectoryError(f"cannot write {path}: {ancestor} is a file, not a directory")
  if not os.access(ancestor, os.W_OK | os.X_OK):
    raise PermissionError(f"cannot write {path}: no write permission in {ancestor}")

"""mp4 output through imageio-ffmpeg (`pip install 'omnimem-jax[video]'`), H.264 yuv420p at 16 fps.

Frames go to a temporary name in the target directory and are renamed into place when the file is
complete (`omnimem_jax.io.atomic_file`), so an interrupted run never leaves a truncated video under the
final name. `Mp4Writer` takes frames chunk by chunk as a streaming rollout decodes them; `write_mp4`
writes a whole video.

ffmpeg starts with the first frames, without a `preexec_fn` (imageio-ffmpeg's
IMAGEIO_FFMPEG_NO_PREVENT_SIGINT), so `subprocess` spawns it without running Python's fork hooks: safe
once JAX's threads exist, and without JAX's `os.fork()` deadlock warning. ffmpeg then shares the
terminal's Ctrl-C, which aborts the partial file all the same.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
from jaxtyping import UInt8

from omnimem_jax import io

FPS = 16  # Wan2.1's frame rate


def _imageio_ffmpeg() -> Any:
  try:
    import imageio_ffmpeg  # noqa: PLC0415 (optional dependency)
  except ImportError as err:
    raise ImportError("writing mp4 files needs imageio-ffmpeg: pip install 'omnimem-jax[video]'") from err
  return imageio_ffmpeg


class Mp4Writer:
  """Streams uint8 RGB frames `[T, H, W, 3]` into an mp4 file.

  Usage:
    with Mp4Writer("out.mp4", height=480, width=832) as writer:
      for chunk in chunks:
        writer.write(frames_of(chunk))   # [T, 480, 832, 3] uint8
  The file appears under its name when the block exits without an exception.
  """

  def __init__(self, path: str | os.PathLike, *, height: int, width: int, fps: float = FPS, quality: float = 8.0):
    if height % 2 or width % 2 or height < 2 or width < 2:
      raise ValueError(f"H.264 yuv420p needs even frame sizes, got {height}x{width}")
    if fps <= 0:
      raise ValueError(f"fps must be positive, got {fps}")
    self.path = Path(path)
    if self.path.suffix.lower() != ".mp4":
      raise ValueError(f"expected an .mp4 path, got {self.path}")
    self.height, self.width, self.frames = height, width, 0
    self._ffmpeg, self._fps, self._quality = _imageio_ffmpeg(), fps, quality
    self._gen: Any = None  # the imageio-ffmpeg writer, from the first frames on
    self._target: contextlib.ExitStack | None = None  # its `io.atomic_file`

  def _start(self) -> None:
    """Starts ffmpeg on the temporary file (see the module docstring on how it is spawned)."""
    os.environ.setdefault("IMAGEIO_FFMPEG_NO_PREVENT_SIGINT", "1")
    with contextlib.ExitStack() as stack:  # a failed start removes the partial file
      partial = stack.enter_context(io.atomic_file(self.path))
      self._gen = self._ffmpeg.write_frames(str(partial), (self.width, self.height), fps=self._fps,
                                            quality=self._quality, macro_block_size=1, pix_fmt_in="rgb24",
                                            pix_fmt_out="yuv420p")
      self._gen.send(None)
      self._target = stack.pop_all()  # closed normally: renamed into place; exited with an error: removed

  def write(self, frames: UInt8[np.ndarray, "t h w 3"]) -> None:
    """Appends frames (uint8, `[T, H, W, 3]` at the writer's size, or one `[H, W, 3]` frame)."""
    frames = np.asarray(frames)
    if frames.ndim == 3:
      frames = frames[None]
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != (self.height, self.width, 3):
      raise ValueError(f"frames must be uint8 [T, {self.height}, {self.width}, 3], got {frames.dtype} "
                       f"{frames.shape} (convert with omnimem_jax.model.vae.to_uint8)")
    if self._gen is None:
      self._start()
    for frame in frames:
      self._gen.send(np.ascontiguousarray(frame))
    self.frames += len(frames)

  def close(self) -> Path:
    """Finishes the file and renames it into place; returns its path."""
    if self.frames == 0:
      self.abort()
      raise ValueError(f"no frames were written to {self.path}")
    self._gen.close()
    self._target.close()
    return self.path

  def abort(self) -> None:
    """Stops writing and removes the partial file (nothing to do before the first frames)."""
    if self._gen is None:
      return
    self._gen.close()
    aborted = RuntimeError(f"writing {self.path} was aborted")
    self._target.__exit__(RuntimeError, aborted, None)  # the error exit of `io.atomic_file`: no rename
    self._gen = None

  def __enter__(self) -> Mp4Writer:
    return self

  def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
               tb: TracebackType | None) -> None:
    if exc_type is None:
      self.close()
    else:
      self.abort()


def write_mp4(path: str | os.PathLike, frames: UInt8[np.ndarray, "t h w 3"], fps: float = FPS) -> Path:
  """Writes uint8 RGB frames `[T, H, W, 3]` to an mp4 at `fps` (default 16); returns the path."""
  frames = np.asarray(frames)
  if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
    raise ValueError(f"frames must be a non-empty uint8 [T, H, W, 3] array, got {frames.dtype} {frames.shape}")
  with Mp4Writer(path, height=frames.shape[1], width=frames.shape[2], fps=fps) as writer:
    writer.write(frames)
  return Path(path)

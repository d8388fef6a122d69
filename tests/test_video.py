"""mp4 writing: round trip through imageio-ffmpeg, atomic rename, bad input, missing extra."""

import sys

import numpy as np
import pytest

from omnimem_jax import video


def _frames(count: int, height: int = 32, width: int = 48) -> np.ndarray:
  ramp = np.linspace(0, 255, width, dtype=np.float32)[None, None, :, None]
  frames = np.broadcast_to(ramp, (count, height, width, 3)).copy()
  frames[..., 1] = np.arange(count, dtype=np.float32)[:, None, None] * 20
  return frames.astype(np.uint8)


def test_write_mp4_round_trip(tmp_path):
  ffmpeg = pytest.importorskip("imageio_ffmpeg")
  path = video.write_mp4(tmp_path / "clip.mp4", _frames(9))
  assert path.is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]
  reader = ffmpeg.read_frames(str(path))
  meta = next(reader)
  assert meta["fps"] == 16 and tuple(meta["size"]) == (48, 32)
  decoded = np.stack([np.frombuffer(f, np.uint8).reshape(32, 48, 3) for f in reader])
  assert decoded.shape == (9, 32, 48, 3)
  assert np.abs(decoded.astype(int) - _frames(9).astype(int)).mean() < 6  # lossy codec


def test_streaming_writer_and_abort(tmp_path):
  ffmpeg = pytest.importorskip("imageio_ffmpeg")
  with video.Mp4Writer(tmp_path / "stream.mp4", height=32, width=48) as writer:
    writer.write(_frames(9))
    writer.write(_frames(12))
  assert writer.frames == 21
  reader = ffmpeg.read_frames(str(tmp_path / "stream.mp4"))
  next(reader)
  assert sum(1 for _ in reader) == 21
  with pytest.raises(RuntimeError), video.Mp4Writer(tmp_path / "broken.mp4", height=32, width=48) as writer:
    writer.write(_frames(3))
    raise RuntimeError("the rollout failed")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["stream.mp4"]


def test_bad_frames(tmp_path):
  pytest.importorskip("imageio_ffmpeg")
  with pytest.raises(ValueError, match="uint8"):
    video.write_mp4(tmp_path / "a.mp4", _frames(2).astype(np.float32))
  with pytest.raises(ValueError, match="even"):
    video.write_mp4(tmp_path / "a.mp4", _frames(2, height=31))
  with pytest.raises(ValueError, match=r"\.mp4"):
    video.write_mp4(tmp_path / "a.avi", _frames(2))
  writer = video.Mp4Writer(tmp_path / "b.mp4", height=32, width=48)
  with pytest.raises(ValueError, match="32, 48"):
    writer.write(_frames(2, width=64))
  writer.abort()
  assert not list(tmp_path.iterdir())


def test_missing_extra_is_explained(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)
  with pytest.raises(ImportError, match=r"omnimem-jax\[video\]"):
    video.write_mp4(tmp_path / "a.mp4", _frames(2))


def test_abort_and_no_frames_leave_the_existing_file(tmp_path):
  pytest.importorskip("imageio_ffmpeg")
  (tmp_path / "kept.mp4").write_bytes(b"previous video")
  writer = video.Mp4Writer(tmp_path / "kept.mp4", height=32, width=48)
  writer.write(_frames(2))
  writer.abort()
  with pytest.raises(ValueError, match="no frames"), video.Mp4Writer(tmp_path / "empty.mp4", height=32, width=48):
    pass
  assert [p.name for p in tmp_path.iterdir()] == ["kept.mp4"] and (tmp_path / "kept.mp4").read_bytes() == b"previous video"

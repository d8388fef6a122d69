"""Revisit-consistency and retrieval metrics of the long-memory benchmark (experiments/eval_memory.py).

- `psnr`, `ssim`: frame similarity of latents [C, H, W] with an explicit data range (the reference
  video's max - min), so scores are comparable across modes on the same world.
- `revisit_scores`: per revisited frame (a frame whose view was shown before, see
  `data.synthetic.revisit_schedule`), PSNR / SSIM against a reference frame, grouped by the revisit
  distance (frames since the view's first appearance).
- `retrieval_recall`: the share of the dense oracle's attention mass (softmax over every selection
  candidate's full-resolution keys) that the top-k selected blocks hold, per layer, measured on a
  teacher-forcing pass of the omnimem model (`training.teacher_forcing_forward(..., with_recall=True)`),
  with the chance level of a random selection of the same size.
- `picks_unchanged`: the share of one rollout's top-k picks that another rollout (the same seed, e.g. a
  compact KV store against the bf16 one) picked too, for the same chunk, model call, layer, head and
  query group.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np


def psnr(actual: np.ndarray, reference: np.ndarray, data_range: float) -> float:
  """10 log10(range^2 / MSE) in dB (inf for identical inputs)."""
  mse = float(np.mean((np.asarray(actual, np.float64) - np.asarray(reference, np.float64)) ** 2))
  return float("inf") if mse == 0 else 10.0 * np.log10(data_range ** 2 / mse)


def _gaussian_filter(image: np.ndarray, sigma: float, radius: int) -> np.ndarray:
  """Separable Gaussian blur of [..., H, W] with reflected borders (same size)."""
  offsets = np.arange(-radius, radius + 1)
  kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
  kernel /= kernel.sum()
  for axis in (-2, -1):
    padded = np.pad(image, [(0, 0)] * (image.ndim - 2) + [(radius, radius) if a == axis % image.ndim else (0, 0)
                                                          for a in range(image.ndim - 2, image.ndim)], mode="reflect")
    image = sum(w * np.take(padded, np.arange(i, i + image.shape[axis]), axis=axis) for i, w in enumerate(kernel))
  return image


def ssim(actual: np.ndarray, reference: np.ndarray, data_range: float, sigma: float = 1.5) -> float:
  """Mean SSIM (Wang et al. 2004; Gaussian window sigma 1.5, K1 0.01, K2 0.03) over the channels and
  pixels of [C, H, W] latents; windows are truncated at radius 3 with reflected borders (the frames are
  only 8 x 16)."""
  x, y = np.asarray(actual, np.float64), np.asarray(reference, np.float64)
  blur = lambda z: _gaussian_filter(z, sigma, 3)  # noqa: E731
  mu_x, mu_y = blur(x), blur(y)
  var_x, var_y = blur(x * x) - mu_x ** 2, blur(y * y) - mu_y ** 2
  cov = blur(x * y) - mu_x * mu_y
  c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
  score = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
  return float(score.mean())


def revisit_scores(video: np.ndarray, reference: np.ndarray, source: np.ndarray, frames: np.ndarray,
                   data_range: float) -> dict[int, dict[str, list[float]]]:
  """PSNR / SSIM of `video`'s frames (listed in `frames`, [C, F, H, W]) against `reference[:, source[t]]`,
  grouped by revisit distance t - source[t]. Frames without a source (first appearances) are skipped."""
  grouped: dict[int, dict[str, list[float]]] = defaultdict(lambda: {"psnr": [], "ssim": []})
  for frame in frames:
    if source[frame] < 0:
      continue
    a, b = video[:, frame], reference[:, source[frame]]
    distance = int(frame - source[frame])
    grouped[distance]["psnr"].append(psnr(a, b, data_range))
    grouped[distance]["ssim"].append(ssim(a, b, data_range))
  return dict(grouped)


def summarise(scores: list[dict[int, dict[str, list[float]]]], min_distance: int = 0) -> dict[str, Any]:
  """Means over several videos' `revisit_scores`, per distance and over every distance >= min_distance."""
  by_distance: dict[int, dict[str, list[float]]] = defaultdict(lambda: {"psnr": [], "ssim": []})
  for video_scores in scores:
    for distance, values in video_scores.items():
      by_distance[distance]["psnr"] += values["psnr"]
      by_distance[distance]["ssim"] += values["ssim"]
  far = {"psnr": [], "ssim": []}
  for distance, values in by_distance.items():
    if distance >= min_distance:
      far["psnr"] += values["psnr"]
      far["ssim"] += values["ssim"]
  mean = lambda values: float(np.mean(values)) if values else None  # noqa: E731
  return {
      "psnr_db": mean(far["psnr"]), "ssim": mean(far["ssim"]), "frames": len(far["psnr"]),
      "min_distance_frames": min_distance,
      "by_distance": {str(d): {"psnr_db": mean(v["psnr"]), "ssim": mean(v["ssim"]), "frames": len(v["psnr"])}
                      for d, v in sorted(by_distance.items())},
  }


def chance_recall(candidates: np.ndarray, num_chunks: int, exclude_window_chunks: int, blocks_per_chunk: int,
                  top_k: int) -> float:
  """Expected recall of picking top_k candidate blocks at random under a uniform oracle, averaged over
  the query chunks that `retrieval_recall` averages over (chunks >= exclude_window_chunks, both halves)."""
  index = np.arange(2 * num_chunks) % num_chunks
  rows = [r for r in range(2 * num_chunks) if index[r] >= exclude_window_chunks]
  return float(np.mean([min(1.0, top_k / (candidates[r].sum() * blocks_per_chunk)) for r in rows]))


def revisit_picks(histograms: np.ndarray, visits: np.ndarray, min_distance: int) -> dict[str, Any] | None:
  """How often retrieval picks the earlier visit of the place in view, against chance.

  Args:
    histograms: [chunks, layers, bins] selected blocks by distance in chunks (bin d: d chunks back), as the
      rollout records them (`Rollout` retrieval statistics); bins must reach the longest distance.
    visits: [chunks, chunks] bool, (c, c') true when chunk c' is an earlier visit of chunk c's place
      (`data.synthetic.earlier_visits`).
    min_distance: picks nearer than this many chunks (the sliding window) are left out.

  Returns None when no chunk of the run has an earlier visit beyond `min_distance`; else the share of
  picks (at `min_distance` or more, in chunks that have an earlier visit there) from an earlier visit,
  the chance share (picks uniform over the candidate chunks at `min_distance` or more), both per layer
  too, and the number of chunks and picks measured.
  """
  histograms = np.asarray(histograms, np.int64)
  chunks, layers, bins = histograms.shape
  if visits.shape != (chunks, chunks):
    raise ValueError(f"visits must be [{chunks}, {chunks}] for {chunks} chunks, got {list(visits.shape)}")
  hits, picked, chance = np.zeros(layers), np.zeros(layers), np.zeros(layers)
  measured = 0
  for chunk in range(chunks):
    distances = np.arange(min_distance, chunk + 1)
    earlier = visits[chunk, chunk - distances]
    if not earlier.any():
      continue
    if chunk >= bins:
      raise ValueError(f"histograms have {bins} bins; chunk {chunk} needs one per distance up to {chunk}")
    counts = histograms[chunk][:, distances]  # [layers, candidate distances]
    measured += 1
    hits += counts[:, earlier].sum(axis=1)
    picked += counts.sum(axis=1)
    chance += counts.sum(axis=1) * earlier.mean()
  if not measured or not picked.sum():
    return None
  per_layer = [{"layer": layer, "fraction_from_earlier_visit": float(hit / pick) if pick else None,
                "chance": float(share / pick) if pick else None}
               for layer, (hit, pick, share) in enumerate(zip(hits, picked, chance, strict=True))]
  return {"fraction_from_earlier_visit": float(hits.sum() / picked.sum()), "chance": float(chance.sum() / picked.sum()),
          "per_layer": per_layer, "chunks_measured": measured, "picks": int(picked.sum()), "min_distance": min_distance}


def picks_unchanged(reference: np.ndarray, other: np.ndarray) -> dict[str, Any]:
  """The share of `reference`'s picks that `other` picked too, compared as sets per query group.

  Args:
    reference, other: selected block ids of two rollouts of the same model and seed,
      [chunks, calls, layers, batch, heads, groups, top_k] (`rollout.Retrieval.ids`; -1 pads).

  Returns the share over all picks, per layer and per chunk (how it drifts along the video), and the
  number of picks compared.
  """
  if reference.shape != other.shape or reference.ndim != 7:
    raise ValueError(f"ids must both be [chunks, calls, layers, batch, heads, groups, top_k], got "
                     f"{list(reference.shape)} and {list(other.shape)}")
  chunks, layers = reference.shape[0], reference.shape[2]
  kept, picked = np.zeros((chunks, layers), np.int64), np.zeros((chunks, layers), np.int64)
  for chunk in range(chunks):  # one chunk at a time: the pairwise comparison is top_k x top_k per group
    ref, oth = reference[chunk], other[chunk]
    valid = ref >= 0
    found = (ref[..., :, None] == oth[..., None, :]).any(axis=-1) & valid
    kept[chunk] = found.sum(axis=(0, 2, 3, 4, 5))  # [calls, layers, b, h, g, k] -> [layers]
    picked[chunk] = valid.sum(axis=(0, 2, 3, 4, 5))
  if not picked.sum():
    raise ValueError("the reference rollout picked nothing (no chunk had candidates)")

  def share(k: int, p: int) -> float | None:
    return float(k / p) if p else None

  return {"fraction_unchanged": float(kept.sum() / picked.sum()),
          "per_layer": [share(k, p) for k, p in zip(kept.sum(axis=0), picked.sum(axis=0), strict=True)],
          "per_chunk": [share(k, p) for k, p in zip(kept.sum(axis=1), picked.sum(axis=1), strict=True)],
          "picks": int(picked.sum())}

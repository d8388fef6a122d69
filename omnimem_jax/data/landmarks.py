"""The orbiting-camera world in pixels: a panorama with a horizon and recognisable landmarks.

The camera geometry is `synthetic.WorldConfig`'s, in latent units (frames = latent frames, columns =
latent columns); this module draws the world as an RGB picture `PIXELS_PER_LATENT` times larger in
space and shows it at `FRAMES_PER_LATENT` video frames per latent frame, the Wan VAE's compression.
A small VAE trained on these videos (`omnimem_jax.training.codec`) turns them into the latents the
demo DiT learns, and decodes what the DiT generates back into pictures a person can read.

Each seed draws one world: a sky gradient, distant hills, a ground colour below a horizon, and a few
landmarks (houses, trees, towers, a sun) in saturated colours at random places around the cylinder.
The camera pans `2 * speed` pixels per video frame, so video frame `4 j` shows exactly the view of
latent frame `j` of the latent world and every revisit (`synthetic.revisit_schedule`) is the same
picture again.

Videos are float32 `[frames, height, width, 3]` in [-1, 1] (the VAE's input range); everything is a
pure function of (config, seed).
"""

from __future__ import annotations

import numpy as np

from omnimem_jax.data.synthetic import WorldConfig

PIXELS_PER_LATENT = 8  # the VAE's spatial compression
FRAMES_PER_LATENT = 4  # the VAE's temporal compression: latent frame j >= 1 stands for video frames 4j-3 .. 4j
SUPERSAMPLE = 2  # the panorama is drawn at this multiple and box-filtered down (smooth edges)

_PALETTE = np.array([[0.85, 0.15, 0.15], [0.95, 0.55, 0.1], [0.95, 0.85, 0.15], [0.2, 0.7, 0.25],
                     [0.15, 0.45, 0.9], [0.55, 0.25, 0.8], [0.9, 0.35, 0.65], [0.95, 0.95, 0.95],
                     [0.1, 0.1, 0.12], [0.35, 0.85, 0.85]], np.float32)  # saturated landmark colours (RGB, [0, 1])
_KINDS = ("house", "tree", "tower", "sun")


def pixel_size(config: WorldConfig) -> tuple[int, int, int]:
  """(height, view width, panorama width) in pixels."""
  return (config.height * PIXELS_PER_LATENT, config.width * PIXELS_PER_LATENT,
          config.world_width * PIXELS_PER_LATENT)


def pixels_per_frame(config: WorldConfig) -> int:
  """Pixels the camera pans per video frame."""
  shift = config.speed * PIXELS_PER_LATENT
  if shift % FRAMES_PER_LATENT:
    raise ValueError(f"speed {config.speed} latent columns per latent frame is not a whole number of pixels per "
                     "video frame")
  return shift // FRAMES_PER_LATENT


def video_frames(latent_frames: int) -> int:
  """Video frames that `latent_frames` latent frames stand for (1 + 4 (F - 1))."""
  return 1 + FRAMES_PER_LATENT * (latent_frames - 1)


def _shapes(rng: np.random.Generator, world_px: int, horizon: float) -> list[tuple[str, float, float, np.ndarray]]:
  """The landmarks as (kind, centre x, size, colour): 4-6, spread around the cylinder."""
  count = int(rng.integers(4, 7))
  slots = np.sort(rng.permutation(2 * count)[:count]) / (2 * count)  # distinct positions, at least 1/(2n) apart
  xs = (slots + rng.uniform(0.0, 0.5 / count)) * world_px
  colours = rng.permutation(len(_PALETTE))
  shapes = []
  for index, x in enumerate(xs):
    kind = _KINDS[int(rng.integers(0, len(_KINDS)))]
    size = float(rng.uniform(0.5, 0.85)) * horizon
    shapes.append((kind, float(x), size, _PALETTE[colours[index % len(_PALETTE)]]))
  return shapes


def _masks(kind: str, dx: np.ndarray, y: np.ndarray, horizon: float, size: float) -> list[tuple[np.ndarray, float]]:
  """The filled regions of one landmark (boolean masks over the grid `dx` (columns from its centre) x `y`)
  and each part's shade (1: the landmark's colour, below 1: darker)."""
  base = horizon + 2.0
  if kind == "house":
    half = 0.45 * size
    body = (np.abs(dx) <= half) & (y <= base) & (y >= base - 0.6 * size)
    roof = (y < base - 0.6 * size) & (y >= base - size) & (np.abs(dx) <= half * (y - (base - size)) / (0.4 * size))
    door = (np.abs(dx) <= 0.1 * size) & (y <= base) & (y >= base - 0.3 * size)
    return [(body, 1.0), (roof, 0.55), (door, 0.3)]
  if kind == "tree":
    trunk = (np.abs(dx) <= 0.08 * size) & (y <= base) & (y >= base - 0.5 * size)
    crown = dx ** 2 + (y - (base - 0.7 * size)) ** 2 <= (0.33 * size) ** 2
    return [(trunk, 0.35), (crown, 1.0)]
  if kind == "tower":
    shaft = (np.abs(dx) <= 0.12 * size) & (y <= base) & (y >= base - 0.9 * size)
    top = (np.abs(dx) <= 0.25 * size) & (y < base - 0.9 * size) & (y >= base - 1.05 * size)
    return [(shaft, 1.0), (top, 0.6)]
  sun = dx ** 2 + (y - 0.35 * horizon) ** 2 <= (0.3 * size) ** 2
  return [(sun, 1.0)]


def panorama(config: WorldConfig, seed: int) -> np.ndarray:
  """The world of `seed` as a picture: [height, world width, 3] float32 in [-1, 1], periodic in width."""
  rng = np.random.default_rng(np.random.SeedSequence([0x1A4D, int(seed)]))
  height, _, world_px = (SUPERSAMPLE * n for n in pixel_size(config))
  y = np.arange(height, dtype=np.float32)[:, None]
  x = np.arange(world_px, dtype=np.float32)[None, :]
  horizon = float(rng.uniform(0.55, 0.72)) * height
  sky_top, sky_low = rng.uniform([0.05, 0.1, 0.35], [0.3, 0.45, 0.7]), rng.uniform([0.5, 0.6, 0.75], [0.95, 0.9, 1.0])
  t = (y / horizon)[..., None]
  image = np.broadcast_to((1 - t) * sky_top + t * sky_low, (height, world_px, 3)).astype(np.float32)
  phase = rng.uniform(0, 2 * np.pi, 3)
  hills = horizon - height * (0.08 + 0.05 * sum(np.sin(2 * np.pi * k * x / world_px + phase[k - 1]) for k in (1, 2, 3)))
  hill_colour = rng.uniform([0.25, 0.3, 0.35], [0.5, 0.55, 0.6])
  image = np.where((y >= hills)[..., None], hill_colour, image)
  ground = rng.uniform([0.2, 0.35, 0.05], [0.6, 0.65, 0.3])
  shade = np.maximum(y - horizon, 0.0) / (height - horizon)
  image = np.where((y >= horizon)[..., None], ground * (0.8 + 0.4 * shade)[..., None], image).astype(np.float32)
  for kind, centre, size, colour in _shapes(rng, world_px, horizon):
    reach = int(np.ceil(0.5 * size)) + 1  # every landmark lies within half its size of its centre
    columns = (int(round(centre)) + np.arange(-reach, reach + 1)) % world_px
    dx = (np.arange(-reach, reach + 1) + round(centre) - centre)[None, :]
    band = image[:, columns]
    for mask, part_shade in _masks(kind, dx, y, horizon, size):
      band = np.where(mask[..., None], colour * part_shade, band)
    image[:, columns] = band
  image = image.reshape(height // SUPERSAMPLE, SUPERSAMPLE, world_px // SUPERSAMPLE, SUPERSAMPLE, 3).mean((1, 3))
  return (2.0 * np.clip(image, 0.0, 1.0) - 1.0).astype(np.float32)


def view(config: WorldConfig, scene: np.ndarray, latent_frames: int, first_frame: int = 0) -> np.ndarray:
  """The camera's video over `scene` (a `panorama`) from latent frame `first_frame` on:
  [1 + 4 (F - 1), height, width, 3]; video frame 4 j shows the view of latent frame first_frame + j."""
  if latent_frames < 1 or first_frame < 0:
    raise ValueError(f"need latent_frames >= 1 and first_frame >= 0, got {latent_frames} and {first_frame}")
  _, width, world_px = pixel_size(config)
  frames = FRAMES_PER_LATENT * first_frame + np.arange(video_frames(latent_frames))
  columns = (frames[:, None] * pixels_per_frame(config) + np.arange(width)[None, :]) % world_px  # [T, W]
  return np.ascontiguousarray(scene[:, columns].transpose(1, 0, 2, 3))  # [H, T, W, 3] -> [T, H, W, 3]


def video(config: WorldConfig, seed: int, latent_frames: int) -> np.ndarray:
  """The video of `latent_frames` latent frames of world `seed` from the start of its orbit (`view`)."""
  return view(config, panorama(config, seed), latent_frames)


def batch(config: WorldConfig, seeds: list[int] | np.ndarray, latent_frames: int) -> np.ndarray:
  """Videos of several worlds: [len(seeds), 1 + 4 (F - 1), height, width, 3]."""
  return np.stack([video(config, int(seed), latent_frames) for seed in seeds])

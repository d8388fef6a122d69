"""The frame layout of a side-by-side comparison: one panel per model, each under its label, separated
by thin gaps, with a caption strip below (the time, and where the camera is back at an earlier place).
Pure numpy on uint8 frames."""

from __future__ import annotations

import numpy as np
from jaxtyping import UInt8

from omnimem_jax import glyphs

GAP = 4  # pixels between panels
GAP_COLOUR = (24, 24, 24)
MODE_LABELS = {"omnimem": "OmniMem", "window": "Window (Self-Forcing)", "sink_window": "Sink window (LongLive)",
               "dense": "Dense (full history)"}


def label_scale(labels: list[str], panel_width: int) -> int:
  """The largest text scale (at most 2) at which every label fits its panel."""
  longest = max(glyphs.text_mask(label).shape[1] for label in labels)
  return max(1, min(2, panel_width // max(longest, 1)))


def upscale_for(panel_width: int) -> int:
  """Nearest upsampling that makes a panel at least 256 pixels wide (small demo videos), else 1."""
  return max(1, -(-256 // panel_width))


def frame_size(panel_height: int, panel_width: int, labels: list[str], upscale: int) -> tuple[int, int]:
  """(height, width) of `compose`'s frames for len(labels) panels of panel_height x panel_width."""
  width = panel_width * upscale
  bar = glyphs.label_bar(labels[0], width, scale=label_scale(labels, width)).shape[0]
  return panel_height * upscale + 2 * bar, len(labels) * width + (len(labels) - 1) * GAP


def compose(panels: list[UInt8[np.ndarray, "t h w 3"]], labels: list[str], captions: list[str], *, upscale: int = 1
            ) -> UInt8[np.ndarray, "t hh ww 3"]:
  """Panels side by side (each `upscale`d, nearest), labels above, one caption per frame below.

  Args:
    panels: one video per model, all [T, H, W, 3] uint8 of one shape.
    labels: one per panel.
    captions: one per frame (T), drawn centred under the panels ("" for none).
  """
  if len(panels) != len(labels) or not panels:
    raise ValueError(f"need one label per panel, got {len(panels)} panels and {len(labels)} labels")
  shape = panels[0].shape
  if any(panel.shape != shape for panel in panels) or len(captions) != shape[0]:
    raise ValueError(f"panels must share one [T, H, W, 3] shape and have one caption per frame, got "
                     f"{[panel.shape for panel in panels]} and {len(captions)} captions")
  panels = [panel.repeat(upscale, axis=1).repeat(upscale, axis=2) for panel in panels]
  frames, height, width, _ = panels[0].shape
  scale = label_scale(labels, width)
  gap = np.empty((frames, height, GAP, 3), np.uint8)
  gap[:] = GAP_COLOUR
  columns = []
  for index, (panel, label) in enumerate(zip(panels, labels, strict=True)):
    bar = glyphs.label_bar(label, width, scale=scale)
    columns.append(np.concatenate([np.broadcast_to(bar, (frames, *bar.shape)), panel], axis=1))
    if index < len(panels) - 1:
      columns.append(np.concatenate([np.broadcast_to(gap[:, :1], (frames, bar.shape[0], GAP, 3)), gap], axis=1))
  body = np.concatenate(columns, axis=2)
  strips = {text: glyphs.label_bar(text, body.shape[2], scale=scale) for text in set(captions)}
  footer = np.stack([strips[text] for text in captions])
  return np.ascontiguousarray(np.concatenate([body, footer], axis=1))

"""Model-range images to displayable uint8 arrays and grids (NumPy, on the host)."""

from __future__ import annotations

import numpy as np


def to_uint8(images) -> np.ndarray:
  """Images in [-1, 1] -> uint8: round((x + 1) * 127.5), clipped to 0..255."""
  return np.clip((np.asarray(images) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)


def square_grid(uint8: np.ndarray) -> np.ndarray:
  """[n, s, s, 3] -> one ceil(sqrt n) x ceil(sqrt n) grid, blank tiles at the end."""
  n, side = uint8.shape[0], uint8.shape[1]
  cols = int(np.ceil(np.sqrt(n)))
  tiles = np.concatenate([uint8, np.zeros((cols * cols - n,) + uint8.shape[1:], np.uint8)])
  return tiles.reshape(cols, cols, side, side, 3).transpose(0, 2, 1, 3, 4).reshape(
      cols * side, cols * side, 3)

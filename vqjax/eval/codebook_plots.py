"""Codebook pictures (Reg-VQ Fig. 1 and Fig. 7): the usage histogram and a 2-D PCA of the codes.

`--mode=eval` of the tokenizer writes both with `config.eval.codebook_plots=True`
(`write_codebook_plots`), from the code counts of its eval pass and the
quantiser's codebook (for a multichannel quantiser, the shared codebook and the
counts of every channel's tokens). Matplotlib is imported inside the writers and
draws on its Agg canvas directly (no pyplot, no global backend switch), so
importing vqjax stays light and nothing needs a display.
"""

from __future__ import annotations

import os

import numpy as np

from vqjax.ops import quantize as vq

USAGE_NAME = "codebook_usage"
PCA_NAME = "codebook_pca"


def pca_2d(vectors: np.ndarray) -> np.ndarray:
  """[K, d] -> [K, 2]: the centred vectors projected on their two leading principal axes.

  The axes are the first two right singular vectors of the centred matrix, each
  signed so that its largest-magnitude loading is positive (the first one on a
  tie), so the picture does not flip between runs. Columns past min(K, d) are 0.
  """
  x = np.asarray(vectors, np.float64)
  if x.ndim != 2:
    raise ValueError(f"pca_2d takes [K, d] vectors, got shape {x.shape}")
  centred = x - x.mean(axis=0, keepdims=True)
  out = np.zeros((x.shape[0], 2))
  if min(x.shape) == 0:
    return out
  _, _, vt = np.linalg.svd(centred, full_matrices=False)
  axes = vt[:2]
  rows = np.arange(axes.shape[0])
  signs = np.sign(axes[rows, np.argmax(np.abs(axes), axis=1)])
  axes = axes * np.where(signs == 0, 1.0, signs)[:, None]
  out[:, :axes.shape[0]] = centred @ axes.T
  return out


def usage_shares(counts: np.ndarray) -> np.ndarray:
  """Each code's share of the tokens, sorted descending (all 0 when there are no tokens)."""
  counts = np.asarray(counts, np.float64)
  return np.sort(counts)[::-1] / max(counts.sum(), 1e-12)


def usage_title(counts: np.ndarray) -> str:
  """'codebook usage 30/32 (93.8%), perplexity 21.4' from the pass's code counts."""
  counts = np.asarray(counts, np.float32)
  used = int(np.count_nonzero(counts))
  return (f"codebook usage {used}/{counts.size} ({float(vq.usage_fraction(counts)):.1%}), "
          f"perplexity {float(vq.perplexity(counts)):.1f}")


def _new_figure(size: tuple[float, float]):
  """A matplotlib Figure on an Agg canvas (no pyplot state)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=size, dpi=100)
  FigureCanvasAgg(fig)
  return fig


def _save(fig, path: str) -> str:
  """Write `fig` as a PNG at `path` atomically (a temporary file, then a rename)."""
  folder = os.path.dirname(path)
  if folder:
    os.makedirs(folder, exist_ok=True)
  tmp = path + ".tmp"
  fig.savefig(tmp, format="png")
  os.replace(tmp, path)
  return path


def write_usage_histogram(path: str, counts: np.ndarray) -> str:
  """Bar chart of each code's share of the tokens, codes sorted by usage (descending), with
  the usage fraction and perplexity in the title; returns `path`."""
  shares = usage_shares(counts)
  fig = _new_figure((8.0, 3.5))
  ax = fig.add_subplot()
  # One filled step outline, not K rectangles: as fast at K=16384 as at K=32.
  ax.stairs(shares, np.arange(shares.size + 1), fill=True, color="tab:blue")
  used = int(np.count_nonzero(shares))
  if 0 < used < shares.size:  # where the unused codes start
    ax.axvline(used, color="0.4", linestyle="--", linewidth=0.8)
  ax.set_xlim(0, max(shares.size, 1))
  ax.set_xlabel("code (sorted by usage)")
  ax.set_ylabel("share of tokens")
  ax.set_title(usage_title(counts))
  fig.tight_layout()
  return _save(fig, path)


def write_codebook_pca(path: str, codebook: np.ndarray, counts: np.ndarray) -> str:
  """Scatter of the codes' 2-D PCA (`pca_2d`) coloured by log(1 + count), unused codes as
  grey crosses, with a colour bar; returns `path`."""
  from matplotlib import cm, colors

  codebook = np.asarray(codebook, np.float64)
  counts = np.asarray(counts, np.float64)
  if codebook.shape[0] != counts.shape[0]:
    raise ValueError(f"codebook has {codebook.shape[0]} codes but counts has {counts.shape[0]}")
  xy = pca_2d(codebook)
  shade = np.log1p(counts)
  used = counts > 0
  norm = colors.Normalize(vmin=0.0, vmax=max(float(shade.max(initial=0.0)), 1.0))
  fig = _new_figure((6.0, 5.0))
  ax = fig.add_subplot()
  ax.scatter(xy[~used, 0], xy[~used, 1], marker="x", s=14, c="0.6", linewidths=0.8,
             label=f"unused ({int((~used).sum())})")
  ax.scatter(xy[used, 0], xy[used, 1], c=shade[used], cmap="viridis", norm=norm, s=14,
             label=f"used ({int(used.sum())})")
  fig.colorbar(cm.ScalarMappable(norm=norm, cmap="viridis"), ax=ax, label="log(1 + count)")
  ax.set_aspect("equal", adjustable="datalim")  # the spreads along the two axes compare
  ax.set_xlabel("PC 1")
  ax.set_ylabel("PC 2")
  ax.set_title(f"codebook PCA: {codebook.shape[0]} codes of dim {codebook.shape[1]}")
  ax.legend(loc="best", fontsize="small")
  fig.tight_layout()
  return _save(fig, path)


def plot_paths(folder: str, step: int) -> dict[str, str]:
  """{'usage': folder/codebook_usage_<step>.png, 'pca': folder/codebook_pca_<step>.png}."""
  return {"usage": os.path.join(folder, f"{USAGE_NAME}_{step}.png"),
          "pca": os.path.join(folder, f"{PCA_NAME}_{step}.png")}


def write_codebook_plots(folder: str, step: int, codebook: np.ndarray,
                         counts: np.ndarray) -> dict[str, str]:
  """Both pictures of one eval pass into `folder`, named with `step`; returns their paths
  (`plot_paths`)."""
  paths = plot_paths(folder, step)
  write_usage_histogram(paths["usage"], counts)
  write_codebook_pca(paths["pca"], codebook, counts)
  return paths

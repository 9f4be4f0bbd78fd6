"""Matplotlib helpers (Agg backend: files only, no display)."""
from __future__ import annotations

import pathlib
from typing import Any, Mapping, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def figure(ncols: int, nrows: int = 1, width: float = 4.2, height: float = 3.3):
  fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows),
                           squeeze=False)
  return fig, axes.reshape(-1)


def save(fig, path: str | pathlib.Path, dpi: int = 90) -> pathlib.Path:
  """Writes a PNG (small: these go into the repo's report) and closes the figure."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, dpi=dpi)
  plt.close(fig)
  return path


def _positive(values: np.ndarray) -> bool:
  v = np.asarray(values, np.float64)
  v = v[np.isfinite(v)]
  return v.size > 0 and bool(np.all(v > 0))


def layer_lines(ax, steps: np.ndarray, values: np.ndarray, *, title: str, ylabel: str,
                log: bool = True, labels: Optional[Sequence[str]] = None,
                xlabel: str = "step") -> None:
  """One line per layer (column of `values` `[T, L]`), coloured by depth."""
  values = np.asarray(values, np.float64)
  cmap = plt.get_cmap("viridis")
  n = values.shape[1]
  for j in range(n):
    label = labels[j] if labels is not None else f"layer {j + 1}"
    ax.plot(steps, values[:, j], color=cmap(j / max(n - 1, 1)), lw=1.2, label=label)
  _finish(ax, title, xlabel, ylabel, log and _positive(values), legend=n <= 12)


def lines(ax, x: np.ndarray, ys: Mapping[str, np.ndarray], *, title: str, xlabel: str,
          ylabel: str, log: bool = True, markers: bool = False,
          styles: Optional[Mapping[str, str]] = None,
          colors: Optional[Mapping[str, Any]] = None) -> None:
  """One labelled line per entry of `ys` over a shared or per-entry x; optional
  per-label format strings (`styles`) and colours (`colors`)."""
  for label, y in ys.items():
    xx = x[label] if isinstance(x, Mapping) else x
    style = (styles or {}).get(label, "-")
    kw = {"marker": "o"} if markers else {}
    if colors and label in colors:
      kw["color"] = colors[label]
    ax.plot(xx, y, style, ms=3, lw=1.3, label=label, **kw)
  allv = np.concatenate([np.asarray(y, np.float64).reshape(-1) for y in ys.values()]) \
      if ys else np.zeros(0)
  _finish(ax, title, xlabel, ylabel, log and _positive(allv), legend=bool(ys))


def color_for(name: str, names: Sequence[str]) -> Any:
  """A stable colour per name (e.g. per normalizer) from the tab10 cycle."""
  return plt.get_cmap("tab10")(list(names).index(name) % 10)


def bars(ax, names: Sequence[str], values: Sequence[float], *, title: str, ylabel: str,
         log: bool = False) -> None:
  v = np.asarray(values, np.float64)
  shown = np.where(np.isfinite(v), v, 0.0)
  ax.bar(range(len(names)), shown, color="tab:blue")
  for i, val in enumerate(v):
    if not np.isfinite(val):
      ax.text(i, 0, "n/a", ha="center", va="bottom", fontsize=8)
  ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
  _finish(ax, title, "", ylabel, log and _positive(v[np.isfinite(v)]), legend=False)


def _finish(ax, title, xlabel, ylabel, log, legend):
  if log:
    ax.set_yscale("log")
  ax.set_title(title, fontsize=10)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3, which="both" if log else "major")
  if legend:
    ax.legend(fontsize=6, ncol=2)

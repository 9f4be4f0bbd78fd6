"""Matplotlib helpers (Agg backend: files only, no display)."""
from __future__ import annotations

import pathlib
from typing import Any, Mapping, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


DPI = 90   # small PNGs: these go into the repo's report


def figure(ncols: int, nrows: int = 1, width: float = 4.2, height: float = 3.3):
  # Drawn at the DPI it is saved at: the layout pass and the PNG then share matplotlib's
  # text-layout and mathtext caches (keyed by DPI), ~10% less time per figure.
  fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows),
                           squeeze=False, dpi=DPI)
  return fig, axes.reshape(-1)


def save(fig, path: str | pathlib.Path, dpi: int | None = None) -> pathlib.Path:
  """Writes a PNG at `dpi` (default: the figure's own, `DPI` for `figure()`) and closes
  the figure."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, dpi=dpi or fig.dpi)
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


def bands(ax, x: Mapping[str, np.ndarray], samples: Mapping[str, Sequence[np.ndarray]], *,
          title: str, xlabel: str, ylabel: str, log: bool = True, markers: bool = False,
          colors: Optional[Mapping[str, Any]] = None,
          styles: Optional[Mapping[str, str]] = None) -> None:
  """Per label: the mean over its samples (e.g. seeds; arrays on the shared x of that
  label) as a line and mean ± std as a shaded band (no band for a single sample)."""
  means = {}
  for label, runs in samples.items():
    arr = np.asarray([np.asarray(r, np.float64) for r in runs])
    mean = np.nanmean(arr, axis=0)
    means[label] = mean
    if arr.shape[0] > 1:
      std = np.nanstd(arr, axis=0, ddof=1)
      lo = mean - std
      if log:    # a log axis cannot show a band below zero: clip at a tenth of the mean
        lo = np.maximum(lo, mean / 10)
      kw = {"color": colors[label]} if colors and label in colors else {}
      ax.fill_between(x[label], lo, mean + std, alpha=0.2, lw=0, **kw)
  lines(ax, x, means, title=title, xlabel=xlabel, ylabel=ylabel, log=log, markers=markers,
        colors=colors, styles=styles)


def bars(ax, names: Sequence[str], values: Sequence[float], *, title: str, ylabel: str,
         log: bool = False, errors: Optional[Sequence[float]] = None) -> None:
  """One bar per name; `errors`: a symmetric error bar each (e.g. the std over seeds)."""
  v = np.asarray(values, np.float64)
  shown = np.where(np.isfinite(v), v, 0.0)
  err = None
  if errors is not None:
    err = np.asarray(errors, np.float64)
    err = np.where(np.isfinite(err), err, 0.0)
    if log:    # keep the lower whisker above zero on a log axis
      err = np.vstack([np.minimum(err, 0.9 * np.abs(shown)), err])
  ax.bar(range(len(names)), shown, color="tab:blue", yerr=err, capsize=3)
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

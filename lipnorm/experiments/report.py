"""Markdown helpers for experiment reports."""
from __future__ import annotations

import math
from typing import Any, Sequence


def fmt(v: Any, digits: int = 4) -> str:
  """Numbers to short strings (NaN/None -> 'n/a'); everything else via str."""
  if v is None:
    return "n/a"
  if isinstance(v, bool):
    return "yes" if v else "no"
  if isinstance(v, (int,)) and not isinstance(v, bool):
    return str(v)
  try:
    f = float(v)
  except (TypeError, ValueError):
    return str(v)
  if math.isnan(f):
    return "n/a"
  if math.isinf(f):
    return "inf" if f > 0 else "-inf"
  return f"{f:.{digits}g}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A GitHub markdown table; cells formatted with `fmt`."""
  out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
  for row in rows:
    if len(row) != len(headers):
      raise ValueError(f"row has {len(row)} cells for {len(headers)} headers: {row}")
    out.append("| " + " | ".join(fmt(c) for c in row) + " |")
  return "\n".join(out) + "\n"

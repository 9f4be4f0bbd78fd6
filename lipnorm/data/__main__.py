"""`python -m lipnorm.data download <name> [--data_dir DIR] [--mirror URL] [--quiet]`

Fetches a dataset's official files (see `lipnorm.data.download`). Exit codes: 0 done (or
already there), 1 the download failed (network, HTTP, MD5 mismatch; rerun to resume),
2 bad input (unknown dataset name, unusable data_dir); each failure is one line.
"""
from __future__ import annotations

import argparse
import sys

from lipnorm.data import download as dl

EXIT_FAILED, EXIT_BAD_INPUT = 1, 2


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m lipnorm.data",
                              description="Dataset utilities of lipnorm.")
  sub = p.add_subparsers(dest="command", required=True)
  d = sub.add_parser(
      "download", help="fetch a dataset's official files (MD5-checked, resumable)",
      description="Fetch the official files of a dataset into DATA_DIR/<name> (default: "
      "$LIPNORM_DATA_DIR/<name> or ~/.cache/lipnorm/<name>), where the loaders look. "
      f"Datasets: {', '.join(dl.downloadable_names())}.")
  d.add_argument("name", help=f"one of: {', '.join(dl.downloadable_names())}")
  d.add_argument("--data_dir", default=None,
                 help="parent folder; the files go to DATA_DIR/<name>")
  d.add_argument("--mirror", default=None,
                 help=f"base URL serving the same file names (default: ${dl.MIRROR_ENV_VAR} "
                 "or the official URLs)")
  d.add_argument("--quiet", action="store_true", help="no progress bar")
  return p


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  try:
    dl.DOWNLOADS.get(args.name)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_BAD_INPUT
  try:
    folder = dl.download(args.name, args.data_dir, mirror=args.mirror,
                         progress=not args.quiet)
  except dl.DownloadError as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_FAILED
  except ValueError as e:   # an unusable data_dir
    print(f"error: {e}", file=sys.stderr)
    return EXIT_BAD_INPUT
  except KeyboardInterrupt:
    print("interrupted; rerun the same command to resume", file=sys.stderr)
    return EXIT_FAILED
  print(f"{args.name}: {', '.join(f.name for f in dl.DOWNLOADS.get(args.name).files)} "
        f"in {folder}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

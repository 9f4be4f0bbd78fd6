"""Training-pipeline throughput for CIFAR-10 from the local official archive.

Usage (from the repo root):
  python bench/data_throughput.py [CIFAR10_DIR] [--batch_size 256] [--steps 100]
CIFAR10_DIR (the folder holding cifar-10-binary.tar.gz) defaults to lipnorm's usual
search ($LIPNORM_DATA_DIR/cifar10, then ~/.cache/lipnorm/cifar10). Prints the archive
decode time, then images/s of the training iterator with and without augmentation
(crop + flip), each with the prefetch thread (prefetch=2) and synchronously
(prefetch=0), and the ratios.
"""
from __future__ import annotations

import argparse
import time

from lipnorm.data import LoadRequest, get_dataset, load_splits


def images_per_second(ds, steps: int, prefetch: int) -> float:
  it = ds.train_iterator(prefetch=prefetch)
  next(it)  # start-up (thread start, first permutation) is not throughput
  start = time.perf_counter()
  for _ in range(steps):
    batch = next(it)
  elapsed = time.perf_counter() - start
  it.close()
  assert batch["image"].shape[0] * batch["image"].shape[1] == ds.local_batch_size
  return steps * ds.local_batch_size / elapsed


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("data_dir", nargs="?", default=None)
  parser.add_argument("--batch_size", type=int, default=256)
  parser.add_argument("--steps", type=int, default=100)
  parser.add_argument("--devices", type=int, default=1, help="num_local_devices")
  args = parser.parse_args()

  start = time.perf_counter()
  load_splits("cifar10", LoadRequest(data_dir=args.data_dir))
  print(f"decode cifar-10 archive ({args.data_dir or 'default location'}): "
        f"{time.perf_counter() - start:.2f} s")

  rates = {}
  for augment in (False, True):
    cfg = {"source": "cifar10", "data_dir": args.data_dir, "batch_size": args.batch_size,
           "augment": augment}
    ds = get_dataset(cfg, seed=0, num_local_devices=args.devices, process_index=0,
                     process_count=1)
    for prefetch in (0, 2):
      rate = images_per_second(ds, args.steps, prefetch)
      rates[augment, prefetch] = rate
      print(f"augment={str(augment):5s} prefetch={prefetch}: {rate:10.0f} images/s "
            f"(batch {args.batch_size}, {args.steps} steps)")
  for prefetch in (0, 2):
    print(f"ratio augment/no-augment (prefetch={prefetch}): "
          f"{rates[True, prefetch] / rates[False, prefetch]:.2f}")
  for augment in (False, True):
    print(f"ratio prefetch=2 / prefetch=0 (augment={augment}): "
          f"{rates[augment, 2] / rates[augment, 0]:.2f}")


if __name__ == "__main__":
  main()

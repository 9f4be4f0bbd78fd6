"""Soundness and tightness of the paper's bound and lipnorm's certified bound on random
relu_nets (depth 2-8, width 8-64) and small CNNs, every normalizer, BN in eval mode with
non-trivial running statistics, kernels scaled 0.3-3x, gains with random signs.

Prints one line per net, then per (net, normalizer) the median and worst ratio of each
bound to the best lower value (largest local constant on the data; for global-scope
nets also the lower-bound search) and the number of violations (bound < lower value).

  python bench/bound_tightness.py [--nets 6] [--search-steps 30] [--seed 0] [--quick]
                                 [--archs relu_net,cnn] [--norms none,batch,...]
"""
import argparse
import sys
import time


from lipnorm.lipschitz import tightness  # noqa: E402


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--nets", type=int, default=6, help="random nets per (arch, normalizer)")
  ap.add_argument("--search-steps", type=int, default=30)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--quick", action="store_true", help="relu_nets only, 3 per normalizer")
  ap.add_argument("--archs", default="relu_net,cnn", help="comma-separated: relu_net, cnn")
  ap.add_argument("--norms", default="", help="comma-separated normalizers (default: all)")
  args = ap.parse_args()
  archs = ("relu_net",) if args.quick else tuple(args.archs.split(","))
  bad = [a for a in archs if a not in ("relu_net", "cnn")]
  if bad:
    print(f"error: --archs={args.archs!r}; allowed: relu_net, cnn", file=sys.stderr)
    sys.exit(2)
  norms = None
  if args.norms:
    norms = {n: None for n in args.norms.split(",")}
    bad = [n for n in norms if n not in tightness.CNN_NORMS]
    if bad:
      print(f"error: --norms={args.norms!r}; allowed: {', '.join(tightness.CNN_NORMS)}",
            file=sys.stderr)
      sys.exit(2)
  nets = 3 if args.quick else args.nets
  start = time.time()

  def log(r):
    b = r.bounds
    print(f"{r.desc:22s} {r.norm:9s} {r.scope:6s} lower {r.best_lower:9.4g} "
          f"paper {b['paper']:9.4g} folded {b['folded']:9.4g} chain {b['chain']:9.4g} "
          f"certified {b['certified']:9.4g} ratio {r.ratios['certified']:7.3g} "
          f"(paper {r.ratios['paper']:7.3g})" + (f" VIOLATION {r.violations}"
                                                  if r.violations else ""), flush=True)
  results = tightness.sweep(nets, archs=archs, seed=args.seed, norms=norms,
                            search_steps=args.search_steps, log=log)
  rows = tightness.summary_rows(results)
  print()
  print(tightness.markdown_table(rows))
  print(f"\n{len(results)} nets, {sum(r['violations'] for r in rows)} violations, "
        f"{time.time() - start:.0f} s")


if __name__ == "__main__":
  main()

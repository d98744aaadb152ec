"""Report of a sweep: report.csv, report.md and PNG plots from every job of a Hydra multirun folder.

    python scripts/train_policy.py -m +sweep=beta hydra.sweep.dir=/tmp/beta
    python scripts/best_of_n.py --out /tmp/beta                  # optional: best-of-n on the same plot
    python scripts/report.py /tmp/beta [--kl-budget 8] [--out /tmp/beta/report]

Works on a sweep still running: finished jobs are reported, the others are listed as unfinished.
"""

import argparse
import os

from rlhf.analysis.report import DEFAULT_WINDOW, write_report


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sweep_dir", help="multirun folder (hydra.sweep.dir) or a single run folder")
    p.add_argument("--out", help="output folder (default: <sweep_dir>/report)")
    p.add_argument("--kl-budget", type=float, help="also name the best score with mean final KL <= this (nats)")
    p.add_argument("--window", type=int, default=DEFAULT_WINDOW,
                   help="final value = mean over this many last logged steps")
    p.add_argument("--bon", help="best_of_n.csv from scripts/best_of_n.py (default: <sweep_dir>/best_of_n.csv if "
                                 "present)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    out = args.out or os.path.join(args.sweep_dir, "report")
    try:
        report = write_report(args.sweep_dir, out, args.window, args.kl_budget, args.bon)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    print("\n".join(report.summary))
    print("wrote " + ", ".join(report.files))


if __name__ == "__main__":
    main()

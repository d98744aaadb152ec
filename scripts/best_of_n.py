"""Best-of-n from the starting policy: n = 1, 2, 4, ..., n_max completions per prompt, keep the proxy-best, record
its gold score and the analytic KL log n - (n-1)/n. The output feeds scripts/report.py --bon.

    python scripts/best_of_n.py --out /tmp/bon                       # built-in task, seeds 0 and 1
    python scripts/best_of_n.py --out /tmp/bon --seeds 0 model=...   # trailing args are Hydra overrides of
                                                                     # configs/policy.yaml, as for train_policy.py
"""

import argparse
import os
import sys

from hydra import compose, initialize_config_dir

from rlhf.analysis.best_of_n import run_best_of_n, write_bon_csv
from rlhf.config import validate_policy_config
from rlhf.runtime.errors import exit_on_user_error

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for best_of_n.csv")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1],
                   help="starting policies to sample from (use the sweep's seeds)")
    p.add_argument("--n-max", type=int, default=64, help="largest n, a power of two; every smaller n reuses its pool")
    p.add_argument("--prompts", type=int, default=256, help="prompts per seed (the first ones of the data config)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides of configs/policy.yaml")
    return p.parse_args(argv)


@exit_on_user_error
def main(argv=None) -> None:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    rows = []
    with initialize_config_dir(config_dir=os.path.abspath(CONFIGS), version_base="1.3"):
        for seed in args.seeds:
            cfg = compose(config_name="policy", overrides=[*args.overrides, f"seed={seed}", f"run_dir={args.out}"])
            seed_rows = run_best_of_n(validate_policy_config(cfg), args.prompts, args.n_max)
            rows += seed_rows
            for r in seed_rows:
                print(f"seed {seed}  n={r['n']:3d}  KL={r['kl']:.3f}  proxy={r['proxy']:+.3f}  "
                      f"gold={r['gold']:+.3f} ± {r['gold_se']:.3f}  gain={r['gain']:+.3f}")
    path = write_bon_csv(rows, os.path.join(args.out, "best_of_n.csv"))
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()

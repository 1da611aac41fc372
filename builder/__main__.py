"""python -m builder [--num-items N] [--repository DIR] [--if-missing]"""

import argparse
from pathlib import Path

from builder.build import TEMPLATE, BuildConfig, build, is_built
from stages.ann import AnnConfig
from world.synthetic import WorldConfig


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m builder", description=__doc__)
    p.add_argument("--num-items", type=int, default=WorldConfig.num_items)
    p.add_argument("--num-users", type=int, default=WorldConfig.num_users)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repository", type=Path, default=TEMPLATE)
    p.add_argument("--items-csv", type=Path, default=BuildConfig.items_csv)
    p.add_argument("--oversample", type=int, default=AnnConfig.oversample)
    p.add_argument("--if-missing", action="store_true",
                   help="do nothing when every stage artifact already exists")
    a = p.parse_args()
    if a.if_missing and is_built(a.repository):
        print(f"model repository {a.repository} is built (python -m builder to rebuild)")
        return
    cfg = BuildConfig(world=WorldConfig(seed=a.seed, num_items=a.num_items,
                                        num_users=a.num_users),
                      repository=a.repository, items_csv=a.items_csv,
                      ann=AnnConfig(oversample=a.oversample))
    build(cfg)
    print(f"built {a.repository} ({a.num_items:,} items); catalog: {a.items_csv}")


if __name__ == "__main__":
    main()

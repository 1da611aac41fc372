"""python -m builder [--num-items N] [--repository DIR] [--if-missing] [--version N]

`--version N` (N > 1) writes a rebuilt index as version N of every index model, next to the
version being served; `python -m serving.swap --version N` then switches a running server to
it without failing a request. The fresh-item store is kept.
"""

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
    p.add_argument("--version", type=int, default=BuildConfig.version,
                   help="version folder to write: 1 = a new repository (and an empty fresh "
                        "store), N > 1 = a rebuilt index next to the served one")
    p.add_argument("--fresh-capacity", type=int, default=BuildConfig.fresh_capacity,
                   help="rows of the fresh index (items added between rebuilds)")
    p.add_argument("--if-missing", action="store_true",
                   help="do nothing when every stage artifact already exists")
    a = p.parse_args()
    if a.if_missing and is_built(a.repository):
        print(f"model repository {a.repository} is built (python -m builder to rebuild)")
        return
    cfg = BuildConfig(world=WorldConfig(seed=a.seed, num_items=a.num_items,
                                        num_users=a.num_users),
                      repository=a.repository, items_csv=a.items_csv,
                      ann=AnnConfig(oversample=a.oversample), version=a.version,
                      fresh_capacity=a.fresh_capacity)
    build(cfg)
    print(f"built {a.repository} ({a.num_items:,} items); catalog: {a.items_csv}")


if __name__ == "__main__":
    main()

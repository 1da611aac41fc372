"""Build a Triton model repository: from the synthetic world (default) or from your catalog.

    python -m builder                                   # synthetic world -> model_repository/
    python -m builder --catalog DIR                     # DIR (docs/catalog.md, or a MovieLens
                                                        #   directory) -> build/catalogs/<DIR>/
    python -m builder --catalog DIR --repository OUT --items-csv OUT_ITEMS.csv
    python -m builder --version 2                       # a rebuilt index next to the served one

A rebuild takes in the fresh store's items (added, replaced, retired since the last build:
nothing acknowledged is lost); version 1 then starts an empty store, version N keeps it for
the version being served until `python -m serving.swap --version N`. Nothing served changes
unless the build completes.
"""

import argparse
import sys
from pathlib import Path

from builder.build import ROOT, TEMPLATE, BuildConfig, build, catalog_build_dir, is_built
from catalog import CatalogError
from stages.ann import AnnConfig
from training.over_arch import OverArchTrainConfig
from training.train import TrainConfig
from world.synthetic import WorldConfig


def config_from_args(argv=None) -> tuple:
    p = argparse.ArgumentParser(prog="python -m builder", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--catalog", type=Path, default=None,
                   help="catalog directory to build from (docs/catalog.md); default: the "
                        "synthetic world")
    p.add_argument("--repository", type=Path, default=None,
                   help="model repository to write (default: model_repository/, or "
                        "build/catalogs/<name>/model_repository with --catalog)")
    p.add_argument("--items-csv", type=Path, default=None,
                   help="where the indexed catalog goes (default: build/items.csv, or "
                        "items.csv next to the repository with --catalog)")
    p.add_argument("--unknown-items", choices=("error", "skip"), default=None,
                   help="interactions naming items not in the catalog: fail (default) or "
                        "skip them (counted in the summary)")
    p.add_argument("--num-items", type=int, default=WorldConfig.num_items,
                   help="synthetic world: items")
    p.add_argument("--num-users", type=int, default=WorldConfig.num_users,
                   help="synthetic world: users")
    p.add_argument("--seed", type=int, default=0, help="synthetic world: seed")
    p.add_argument("--oversample", type=int, default=AnnConfig.oversample,
                   help="ANN candidates per requested result, rescored by the scorer")
    p.add_argument("--version", type=int, default=BuildConfig.version,
                   help="version folder to write: 1 = a new repository (and an empty fresh "
                        "store), N > 1 = a rebuilt index next to the served one")
    p.add_argument("--fresh-capacity", type=int, default=BuildConfig.fresh_capacity,
                   help="rows of the fresh index (items added between rebuilds)")
    p.add_argument("--discard-fresh", action="store_true",
                   help="version 1: drop the fresh store's items instead of folding them in")
    p.add_argument("--if-missing", action="store_true",
                   help="do nothing when every stage artifact already exists")
    p.add_argument("--retrieval", choices=("auto", "two_tower", "linear"),
                   default=TrainConfig.retrieval,
                   help="retrieval model trained from interactions: two_tower, linear (EASE "
                        "factorized, training/linear.py; catalogs up to 20,000 items with "
                        "positives) or auto: linear for logs without impressions (ratings, "
                        "purchases) when it fits (default: %(default)s)")
    p.add_argument("--overarch-epochs", type=int, default=OverArchTrainConfig.epochs,
                   help="training passes of the OverArch and its heads; 0 keeps their "
                        "logistic fit on the dot product (a quick build: the retrieval and "
                        "the filters are as trained, the reordering is not) "
                        "(default: %(default)s)")
    a = p.parse_args(argv)
    if a.overarch_epochs < 0:
        p.error(f"--overarch-epochs must be >= 0, got {a.overarch_epochs}")
    if a.version < 1:
        p.error(f"--version must be >= 1, got {a.version}")
    if a.fresh_capacity < 1:
        p.error(f"--fresh-capacity must be >= 1, got {a.fresh_capacity}")
    if a.discard_fresh and a.version != 1:
        p.error("--discard-fresh: only a version-1 build may drop the fresh items (a swap "
                "keeps serving them from the store)")
    if a.catalog is not None and not a.catalog.is_dir():
        p.error(f"--catalog {a.catalog}: no such directory")
    base = catalog_build_dir(a.catalog) if a.catalog is not None else None
    repository = a.repository or (base / "model_repository" if base else TEMPLATE)
    items_csv = a.items_csv or (repository.resolve().parent / "items.csv"
                                if a.repository or base else ROOT / "build" / "items.csv")
    cfg = BuildConfig(world=WorldConfig(seed=a.seed, num_items=a.num_items,
                                        num_users=a.num_users),
                      catalog=a.catalog, unknown_items=a.unknown_items,
                      repository=repository, items_csv=items_csv,
                      ann=AnnConfig(oversample=a.oversample), version=a.version,
                      fresh_capacity=a.fresh_capacity, fold_fresh=not a.discard_fresh,
                      training=TrainConfig(retrieval=a.retrieval, over_arch=OverArchTrainConfig(
                          epochs=a.overarch_epochs)))
    return cfg, a.if_missing


def main(argv=None) -> int:
    cfg, if_missing = config_from_args(argv)
    if if_missing and is_built(cfg.repository):
        print(f"model repository {cfg.repository} is built (python -m builder to rebuild)")
        return 0
    try:
        build(cfg, keep_source=False)  # nothing here reads the source afterwards
    except (CatalogError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        print(f"nothing was written: {cfg.repository} is as it was", file=sys.stderr)
        return 2
    what = f"catalog {cfg.catalog}" if cfg.catalog else \
        f"synthetic world ({cfg.world.num_items:,} items)"
    print(f"built {cfg.repository} (version {cfg.version}) from the {what}; indexed catalog: "
          f"{cfg.items_csv}")
    if cfg.repository != TEMPLATE:
        print(f"serve it: make serve REPOSITORY={cfg.repository}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

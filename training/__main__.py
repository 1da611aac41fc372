"""python -m training [--num-items N] [--num-users U] [--seed S] [--movielens DIR] [--retrain]

Trains the two-tower model, the OverArch and its task heads on all but the latest 10% of the
interactions (the builder's holdout) and writes the weights to build/weights/, where
`python -m builder` finds them (it trains by itself when they are missing). Weights trained
from the same data and config are reused unless --retrain is given.
"""

import argparse
from pathlib import Path

from training.data import from_world
from training.train import (
    HOLDOUT_FRACTION,
    WEIGHTS_DIR,
    load_or_train,
    metrics_line,
    training_config_for,
    weights_path,
)
from world.synthetic import WorldConfig, generate_world


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m training", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-items", type=int, default=WorldConfig.num_items)
    p.add_argument("--num-users", type=int, default=WorldConfig.num_users)
    p.add_argument("--seed", type=int, default=0, help="synthetic world seed")
    p.add_argument("--movielens", type=Path, default=None,
                   help="train on this MovieLens-format directory instead of the synthetic world")
    p.add_argument("--weights-dir", type=Path, default=WEIGHTS_DIR)
    p.add_argument("--retrain", action="store_true", help="train even when weights exist")
    a = p.parse_args()
    if a.movielens is not None:
        from training.movielens import load_movielens

        data = load_movielens(a.movielens)
    else:
        data = from_world(generate_world(WorldConfig(seed=a.seed, num_items=a.num_items,
                                                     num_users=a.num_users)))
    config, holdout = training_config_for(data), HOLDOUT_FRACTION
    path = weights_path(data, holdout, config, a.weights_dir)
    reused = path.exists() and not a.retrain
    weights = load_or_train(data, holdout, config, a.weights_dir, progress=True,
                            retrain=a.retrain)
    print(metrics_line(data, weights))
    print(f"{'reused' if reused else 'wrote'} {path}")


if __name__ == "__main__":
    main()

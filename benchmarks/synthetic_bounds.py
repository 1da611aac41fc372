"""What the synthetic world lets a model learn, side by side (docs/quality.md, "Synthetic oracle").

    .venv/bin/python benchmarks/synthetic_bounds.py --users 400

Ground-truth recall@10 against the whole catalog's top 10 by the world's affinity, by exact
search (no index) for `--users` random users, with user and item vectors taken from:

- the trained towers (the weights `training.evaluate` trains and caches: build/weights/);
- the true latent vectors (the oracle without its index);
- the true users over the trained item vectors (by their best linear map to the true ones:
  the spaces differ), over the best linear map from the catalog's content vectors to the true
  item vectors (what a perfect content-based item tower could learn), and over that map's
  directions at the true items' norms.

A mapped line also prints its map's R^2 against the true item vectors (least squares).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.data import from_world  # noqa: E402
from training.retrieval import RetrievalModel  # noqa: E402
from training.train import (  # noqa: E402
    HOLDOUT_FRACTION,
    TrainConfig,
    load_or_train,
    training_config_for,
)
from world.synthetic import WorldConfig, generate_world  # noqa: E402


def linear_fit(x: np.ndarray, target: np.ndarray):
    """(x A, R^2): the least-squares linear map of x onto target, and how much it explains."""
    a, *_ = np.linalg.lstsq(x, target, rcond=None)
    mapped = x @ a
    r2 = 1.0 - ((mapped - target) ** 2).sum() / ((target - target.mean(0)) ** 2).sum()
    return mapped, float(r2)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=400, help="random users (default: %(default)s)")
    p.add_argument("--seed", type=int, default=1, help="of the user sample (default: %(default)s)")
    a = p.parse_args(argv)
    if a.users < 1:
        p.error("--users must be >= 1")
    world = generate_world(WorldConfig())
    data = from_world(world)
    weights = load_or_train(data, HOLDOUT_FRACTION, training_config_for(data, TrainConfig()))
    model = RetrievalModel.trained(weights)
    rng = np.random.default_rng(a.seed)
    users = np.sort(rng.choice(len(data.user_ids), min(a.users, len(data.user_ids)),
                               replace=False))
    with torch.no_grad():
        learned_users = model.users(torch.from_numpy(data.user_ids[users])).numpy()
    learned_items = model.item_vectors
    true_users, true_items = world.user_latent[users], world.item_latent
    affinity = world.affinity(users[:, None], np.arange(data.catalog.num_items)[None, :])
    ideal = np.argsort(-affinity, axis=1)[:, :10]

    def recall(scores: np.ndarray) -> float:
        top = np.argsort(-scores, axis=1)[:, :10]
        return float(np.mean([np.isin(top[i], ideal[i]).sum() / 10 for i in range(len(users))]))

    trained_mapped, r2_trained = linear_fit(learned_items, true_items)
    content, r2_content = linear_fit(world.catalog.embeddings, true_items)
    direction = content / np.linalg.norm(content, axis=1, keepdims=True)
    at_true_norm = direction * np.linalg.norm(true_items, axis=1, keepdims=True)
    rows = [
        ("trained users . trained items", recall(learned_users @ learned_items.T), ""),
        ("true users . true items (the oracle)", recall(true_users @ true_items.T), ""),
        ("true users . trained items mapped to the items", recall(true_users @ trained_mapped.T),
         f"R^2 {r2_trained:.3f}"),
        ("true users . content mapped to the items", recall(true_users @ content.T),
         f"R^2 {r2_content:.3f}"),
        ("true users . its directions at the true norms", recall(true_users @ at_true_norm.T),
         ""),
    ]
    print(f"ground-truth recall@10 (affinity), {len(users)} users, exact search")
    for name, value, note in rows:
        print(f"  {name:<52} {value:.4f}  {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

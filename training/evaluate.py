"""Retrieval quality of the served stages on held-out interactions (and, on the synthetic world,
against ground truth): (a) dot-product retrieval alone vs (b) retrieval + OverArch + Value Model.

    python -m training.evaluate [--movielens DIR] [--write docs/quality.md]

Both pipelines run the built stage modules (the `ann` stage's user tower and index, the
`scorer`, the `aggregator`), exactly as served, per user with k = 10 and k = 50:
(a) the first k ANN candidates (ANN order = dot product), (b) the Value Model's top k of the
ANN's oversample * k candidates. Items the user interacted with in training are filtered out
(through the filter bitmap, as a request filter would). Rows "(a|b) + request history" send
each user's training-part positives as the request's `history` input (most recent first, at
most MAX_HISTORY, stages/history.py) instead of relying on the history built into the model.

Metrics, averaged over evaluated users (R = the user's relevant items, L_k = the returned list):
- held-out: R = the user's held-out impressions with a positive first task (a click; a rating
  on MovieLens); recall@k = |L_k & R| / min(k, |R|); NDCG@10 with binary gains.
- ground truth (synthetic world only, no exclusion): the ideal list T_k is the top k of the
  whole catalog by the true score s (the world's affinity logit, or the true value
  sum_t w_t p_t with the true task probabilities); recall@k = |L_k & T_k| / k, NDCG@10 with
  gain s - min_catalog(s) (non-negative) against the ideal list.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from filtering.bits import pack_bits
from stages.ann import AnnConfig
from stages.history import MAX_HISTORY, batch_history
from stages.scorer import OverArchConfig
from training.anchors import (
    EASE,
    EASE_MAX_ITEMS,
    ItemKNN,
    Popularity,
    interaction_matrix,
    map_user_latents,
    top_k,
)
from training.data import LoggedData, from_world, holdout_split, subset
from training.linear import LinearConfig
from training.over_arch import OverArchTrainConfig, newest_first
from training.retrieval import RetrievalModel, retrieval_stages
from training.train import (
    HOLDOUT_FRACTION,
    WEIGHTS_DIR,
    TrainConfig,
    load_or_train,
    metrics_line,
    training_config_for,
)
from world.synthetic import WorldConfig, generate_world

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MOVIELENS = ROOT.parent / "shared" / "data" / "ml-latest-small"
PIPELINES = ("a", "b")
# paired differences reported: name -> (ranker, ranker it is compared with)
PAIRED = {"b-a": ("b", "a"), "b-EASE": ("b", "EASE"), "bh-b": ("b+h", "b")}
# table rows, in order: ranker or paired difference -> its name in the table
ROW_NAMES = {"popularity": "popularity", "item-kNN (cosine)": "item-kNN (cosine)",
             "EASE": "EASE (closed form)", "oracle": "oracle: true latent vectors, same index",
             "bound": "bound: true item vectors, users estimated from their log",
             "a": "(a) dot-product retrieval", "b": "(b) + OverArch + Value Model",
             "a+h": "(a) + request history", "b+h": "(b) + request history",
             "b-a": "(b) - (a), paired", "b-EASE": "(b) - EASE, paired",
             "bh-b": "(b) + request history - (b), paired"}


@dataclass
class EvalConfig:
    ks: Sequence[int] = (10, 50)  # list lengths (one request per user and k)
    ndcg_k: int = 10
    max_users: int = 20_000  # held-out users evaluated at most (a seeded sample beyond that)
    truth_users: int = 2_000  # synthetic world: users compared against ground truth
    batch_size: int = 256  # users per batched request
    holdout_fraction: float = HOLDOUT_FRACTION  # as the builder holds them out
    task_weights: tuple = (1.0, 2.0, 4.0)  # Value Model weights (the builder's defaults)
    seed: int = 0
    ann: AnnConfig = field(default_factory=AnnConfig)


class Pipelines:
    """The served stages of one data set, run in-process on batches of users."""

    def __init__(self, data: LoggedData, weights, config: EvalConfig):
        """weights: TrainedWeights, or a RetrievalModel (e.g. pretrained vectors)."""
        model = weights if isinstance(weights, RetrievalModel) else RetrievalModel.trained(
            weights)
        built = retrieval_stages(data.catalog, model, config.ann, config.task_weights)
        self.ann, self.scorer, self.aggregator = (built.stages[n].eval() for n in
                                                  ("ann", "scorer", "aggregator"))
        # catalog row of each index row, and index row of each catalog row
        self.catalog_row = built.order
        self.index_row = np.empty_like(self.catalog_row)
        self.index_row[self.catalog_row] = np.arange(len(self.catalog_row))
        self.item_ids = data.catalog.item_ids
        self.num_items = data.catalog.num_items
        self.weights = torch.tensor(config.task_weights, dtype=torch.float32)
        self.all_pass = pack_bits(torch.ones((1, self.num_items), dtype=torch.bool))

    @torch.no_grad()
    def run(self, user_ids: np.ndarray, excluded: List[np.ndarray], k: int,
            history: Optional[List[np.ndarray]] = None) -> Dict[str, list]:
        """Catalog rows returned per user by each pipeline (lists of arrays, best first).

        excluded[i]: catalog rows user i must not get (filtered out); history[i]: raw item ids
        sent as user i's request history (None: the built history)."""
        b = len(user_ids)
        bits = self.all_pass.repeat(b, 1).numpy().view(np.uint64)
        for i, rows in enumerate(excluded):
            r = self.index_row[rows].astype(np.uint64)
            np.bitwise_and.at(bits[i], (r >> np.uint64(6)).astype(np.int64),
                              ~(np.uint64(1) << (r & np.uint64(63))))
        bits = torch.from_numpy(bits.view(np.int64))
        ks = torch.full((b,), k, dtype=torch.int64)
        pooled = None if history is None else self.ann.pooling(batch_history(history))
        found = self.ann(torch.from_numpy(user_ids), bits, ks, pooled)
        rows, counts = found.rows, found.counts
        task_scores = self.scorer(found.user_embedding, rows, found.history_rows)
        ids, _, _, n = self.aggregator(rows, task_scores, counts, ks,
                                       self.weights.expand(b, -1))
        dot = [self.catalog_row[rows[i, : min(k, int(counts[i]))].numpy()] for i in range(b)]
        order = np.argsort(self.item_ids)
        value = []
        for i in range(b):
            got = ids[i, : int(n[i])].numpy()
            value.append(order[np.searchsorted(self.item_ids[order], got)])
        return {"a": dot, "b": value}


def ndcg(gains_of_list: np.ndarray, ideal_gains: np.ndarray) -> float:
    discount = 1.0 / np.log2(np.arange(2, max(len(ideal_gains), len(gains_of_list)) + 2))
    idcg = float((ideal_gains * discount[: len(ideal_gains)]).sum())
    dcg = float((gains_of_list * discount[: len(gains_of_list)]).sum())
    return dcg / idcg if idcg > 0 else 0.0


class Scores:
    """Per-user metric values of each ranker (a pipeline or an anchor); `summary` gives means
    and 95% intervals, and the paired differences of `PAIRED` rankers."""

    def __init__(self, metrics: Sequence[str]):
        self.metrics = list(metrics)
        self.values: Dict[str, Dict[str, list]] = {}

    def add(self, ranker: str, metric: str, value: float) -> None:
        self.values.setdefault(ranker, {m: [] for m in self.metrics})[metric].append(
            float(value))

    def summary(self) -> Dict[str, Dict]:
        """{ranker or paired difference: {metric: (mean, 95% half-width), "users": n}}; a
        paired difference ("b-a", "b-EASE") is the mean of the per-user differences."""
        arrays = {p: {m: np.asarray(v) for m, v in metrics.items()}
                  for p, metrics in self.values.items()}
        for key, (x, y) in PAIRED.items():
            if x in arrays and y in arrays:
                arrays[key] = {m: arrays[x][m] - arrays[y][m] for m in arrays[x]}
        out = {}
        for p, metrics in arrays.items():
            out[p] = {m: (float(v.mean()), 1.96 * float(v.std(ddof=1)) / np.sqrt(len(v)))
                      for m, v in metrics.items()}
            out[p]["users"] = len(next(iter(metrics.values())))
        return out


def metric_names(config: EvalConfig) -> List[str]:
    return [f"recall@{k}" for k in config.ks] + [f"ndcg@{config.ndcg_k}"]


class Rankers:
    """Everything that makes a list for a user in the table: the served pipelines (a) and (b),
    optionally the oracles (name -> Pipelines: the world's true latent vectors through the
    same stages, oracle_for) and the anchors (training/anchors.py), which score catalog rows
    directly."""

    def __init__(self, data: LoggedData, pipes: Pipelines, anchors: Sequence = (),
                 oracles: Optional[Dict[str, Pipelines]] = None,
                 histories: Optional[Dict[int, np.ndarray]] = None):
        self.data, self.pipes, self.anchors = data, pipes, list(anchors)
        self.oracles = oracles or {}
        self.histories = histories  # data user index -> request history (raw item ids)

    def run(self, users: np.ndarray, excluded: List[np.ndarray], k: int) -> Dict[str, list]:
        """users: data user indices -> {ranker: catalog rows per user, best first}."""
        raw = self.data.user_ids[users]
        lists = self.pipes.run(raw, excluded, k)
        if self.histories is not None:
            empty = np.zeros(0, np.int64)
            with_history = self.pipes.run(raw, excluded, k,
                                          [self.histories.get(int(u), empty) for u in users])
            lists.update({f"{p}+h": v for p, v in with_history.items()})
        for name, oracle in self.oracles.items():
            lists[name] = oracle.run(raw, excluded, k)["a"]
        for anchor in self.anchors:
            lists[anchor.name] = top_k(anchor.scores(users), excluded, k)
        return lists


def heldout_metrics(data: LoggedData, pipes, config: EvalConfig,
                    progress: bool = False) -> Dict[str, Dict]:
    """Held-out metrics of `pipes` (Pipelines, or Rankers with anchors and the oracle)."""
    rankers = pipes if isinstance(pipes, Rankers) else Rankers(data, pipes)
    train_mask, holdout_mask = holdout_split(data, config.holdout_fraction)
    train, held = subset(data.interactions, train_mask), subset(data.interactions, holdout_mask)
    positive = held.labels[:, 0] > 0
    users = np.unique(held.user_index[positive])
    rng = np.random.default_rng(config.seed)
    if len(users) > config.max_users:
        users = np.sort(rng.choice(users, config.max_users, replace=False))
    relevant = _rows_by_user(held.user_index[positive], held.item_index[positive])
    seen = _rows_by_user(train.user_index, train.item_index)
    empty = np.zeros(0, np.int64)
    scores = Scores(metric_names(config))
    for s in tqdm(range(0, len(users), config.batch_size), desc=f"{data.name} held-out",
                  disable=not progress, unit="batch", leave=False):
        batch = users[s: s + config.batch_size]
        excluded = [seen.get(u, empty) for u in batch]
        for k in sorted(set(config.ks) | {config.ndcg_k}):
            for p, lists in rankers.run(batch, excluded, k).items():
                for u, got in zip(batch, lists):
                    rel = relevant[u]
                    hit = np.isin(got, rel)
                    if k in config.ks:
                        scores.add(p, f"recall@{k}", hit.sum() / min(k, len(rel)))
                    if k == config.ndcg_k:
                        scores.add(p, f"ndcg@{k}", ndcg(hit.astype(float),
                                                        np.ones(min(k, len(rel)))))
    return scores.summary()


def truth_metrics(data: LoggedData, pipes, config: EvalConfig,
                  progress: bool = False) -> Dict[str, Dict[str, Dict]]:
    """Synthetic world only: lists against the true top-k by affinity and by true value."""
    rankers = pipes if isinstance(pipes, Rankers) else Rankers(data, pipes)
    world = data.world
    rng = np.random.default_rng(config.seed + 1)
    users = np.sort(rng.choice(len(data.user_ids), min(config.truth_users, len(data.user_ids)),
                               replace=False))
    weights = np.asarray(config.task_weights, dtype=np.float32)
    top = max(max(config.ks), config.ndcg_k)
    scores = {"affinity": Scores(metric_names(config)), "value": Scores(metric_names(config))}
    all_items = np.arange(data.catalog.num_items)[None, :]
    # the world's ground truth broadcasts [users, items, latent]: a few users at a time
    chunk = max(1, min(config.batch_size, (1 << 25) // max(data.catalog.num_items, 1)))
    for s in tqdm(range(0, len(users), chunk), desc=f"{data.name} ground truth",
                  disable=not progress, unit="batch", leave=False):
        batch = users[s: s + chunk]
        truth = {"affinity": world.affinity(batch[:, None], all_items),
                 "value": world.true_task_probs(batch[:, None], all_items) @ weights}
        no_exclusion = [np.zeros(0, np.int64)] * len(batch)
        lists = {k: rankers.run(batch, no_exclusion, k)
                 for k in sorted(set(config.ks) | {config.ndcg_k})}
        for name, score in truth.items():
            ideal = np.argsort(-score, axis=1)[:, :top]
            for i in range(len(batch)):
                gain = score[i] - score[i].min()
                for p in lists[config.ndcg_k]:
                    for k in config.ks:
                        got = lists[k][p][i]
                        scores[name].add(p, f"recall@{k}", np.isin(got, ideal[i, :k]).sum() / k)
                    got = lists[config.ndcg_k][p][i]
                    scores[name].add(p, f"ndcg@{config.ndcg_k}",
                                     ndcg(gain[got], gain[ideal[i, : config.ndcg_k]]))
    return {name: sc.summary() for name, sc in scores.items()}


def request_histories(data: LoggedData, config: EvalConfig) -> Dict[int, np.ndarray]:
    """Each user's training-part positives as a client replaying its log would send them: raw
    item ids, most recent first (the order of the built histories, training/over_arch.py
    newest_first; a repeated item each time), at most MAX_HISTORY (data user index -> ids)."""
    train_mask, _ = holdout_split(data, config.holdout_fraction)
    train = subset(data.interactions, train_mask)
    positive = np.flatnonzero(train.labels[:, 0] > 0)
    order = positive[newest_first(train.user_index[positive], train.item_index[positive],
                                  train.timestamp[positive])]
    users, start = np.unique(train.user_index[order], return_index=True)
    ids = data.catalog.item_ids[train.item_index[order]]
    return {int(u): part[:MAX_HISTORY] for u, part in zip(users, np.split(ids, start[1:]))}


def _rows_by_user(user_index: np.ndarray, item_index: np.ndarray) -> Dict[int, np.ndarray]:
    order = np.argsort(user_index, kind="stable")
    users, start = np.unique(user_index[order], return_index=True)
    return {int(u): np.unique(part) for u, part in zip(users, np.split(item_index[order],
                                                                        start[1:]))}


def validation_data(data: LoggedData, fraction: float) -> LoggedData:
    """The training part alone (the held-out part dropped): evaluated with the same holdout
    fraction, its own latest share is the validation cut settings are chosen on."""
    train_mask, _ = holdout_split(data, fraction)
    return dataclasses.replace(data, name=f"{data.name}-validation",
                               interactions=subset(data.interactions, train_mask),
                               fingerprint={**data.fingerprint, "validation_of": fraction})


def anchors_for(data: LoggedData, config: EvalConfig) -> Tuple[list, List[str]]:
    """The anchors over the training positives of the evaluation's split, and notes on the
    ones skipped."""
    train_mask, _ = holdout_split(data, config.holdout_fraction)
    train = subset(data.interactions, train_mask)
    positive = train.labels[:, 0] > 0
    x = interaction_matrix(train.user_index[positive], train.item_index[positive],
                           len(data.user_ids), data.catalog.num_items)
    anchors, notes = [Popularity(x), ItemKNN(x)], []
    if data.catalog.num_items <= EASE_MAX_ITEMS:
        anchors.append(EASE(x))
    else:
        notes.append(f"EASE skipped: {data.catalog.num_items:,} items, its dense item x item "
                     f"matrix is limited to {EASE_MAX_ITEMS:,} (training/anchors.py)")
    return anchors, notes


def oracle_for(data: LoggedData, config: EvalConfig) -> Dict[str, Pipelines]:
    """Synthetic world only: the world's true user and item latent vectors as a pretrained
    two-tower model, served through the same ann stage (its first k = the oracle's list):
    "oracle"; and "bound", the true item vectors with each user's vector estimated from
    their training-part impressions knowing everything else (training/anchors.py
    map_user_latents): what the logs allow a model to reach."""
    if data.world is None:
        return {}
    world = data.world
    single = dataclasses.replace(config, task_weights=(1.0,))
    train_mask, _ = holdout_split(data, config.holdout_fraction)
    train = subset(data.interactions, train_mask)
    estimated = map_user_latents(world, train.user_index, train.item_index,
                                 train.labels[:, 0] > 0)
    return {name: Pipelines(data, RetrievalModel.pretrained(world.user_ids, users,
                                                            world.item_latent), single)
            for name, users in (("oracle", world.user_latent), ("bound", estimated))}


def evaluate(data: LoggedData, config: EvalConfig, train_config: TrainConfig,
             weights_dir: Optional[Path] = WEIGHTS_DIR, progress: bool = True) -> Dict:
    weights = load_or_train(data, config.holdout_fraction, train_config, weights_dir, progress)
    t0 = time.perf_counter()
    anchors, notes = anchors_for(data, config)
    rankers = Rankers(data, Pipelines(data, weights, config), anchors, oracle_for(data, config),
                      request_histories(data, config))
    result = {"name": data.name, "training": metrics_line(data, weights), "notes": notes,
              "heldout": heldout_metrics(data, rankers, config, progress)}
    if data.world is not None:
        result["truth"] = truth_metrics(data, rankers, config, progress)
    result["eval_seconds"] = round(time.perf_counter() - t0, 1)
    return result


def table(results: List[Dict], config: EvalConfig) -> str:
    metrics = metric_names(config)
    head = "| data set | relevance | users | ranker | " + " | ".join(
        m.replace("ndcg", "NDCG") for m in metrics) + " |"
    lines = [head, "|" + " --- |" * (4 + len(metrics))]

    def rows(name, relevance, block):
        for p in (p for p in ROW_NAMES if p in block):
            sign = "+" if p in PAIRED else ""
            values = " | ".join(f"{block[p][m][0]:{sign}.4f} ± {block[p][m][1]:.4f}"
                                for m in metrics)
            lines.append(f"| {name} | {relevance} | {block[p]['users']} | {ROW_NAMES[p]} "
                         f"| {values} |")

    for r in results:
        rel = "held-out clicks" if r["name"] == "synthetic" else "held-out ratings"
        rows(r["name"], rel, r["heldout"])
        for t, block in r.get("truth", {}).items():
            rows(r["name"], f"ground truth: {'affinity' if t == 'affinity' else 'true value'}",
                 block)
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-items", type=int, default=WorldConfig.num_items)
    p.add_argument("--num-users", type=int, default=WorldConfig.num_users)
    p.add_argument("--seed", type=int, default=0, help="synthetic world seed")
    p.add_argument("--movielens", type=Path, default=DEFAULT_MOVIELENS,
                   help="MovieLens-format directory (skipped when absent)")
    p.add_argument("--no-movielens", action="store_true")
    p.add_argument("--no-synthetic", action="store_true",
                   help="MovieLens only (e.g. for an ablation; do not --write the result)")
    p.add_argument("--max-users", type=int, default=EvalConfig.max_users)
    p.add_argument("--truth-users", type=int, default=EvalConfig.truth_users)
    p.add_argument("--retrieved-negatives", type=int, default=None,
                   help="OverArch negatives from the retrieval per positive (default: 4 for "
                        "sources without logged impressions, MovieLens; 0 for the synthetic "
                        "world); 0 turns them off")
    p.add_argument("--retrieval", choices=("auto", "two_tower", "linear"),
                   default=TrainConfig.retrieval,
                   help="the retrieval model (training/train.py TrainConfig.retrieval; "
                        "default: %(default)s)")
    p.add_argument("--linear-rank", type=int, default=LinearConfig.rank,
                   help="the linear history model's width (training/linear.py LinearConfig; "
                        "default: %(default)s)")
    p.add_argument("--linear-l2", type=float, default=LinearConfig.l2,
                   help="the linear history model's lambda (default: %(default)s)")
    p.add_argument("--linear-recency", type=float, default=LinearConfig.recency,
                   help="the linear history model's weighting of the newest history items, "
                        "1 / (1 + j / recency) for the j-th newest (0: EASE's plain sum; "
                        "default: %(default)s)")
    p.add_argument("--no-overarch-early-stopping", dest="overarch_early_stopping",
                   action="store_false",
                   help="serve the OverArch of its last epoch instead of the one that is best "
                        "on the validation cut (an ablation)")
    p.add_argument("--item-vectors", choices=("auto", "int8", "int8x2", "fp32"),
                   default=AnnConfig.item_vectors,
                   help="what the scorer, the history pooling and the re-scoring read: the "
                        "index's int8 vectors, those plus an int8 residual (int8x2), an fp32 "
                        "copy, or auto: fp32 up to about 1M items, int8x2 beyond (stages/ann.py "
                        "AnnConfig; default: %(default)s)")
    p.add_argument("--attention-dim", type=int, default=OverArchConfig.attention_dim,
                   help="width of the target-aware OverArch's attention over the history items "
                        "(stages/scorer.py OverArchConfig; 0: off; default: %(default)s)")
    p.add_argument("--overarch-validation", choices=("retrieved", "logged"),
                   default="retrieved" if OverArchTrainConfig.validate_on_retrieved
                   else "logged",
                   help="what the OverArch's epoch is chosen on, for sources with retrieved "
                        "negatives: the validation cut with retrieved negatives too, or its "
                        "logged interactions alone (OverArchTrainConfig.validate_on_retrieved; "
                        "default: %(default)s)")
    p.add_argument("--overarch-examples", choices=("past", "leave-one-out"),
                   default="past" if OverArchTrainConfig.past_only else "leave-one-out",
                   help="the OverArch's examples (linear history model): each sees only the "
                        "history before it, or every training positive but its own item "
                        "(OverArchTrainConfig.past_only; default: %(default)s)")
    p.add_argument("--overarch-learning-rate", type=float, default=None,
                   help="the OverArch's learning rate (default: OverArchTrainConfig's, "
                        "training/train.py OVERARCH_LEARNING_RATE_WITHOUT_IMPRESSIONS for "
                        "sources without logged impressions)")
    p.add_argument("--oversample", type=int, default=AnnConfig.oversample,
                   help="ANN candidates per requested result handed to the scorer "
                        "(stages/ann.py AnnConfig; default: %(default)s)")
    p.add_argument("--validation", action="store_true",
                   help="evaluate on the validation cut instead of the held-out part: train on "
                        "the training part minus its latest share (cut as the holdout) and "
                        "evaluate on that share (for choosing settings; do not --write it)")
    p.add_argument("--write", type=Path, default=None,
                   help="write the table and the command into this markdown file")
    a = p.parse_args()
    if a.linear_rank < 1 or not a.linear_l2 > 0 or not a.linear_recency >= 0:
        p.error("--linear-rank must be >= 1, --linear-l2 > 0 and --linear-recency >= 0")
    config = EvalConfig(max_users=a.max_users, truth_users=a.truth_users,
                        ann=AnnConfig(item_vectors=a.item_vectors, oversample=a.oversample))
    train_config = TrainConfig(retrieval=a.retrieval, linear=LinearConfig(
        rank=a.linear_rank, l2=a.linear_l2, recency=a.linear_recency),
        over_arch=OverArchTrainConfig(
        model=OverArchConfig(attention_dim=a.attention_dim),
        validate_on_retrieved=a.overarch_validation == "retrieved",
        past_only=a.overarch_examples == "past"))
    sources = [] if a.no_synthetic else [lambda: from_world(generate_world(WorldConfig(
        seed=a.seed, num_items=a.num_items, num_users=a.num_users)))]
    if not a.no_movielens:
        if a.movielens.exists():
            from training.movielens import load_movielens
            sources.append(lambda: load_movielens(a.movielens))
        else:
            print(f"{a.movielens}: absent, MovieLens skipped")
    results = []
    for load in sources:
        data = load()
        if a.validation:
            data = validation_data(data, config.holdout_fraction)
        chosen = training_config_for(data, train_config)
        if a.retrieved_negatives is not None:
            chosen = dataclasses.replace(chosen, over_arch=dataclasses.replace(
                chosen.over_arch, retrieved_negatives=a.retrieved_negatives))
        if a.overarch_learning_rate is not None:
            chosen = dataclasses.replace(chosen, over_arch=dataclasses.replace(
                chosen.over_arch, learning_rate=a.overarch_learning_rate))
        if not a.overarch_early_stopping:
            chosen = dataclasses.replace(chosen, over_arch=dataclasses.replace(
                chosen.over_arch, early_stopping=False))
        results.append(evaluate(data, config, chosen))
        print(results[-1]["training"])
    text = table(results, config)
    print(text)
    if a.write is not None:
        command = " ".join([".venv/bin/python -m training.evaluate"] + sys.argv[1:])
        write_markdown(a.write, text, results, command)


START, END = "<!-- generated by training/evaluate.py -->", "<!-- end of generated part -->"


def write_markdown(path: Path, text: str, results: List[Dict], command: str) -> None:
    """Writes the table, the training lines and the command between the START/END markers of
    `path`, keeping the text around them (a new file gets a short frame)."""
    training = "\n".join(f"- {r['training']}; evaluation {r['eval_seconds']:.0f} s"
                         + "".join(f"; {n}" for n in r.get("notes", ()))
                         for r in results)
    generated = (f"{START}\n{text}\n\nTraining (two-tower loss first -> last epoch, final "
                 f"OverArch train BCE, held-out AUC of the OverArch / of the plain dot product "
                 f"per task, training time):\n\n{training}\n\nProduced by:\n\n```bash\n"
                 f"{command}\n```\n{END}")
    path = Path(path)
    old = path.read_text() if path.exists() else f"# Retrieval quality\n\n{START}\n{END}\n"
    if START not in old or END not in old:
        raise ValueError(f"{path}: no {START} ... {END} markers to write between")
    head, rest = old.split(START, 1)
    path.write_text(head + generated + rest.split(END, 1)[1])


if __name__ == "__main__":
    main()

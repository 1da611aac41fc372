"""Training of the whole learned retrieval model from logged data, and the weights cache.

1. Retrieval: the two-tower model (training/towers.py: user tower and item tower, on the
   logged clicks, with in-batch negatives), or the linear history model (training/linear.py:
   EASE factorized into a history side and an item side, in closed form) for sources without
   logged impressions whose catalog fits its dense item x item matrix (`TrainConfig.retrieval`).
2. OverArch + task heads (training/over_arch.py): on all logged impressions, towers frozen.

`load_or_train` reuses a weights file when one was trained from the same data, holdout and
config (`build/weights/<source>-<key>.pt`), and trains and saves one otherwise.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from idmap.zero_collision import ZeroCollisionConfig, ZeroCollisionMap
from stages.user import UserTower
from training.data import LoggedData, holdout_split, split_interactions, subset
from training.linear import (
    LinearConfig,
    LinearQueries,
    covered_share,
    fit_linear,
    positive_histories,
)
from training.over_arch import (
    OverArchModel,
    OverArchTrainConfig,
    OverArchValidation,
    auc,
    chunked_logits,
    retrieved_negatives,
    task_losses,
    train_over_arch,
    user_histories,
)
from training.towers import (
    ClickHistory,
    ExampleQueries,
    ItemTower,
    TwoTowerConfig,
    ValidationCut,
    train_two_tower,
)
from training.weights import FORMAT_VERSION, TrainedWeights

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "build" / "weights"
# the latest interactions kept out of training (each user's latest, or everyone's: the
# source's split), for evaluation; the builder and `python -m training` use the same
HOLDOUT_FRACTION = 0.1
# OverArch negatives from the retrieval per positive, for sources whose logged negatives are
# random items (docs/quality.md: MovieLens recall@10 gain +0.0065 without, +0.0125 with 4)
RETRIEVED_NEGATIVES_WITHOUT_IMPRESSIONS = 4
# the OverArch's learning rate there: its examples (training/over_arch.py `past_only`) are a
# tenth of the training part, and at the default 2e-3 the trained heads lost ml-latest-small's
# validation recall@50 (0.2426 against the dot-product fit's 0.2695); docs/quality.md
OVERARCH_LEARNING_RATE_WITHOUT_IMPRESSIONS = 2e-4


@dataclass
class TrainConfig:
    seed: int = 0  # seeds parameter init, shuffling and cold-start sampling
    two_tower: TwoTowerConfig = field(default_factory=TwoTowerConfig)
    over_arch: OverArchTrainConfig = field(default_factory=OverArchTrainConfig)
    # the user id map (MPZCH); num_slots is set from the number of training users
    id_map: ZeroCollisionConfig = field(default_factory=ZeroCollisionConfig)
    # slots per training user: at half load a 16-slot probe window is practically never full
    id_slots_per_user: float = 2.0
    # the validation cut the two-tower training stops early on: the latest share of the
    # training part, cut as the source's holdout (each user's latest for MovieLens). The
    # towers train on the rest; the served history vectors and the OverArch use all of it.
    # 0: no cut, all `two_tower.epochs`
    validation_fraction: float = 0.1
    # "two_tower", "linear" (training/linear.py) or "auto": linear for sources without logged
    # impressions (their negatives are random items: MovieLens, catalogs of positives) whose
    # items fit its dense matrix, or nearly all of whose positives do (LINEAR_MIN_COVERAGE).
    # ml-latest-small's validation cut, recall@10 / @50 of (a): two-tower 0.078 / 0.229,
    # linear 0.104 / 0.266 (docs/quality.md)
    retrieval: str = "auto"
    linear: LinearConfig = field(default_factory=LinearConfig)

    def __post_init__(self) -> None:
        if self.retrieval not in ("auto", "two_tower", "linear"):
            raise ValueError(f"TrainConfig.retrieval must be auto, two_tower or linear, got "
                             f"{self.retrieval!r}")


# "auto" fits the linear model to a catalog larger than its dense matrix when the items it
# keeps hold at least this share of the positives: a ratings log whose rarely rated tail holds
# under 1% of them loses little; a catalog whose tail matters stays on the two towers (which
# describe every item by its features)
LINEAR_MIN_COVERAGE = 0.99


def retrieval_kind(data: LoggedData, config: TrainConfig) -> str:
    """The retrieval model `train` fits for `data`: "two_tower" or "linear"."""
    if config.retrieval != "auto":
        return config.retrieval
    if data.logged_impressions:
        return "two_tower"
    if data.catalog.num_items <= config.linear.max_items:
        return "linear"
    positive = data.interactions.labels[:, 0] > 0
    share = covered_share(torch.from_numpy(data.interactions.user_index[positive]),
                          torch.from_numpy(data.interactions.item_index[positive]),
                          data.catalog.num_items, config.linear.max_items)
    return "linear" if share >= LINEAR_MIN_COVERAGE else "two_tower"


def make_id_map(raw_ids: torch.Tensor, now: int, config: TrainConfig
                ) -> Tuple[ZeroCollisionMap, torch.Tensor]:
    """The user id map (MPZCH) with the users seen in training inserted at time `now`, and
    each user's row. An id whose probe window is full gets the unknown (cold-start) row, in
    training as at serving."""
    slots = max(int(config.id_slots_per_user * raw_ids.shape[0]), 1)
    id_map = ZeroCollisionMap(dataclasses.replace(config.id_map, num_slots=slots))
    return id_map, id_map.insert(raw_ids, now).rows


def rows_per_user(data: LoggedData, users_in_training: np.ndarray, now: int,
                  config: TrainConfig
                  ) -> Tuple[ZeroCollisionMap, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(id map, id-map row of every user index (unknown row for users without training
    data), feature values and weights per id-map row)."""
    seen = torch.from_numpy(data.user_ids[users_in_training])
    id_map, seen_rows = make_id_map(seen, now, config)
    rows = torch.full((data.user_ids.shape[0],), id_map.unknown_row, dtype=torch.int64)
    rows[torch.from_numpy(users_in_training)] = seen_rows
    num_rows = id_map.unknown_row + 1
    width = data.user_features.values.shape[1]
    values = torch.full((num_rows, width), -1, dtype=torch.int64)
    weights = torch.zeros((num_rows, width), dtype=torch.float32)
    values[seen_rows] = torch.from_numpy(data.user_features.values[users_in_training])
    weights[seen_rows] = torch.from_numpy(data.user_features.weights[users_in_training])
    values[id_map.unknown_row] = -1  # users that overflowed to it do not lend it features
    weights[id_map.unknown_row] = 0.0
    return id_map, rows, values, weights


def _two_tower(data: LoggedData, log, config: TrainConfig, generator: torch.Generator,
               progress: bool):
    """Trains the two towers on the training part `log` (early stopping on its validation
    cut); returns (user tower with the served history vectors, item vectors [N, D], the
    OverArch's example queries, epoch losses, validation recalls, the user side's weights,
    training users sent to the cold-start row)."""
    tt = config.two_tower
    now = int(log.timestamp.max()) // 3600 if len(log.timestamp) else 0  # hours, as id_map.ttl
    id_map, user_rows, feature_values, feature_weights = rows_per_user(
        data, np.unique(log.user_index), now, config)
    num_rows = id_map.unknown_row + 1
    users = UserTower(id_map, feature_values, feature_weights, data.user_features.num_values,
                      torch.zeros(num_rows, tt.user.history_dim), tt.user)
    items = ItemTower(torch.from_numpy(data.catalog.embeddings),
                      torch.from_numpy(data.item_features.values),
                      torch.from_numpy(data.item_features.weights),
                      data.item_features.num_values, tt.item)
    clicks = torch.from_numpy(log.labels[:, 0] > 0)
    user_index = torch.from_numpy(log.user_index)
    item_index = torch.from_numpy(log.item_index)
    tower_train, validation = torch.ones_like(clicks), None
    if config.validation_fraction > 0:
        inner, held = split_interactions(log, data.split, config.validation_fraction)
        held_clicks = torch.from_numpy(held) & clicks
        # a log too small to leave a click for validation (a handful of interactions per
        # user) trains on everything, for the configured number of epochs
        if held_clicks.any():
            tower_train = torch.from_numpy(inner)
            validation = ValidationCut(user_index[held_clicks], item_index[held_clicks],
                                       user_index[tower_train], item_index[tower_train],
                                       seed=config.seed)
    fit = clicks & tower_train
    history = ClickHistory(user_index[fit], item_index[fit], len(data.user_ids))
    tower_losses, validation_recalls = train_two_tower(
        ExampleQueries(users, user_rows, history), items, user_index[fit], item_index[fit], tt,
        generator, progress, validation)

    item_vectors = items.all_items()
    # the served history vectors and the OverArch's: every training click (the validation
    # cut's too), none left out
    history = ClickHistory(user_index[clicks], item_index[clicks], len(data.user_ids))
    history.refresh(item_vectors)
    queries = ExampleQueries(users, user_rows, history)
    users.history[user_rows] = history.all_users()
    users.history[id_map.unknown_row] = 0.0
    user_side = {"kind": "two_tower", "config": asdict(tt.user),
                 "id_map": asdict(dataclasses.replace(config.id_map,
                                                      num_slots=id_map.num_slots)),
                 "feature_values": feature_values, "feature_weights": feature_weights,
                 "history": users.history.clone(),
                 "num_feature_values": data.user_features.num_values,
                 "state": users.state_dict()}
    # training users the id map sent to the cold-start row (full windows)
    overflow = int((user_rows[torch.from_numpy(np.unique(log.user_index))]
                    == id_map.unknown_row).sum())
    return users, item_vectors, queries, tower_losses, validation_recalls, user_side, overflow


def train(data: LoggedData, train_mask: np.ndarray, config: TrainConfig = TrainConfig(),
          progress: bool = True, holdout_mask: Optional[np.ndarray] = None) -> TrainedWeights:
    """Trains the towers, then the OverArch, on the interactions selected by `train_mask`."""
    t0 = time.perf_counter()
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    log = subset(data.interactions, train_mask)

    clicks = torch.from_numpy(log.labels[:, 0] > 0)
    user_index = torch.from_numpy(log.user_index)
    item_index = torch.from_numpy(log.item_index)
    kind = retrieval_kind(data, config)
    if kind == "linear":
        t_fit = time.perf_counter()
        fit = fit_linear(user_index[clicks], item_index[clicks],
                         torch.from_numpy(log.timestamp)[clicks], len(data.user_ids),
                         data.catalog.num_items, config.linear, config.seed)
        item_vectors = fit.item_vectors
        queries = LinearQueries(fit, fit.histories)
        tower_losses, validation_recalls = [], []
        # users with a positive on a kept item: the others get the cold start
        has_clicks = fit.histories.offsets[1:] > fit.histories.offsets[:-1]
        user_side = {"kind": "linear", "config": asdict(config.linear),
                     "raw_ids": torch.from_numpy(data.user_ids)[has_clicks],
                     "user_vectors": fit.user_vectors[has_clicks],
                     "cold_start": fit.cold_start, "history_vectors": fit.history_vectors,
                     "fit_seconds": round(time.perf_counter() - t_fit, 1)}
        id_overflow = 0

        def serving_queries(rows: torch.Tensor) -> torch.Tensor:  # data user index
            # as served: users without training positives are not in the table
            return torch.where(has_clicks[rows].unsqueeze(1), fit.user_vectors[rows],
                               fit.cold_start)
    else:
        users, item_vectors, queries, tower_losses, validation_recalls, user_side, \
            id_overflow = _two_tower(data, log, config, generator, progress)

        def serving_queries(rows: torch.Tensor) -> torch.Tensor:
            return users(torch.from_numpy(data.user_ids)[rows])
    model = OverArchModel(int(item_vectors.shape[1]), data.catalog.num_items, len(data.tasks),
                          config.over_arch.model)
    labels = torch.from_numpy(log.labels)
    oa = config.over_arch
    # the OverArch's validation cut (its epoch is chosen on it): the latest share of the
    # training part, cut as the holdout; it trains on the rest
    validation = None
    if config.validation_fraction > 0:
        inner, held = split_interactions(log, data.split, config.validation_fraction)
        if held.any() and inner.any():
            cut, rest = torch.from_numpy(held), torch.from_numpy(inner)
            validation = OverArchValidation(user_index[cut], item_index[cut], labels[cut])
            user_index, item_index, labels = user_index[rest], item_index[rest], labels[rest]
    # what the target-aware OverArch attends over: each user's training positives, newest
    # first (the built history the `ann` stage serves); every training click, as the queries
    histories = user_histories(log.user_index[log.labels[:, 0] > 0],
                               log.item_index[log.labels[:, 0] > 0],
                               log.timestamp[log.labels[:, 0] > 0], len(data.user_ids))
    added_negatives = 0
    train_queries, train_histories = queries, histories
    past_only = oa.past_only and kind == "linear" and validation is not None
    if past_only:
        (train_queries, train_histories, validation, user_index, item_index, labels,
         added_negatives) = _past_only_examples(data, log, inner, fit, validation, config,
                                                item_vectors, generator)
    elif oa.retrieved_negatives > 0:
        with torch.no_grad():
            query = serving_queries(torch.arange(len(data.user_ids)))
        neg_users, neg_items = retrieved_negatives(
            query, item_vectors, user_index, item_index, labels[:, 0] > 0,
            oa.retrieved_negatives, oa.negative_pool, generator)
        added_negatives = int(neg_users.numel())
        user_index = torch.cat([user_index, neg_users])
        item_index = torch.cat([item_index, neg_items])
        labels = torch.cat([labels, torch.zeros(added_negatives, labels.shape[1])])
    if oa.retrieved_negatives > 0 and oa.validate_on_retrieved and validation is not None:
        # the epoch is chosen on the choice the OverArch serves, reordering what the
        # retrieval found: the validation positives against retrieved negatives too (unseen
        # in the whole training part)
        with torch.no_grad():
            query = serving_queries(torch.arange(len(data.user_ids))) \
                if validation.queries is None else validation.queries.all_users()
        held_positive = torch.from_numpy(held) & torch.from_numpy(log.labels[:, 0] > 0)
        val_users, val_items = retrieved_negatives(
            query, item_vectors, torch.from_numpy(log.user_index),
            torch.from_numpy(log.item_index), held_positive, oa.retrieved_negatives,
            oa.negative_pool, generator)
        validation = validation._replace(
            user_index=torch.cat([validation.user_index, val_users]),
            item_index=torch.cat([validation.item_index, val_items]),
            labels=torch.cat([validation.labels, torch.zeros(len(val_users),
                                                             labels.shape[1])]))
    bce_history, overarch_aucs = train_over_arch(model, train_queries, item_vectors,
                                                 user_index, item_index, labels, oa, generator,
                                                 progress, validation, train_histories)

    metrics: Dict = {"tower_loss": [round(x, 4) for x in tower_losses],
                     "validation_recall@50": [round(x, 4) for x in validation_recalls],
                     "overarch_bce": [[round(x, 4) for x in e] for e in bce_history],
                     # validation AUC before training (the fit on the dot product) and after
                     # each epoch; the served OverArch is the best one's
                     "overarch_validation_auc": [round(x, 4) for x in overarch_aucs],
                     "overarch_kept_epoch": (len(overarch_aucs) - 1 - overarch_aucs[::-1].index(
                         max(overarch_aucs))) if overarch_aucs and oa.early_stopping
                     else len(bce_history),
                     "train_impressions": int(log.labels.shape[0]),
                     "train_clicks": int(clicks.sum()),
                     "retrieved_negatives": added_negatives,
                     "retrieval": kind,
                     # training users the id map sent to the cold-start row (full windows)
                     "id_map_overflow": id_overflow}
    if holdout_mask is not None and holdout_mask.any():
        held = subset(data.interactions, holdout_mask)
        with torch.no_grad():
            u = serving_queries(torch.from_numpy(held.user_index))
            rows = torch.from_numpy(held.item_index)
            logits = chunked_logits(model, u, rows, torch.from_numpy(held.user_index),
                                    histories, item_vectors)
            dot = (u * item_vectors[rows]).sum(1)
        y = torch.from_numpy(held.labels)
        metrics["holdout_bce"] = [round(x, 4) for x in task_losses(logits, y).tolist()]
        metrics["holdout_auc"] = [round(auc(logits[:, t].numpy(), held.labels[:, t]), 4)
                                  for t in range(len(data.tasks))]
        metrics["holdout_auc_dot"] = [round(auc(dot.numpy(), held.labels[:, t]), 4)
                                      for t in range(len(data.tasks))]
    metrics["train_seconds"] = round(time.perf_counter() - t0, 1)

    return TrainedWeights(
        tasks=tuple(data.tasks),
        user_tower=user_side,
        item_vectors=item_vectors.contiguous(),
        over_arch={"config": asdict(config.over_arch.model),
                   "state": model.over_arch.state_dict()},
        item_extra=model.item_extra.weight.detach().clone(),
        histories=served_histories(data, histories),
        metrics=metrics, fingerprint=data.fingerprint)


def _linear_histories(part, fit):
    """The users' histories of an interaction log as the linear model pools them: distinct
    positives on the items `fit` kept, newest first, at most MAX_HISTORY."""
    clicks = part.labels[:, 0] > 0
    return positive_histories(torch.from_numpy(part.user_index[clicks]),
                              torch.from_numpy(part.item_index[clicks]),
                              torch.from_numpy(part.timestamp[clicks]),
                              len(fit.histories.offsets) - 1, fit.kept)


def _histories_of(part, num_users: int):
    clicks = part.labels[:, 0] > 0
    return user_histories(part.user_index[clicks], part.item_index[clicks],
                          part.timestamp[clicks], num_users)


def _past_only_examples(data: LoggedData, log, inner: np.ndarray, fit, validation, config,
                        item_vectors: torch.Tensor, generator: torch.Generator):
    """The OverArch's examples when each sees only its past (OverArchTrainConfig.past_only):
    the latest share of the part before the validation cut, with retrieved negatives, their
    user vectors and histories made of the earlier part; the validation cut's made of
    everything before it. Returns (queries, histories, validation, user_index, item_index,
    labels, retrieved negatives added)."""
    oa = config.over_arch
    num_users = len(data.user_ids)
    before_cut = subset(log, inner)
    earlier, recent = split_interactions(before_cut, data.split, config.validation_fraction)
    past = subset(before_cut, earlier)
    queries = LinearQueries(fit, _linear_histories(past, fit), leave_one_out=False)
    histories = _histories_of(past, num_users)
    validation = validation._replace(
        queries=LinearQueries(fit, _linear_histories(before_cut, fit), leave_one_out=False),
        histories=_histories_of(before_cut, num_users))
    examples = subset(before_cut, recent)
    user_index = torch.from_numpy(examples.user_index)
    item_index = torch.from_numpy(examples.item_index)
    labels = torch.from_numpy(examples.labels)
    added = 0
    if oa.retrieved_negatives > 0:
        # negatives unseen in the whole training part (an earlier rating is no negative)
        everyone = torch.from_numpy(log.user_index)
        positives = torch.cat([labels[:, 0] > 0, torch.zeros(len(everyone), dtype=torch.bool)])
        # drawn as the retrieval would have shown them then: from the examples' own queries
        query = queries.all_users()
        neg_users, neg_items = retrieved_negatives(
            query, item_vectors, torch.cat([user_index, everyone]),
            torch.cat([item_index, torch.from_numpy(log.item_index)]), positives,
            oa.retrieved_negatives, oa.negative_pool, generator)
        added = int(neg_users.numel())
        user_index = torch.cat([user_index, neg_users])
        item_index = torch.cat([item_index, neg_items])
        labels = torch.cat([labels, torch.zeros(added, labels.shape[1])])
    return queries, histories, validation, user_index, item_index, labels, added


def served_histories(data: LoggedData, histories) -> Dict:
    """The built histories the `ann` stage serves (stages/history.py BuiltHistory): the users
    with at least one, by raw id, their items as catalog rows."""
    lengths = histories.offsets[1:] - histories.offsets[:-1]
    users = torch.nonzero(lengths > 0).squeeze(1)
    offsets = torch.zeros(users.numel() + 1, dtype=torch.int64)
    torch.cumsum(lengths[users], 0, out=offsets[1:])
    return {"user_ids": torch.from_numpy(data.user_ids)[users].to(torch.int64),
            "offsets": offsets, "items": histories.items.clone()}


def metrics_line(data: LoggedData, weights: TrainedWeights) -> str:
    m = weights.metrics
    tasks = data.tasks
    if m.get("retrieval") == "linear":
        spec = weights.user_tower
        parts = [f"{data.name}: linear history model rank {spec['config']['rank']}, lambda "
                 f"{spec['config']['l2']:g}, fitted in {spec['fit_seconds']:.0f} s"]
    else:
        loss = m["tower_loss"] or [float("nan")]
        parts = [f"{data.name}: two-tower loss {loss[0]:.3f} -> {loss[-1]:.3f}"]
    recalls = m.get("validation_recall@50") or []
    if recalls:
        parts.append(f"validation recall@50 (dot product) {recalls[0]:.4f} -> best "
                     f"{max(recalls):.4f} at epoch {recalls.index(max(recalls)) + 1} of "
                     f"{len(recalls)}")
    parts.append("OverArch BCE " + " ".join(f"{t} {v:.4f}" for t, v in zip(
        tasks, m["overarch_bce"][-1])))
    aucs = m.get("overarch_validation_auc") or []
    if aucs:
        parts.append(f"OverArch validation AUC {aucs[0]:.3f} (dot product fit) -> "
                     + ", ".join(f"{a:.3f}" for a in aucs[1:])
                     + f", served epoch {m.get('overarch_kept_epoch', len(aucs) - 1)}")
    if "holdout_auc" in m:
        parts.append("held-out AUC OverArch/dot " + " ".join(
            f"{t} {a:.3f}/{d:.3f}" for t, a, d in zip(tasks, m["holdout_auc"],
                                                       m["holdout_auc_dot"])))
    parts.append(f"{m['train_seconds']:.0f} s")
    return "; ".join(parts)


def training_config_for(data: LoggedData, config: TrainConfig = TrainConfig()) -> TrainConfig:
    """`config`, for a source whose negatives are random items rather than logged impressions:
    with retrieved negatives for the OverArch (OverArchTrainConfig.retrieved_negatives) and its
    learning rate for such sources, unless the config sets others."""
    if data.logged_impressions:
        return config
    over_arch = config.over_arch
    if over_arch.retrieved_negatives == 0:
        over_arch = dataclasses.replace(
            over_arch, retrieved_negatives=RETRIEVED_NEGATIVES_WITHOUT_IMPRESSIONS)
    if over_arch.learning_rate == OverArchTrainConfig.learning_rate:
        over_arch = dataclasses.replace(
            over_arch, learning_rate=OVERARCH_LEARNING_RATE_WITHOUT_IMPRESSIONS)
    return dataclasses.replace(config, over_arch=over_arch)


def weights_path(data: LoggedData, holdout_fraction: float, config: TrainConfig,
                 weights_dir: Path) -> Path:
    key = json.dumps({"data": data.fingerprint, "holdout_fraction": holdout_fraction,
                      "train": asdict(config), "format": FORMAT_VERSION},
                     sort_keys=True, default=str)
    return Path(weights_dir) / f"{data.name}-{hashlib.sha1(key.encode()).hexdigest()[:12]}.pt"


def load_or_train(data: LoggedData, holdout_fraction: float, config: TrainConfig = TrainConfig(),
                  weights_dir: Optional[Path] = WEIGHTS_DIR, progress: bool = True,
                  retrain: bool = False) -> TrainedWeights:
    """Weights trained on all but the latest `holdout_fraction` of the interactions: loaded
    from `weights_dir` when a matching file exists, else trained (and saved there unless
    `weights_dir` is None)."""
    path = None if weights_dir is None else weights_path(data, holdout_fraction, config,
                                                         weights_dir)
    if path is not None and path.exists() and not retrain:
        return TrainedWeights.load(path)
    train_mask, holdout_mask = holdout_split(data, holdout_fraction)
    weights = train(data, train_mask, config, progress, holdout_mask)
    if path is not None:
        weights.save(path)
    return weights


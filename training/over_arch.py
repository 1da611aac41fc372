"""Training of the OverArch and its task heads on the logged impressions.

The towers are frozen: the OverArch reads the same user vector the ANN queries with (the one
the `ann` stage hands to the scorer) and the same item vectors the ANN indexes. Every logged
impression is an example with one binary label per task; the loss is the mean over tasks of
the binary cross-entropy of the task's head. An example's user vector leaves the example's own
item out of the user's history (training/towers.py `ExampleQueries`), as it is absent from the
history of a user the model is asked about at serving.

The target-aware part of the OverArch (stages/scorer.py) attends over each example's history
items: the user's training positives, newest first, at most ATTENTION_HISTORY (what the builder
serves as the built history, `user_histories`), without the example's own item.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import List, NamedTuple, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from stages.history import ATTENTION_HISTORY
from stages.scorer import OverArch, OverArchConfig
from training.towers import ExampleQueries, split_parameters


@dataclass
class OverArchTrainConfig:
    model: OverArchConfig = field(default_factory=OverArchConfig)
    epochs: int = 3  # passes over the training impressions
    batch_size: int = 2048
    learning_rate: float = 2e-3  # Adam (dense parameters) and SparseAdam (item extras)
    # L2 penalty on the free per-item vectors of a batch: items with a handful of impressions
    # would otherwise memorise their labels
    item_extra_l2: float = 1e-2
    # share of examples scored with the cold-start user vector (what unknown users get)
    cold_start_rate: float = 0.05
    # impressions the initial logistic fit of the labels on the dot product reads
    init_sample: int = 200_000
    # Negatives the retrieval would have shown: per positive impression, this many unseen
    # items drawn from the user's `negative_pool` nearest items under the trained towers.
    # For sources without logged impressions (MovieLens: its negatives are random items,
    # which the dot product already ranks low) the OverArch then learns what it is used for:
    # reordering the ANN's candidates. 0 (the synthetic world's default: its impressions are
    # what a recommender showed) adds none.
    retrieved_negatives: int = 0
    negative_pool: int = 200
    # keep the epoch (0 = the logistic fit on the dot product alone, before any training)
    # whose held-out AUC, mean over tasks, is best on the validation cut the caller passes.
    # ml-latest-small's validation cut: the trained OverArch's AUC fell below the dot
    # product's (0.78 vs 0.83) and its lists lost 13% of recall@10, so there the fit is kept
    early_stopping: bool = True
    # with retrieved negatives: the validation cut gets them too (as many per positive), so
    # that the epoch is chosen on what the OverArch serves, reordering the retrieval's
    # candidates, not on telling positives from random items (which the dot product does
    # best: ml-latest-small's validation AUC 0.966 for the fit against 0.923 after an epoch)
    validate_on_retrieved: bool = True
    # Sources with retrieved negatives, linear history model: every example sees only the
    # history before it, as served (a request's history never holds what it is asked to
    # predict). The OverArch then trains on the latest share of the training part before its
    # validation cut (cut as the holdout), its user vectors and histories made of what comes
    # earlier, and is validated on the cut with the user vectors of everything before the
    # cut. False: leave-one-out over all training positives (a positive's user vector then
    # holds the items rated in the same session, after it, which no served request has)
    past_only: bool = True


class OverArchModel(nn.Module):
    """The OverArch with its trainable per-item vectors (zero-initialised: an item never seen
    in training is scored from its item vector alone)."""

    def __init__(self, dim: int, num_items: int, num_tasks: int, config: OverArchConfig):
        super().__init__()
        self.over_arch = OverArch(dim, num_tasks, config)
        self.item_extra = nn.Embedding(num_items, config.item_extra_dim, sparse=True)
        nn.init.zeros_(self.item_extra.weight)

    def forward(self, user: torch.Tensor, items: torch.Tensor, item_rows: torch.Tensor,
                history: Optional[torch.Tensor] = None,
                item_table: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One candidate per example: user [B, D], items [B, D], rows [B], history int64
        [B, L] the example's history items (catalog rows, -1 padded; the example's own item is
        left out here) read from item_table [N, D] -> logits [B, T]."""
        extra = self.item_extra(item_rows)
        keys, mask = None, None
        if history is not None and item_table is not None and self.over_arch.attends:
            # gather, then project (as served): the backward of a gather from a projected
            # table accumulates in a thread-dependent order, and training must be repeatable
            keys = self.over_arch.project_history(item_table[history.clamp(min=0)])
            mask = (history >= 0) & (history != item_rows.unsqueeze(1))
        return self.over_arch(user, items.unsqueeze(1), extra.unsqueeze(1), keys,
                              mask).squeeze(1)


class UserHistories(NamedTuple):
    """Each user's history for the target-aware OverArch: their distinct positives, newest
    first, at most ATTENTION_HISTORY, as catalog rows. User u's are
    items[offsets[u]:offsets[u+1]]."""

    offsets: torch.Tensor  # int64 [U + 1]
    items: torch.Tensor  # int64 [M]

    def padded(self, users: torch.Tensor) -> torch.Tensor:
        """int64 [len(users), L] the users' histories, -1 padded (L >= 1)."""
        lengths = (self.offsets[1:] - self.offsets[:-1])[users]
        width = max(1, int(lengths.max())) if users.numel() else 1
        steps = torch.arange(width).unsqueeze(0)
        valid = steps < lengths.unsqueeze(1)
        at = (self.offsets[users].unsqueeze(1) + steps).clamp(max=max(len(self.items) - 1, 0))
        items = self.items[at] if len(self.items) else torch.zeros_like(at)
        return torch.where(valid, items, -1)


def newest_first(user_index: np.ndarray, item_index: np.ndarray, timestamp: np.ndarray
                 ) -> np.ndarray:
    """The order of interactions by user, then newest first (ties in time: the higher catalog
    row first): the order of every history, built or sent as a request's."""
    return np.lexsort((-item_index, -timestamp, user_index))


def user_histories(user_index: np.ndarray, item_index: np.ndarray, timestamp: np.ndarray,
                   num_users: int, max_len: int = ATTENTION_HISTORY) -> UserHistories:
    """The histories of positive (user, item, time) interactions (a repeated item counts once,
    at its latest time; `newest_first` order)."""
    order = newest_first(user_index, item_index, timestamp)
    users, items = user_index[order], item_index[order]
    _, first = np.unique(users.astype(np.int64) * (int(items.max(initial=0)) + 1) + items,
                         return_index=True)
    keep = np.sort(first)
    users, items = users[keep], items[keep]
    starts = np.searchsorted(users, users, side="left")
    rank = np.arange(len(users)) - starts
    users, items = users[rank < max_len], items[rank < max_len]
    offsets = np.zeros(num_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(users, minlength=num_users), out=offsets[1:])
    return UserHistories(torch.from_numpy(offsets), torch.from_numpy(items.astype(np.int64)))


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (rank statistic; ties get their mean rank)."""
    pos = labels > 0
    if pos.all() or not pos.any():
        return float("nan")
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # mean rank of tied groups
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    mean_rank = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(mean_rank, counts)
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def task_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-task mean binary cross-entropy, [T]."""
    return F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(0)


@torch.no_grad()
def init_from_dot(model: OverArchModel, dot: torch.Tensor, labels: torch.Tensor,
                  steps: int = 50) -> None:
    """Starts the OverArch's per-task dot term at the logistic fit
    p_t = sigmoid(a_t * <u, v> + b_t) of the labels, so that training begins from the
    calibrated retrieval score (a logistic fit per task on the dot product)."""
    scale = torch.ones(labels.shape[1], requires_grad=True)
    bias = torch.zeros(labels.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([scale, bias], max_iter=steps)

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(dot[:, None] * scale + bias, labels)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    model.over_arch.dot_scale.copy_(scale.detach())
    model.over_arch.head_out_bias.copy_(bias.detach())


class OverArchValidation(NamedTuple):
    """Impressions kept out of the OverArch's training to choose its epoch on, and (None: the
    training's) the user side and histories their examples read."""

    user_index: torch.Tensor  # int64 [V]
    item_index: torch.Tensor  # int64 [V]
    labels: torch.Tensor  # float32 [V, T]
    queries: Optional[object] = None
    histories: Optional[UserHistories] = None


@torch.no_grad()
def chunked_logits(model: OverArchModel, user: torch.Tensor, rows: torch.Tensor,
                   user_index: torch.Tensor, histories: Optional[UserHistories],
                   item_vectors: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """The OverArch's logits [E, T] of E examples (user vectors [E, D], item rows [E], data
    user index [E] whose histories it attends over), `chunk` examples at a time: the
    attended history vectors are [chunk, L, D] (MovieLens' 45k validation examples at once,
    L = 100, D = 512, held 9 GB)."""
    parts = [model(user[s: s + chunk], item_vectors[rows[s: s + chunk]], rows[s: s + chunk],
                   None if histories is None else histories.padded(user_index[s: s + chunk]),
                   item_vectors)
             for s in range(0, int(rows.shape[0]), chunk)]
    return torch.cat(parts) if parts else torch.zeros((0, model.over_arch.head_out.shape[0]))


@torch.no_grad()
def validation_auc(model: OverArchModel, queries, item_vectors: torch.Tensor,
                   validation: OverArchValidation,
                   histories: Optional[UserHistories] = None, chunk: int = 2048) -> float:
    """Mean over tasks (with both labels present) of the OverArch's AUC on `validation`
    (scored `chunk` examples at a time, chunked_logits)."""
    rows = validation.item_index
    queries = queries if validation.queries is None else validation.queries
    histories = histories if validation.histories is None else validation.histories
    user = queries(validation.user_index, rows, validation.labels[:, 0] > 0,
                   torch.zeros(rows.shape, dtype=torch.bool))
    logits = chunked_logits(model, user, rows, validation.user_index, histories,
                            item_vectors, chunk).numpy()
    labels = validation.labels.numpy()
    values = [auc(logits[:, t], labels[:, t]) for t in range(labels.shape[1])]
    values = [v for v in values if v == v]  # NaN: a task without both labels
    return float(np.mean(values)) if values else float("nan")


def train_over_arch(model: OverArchModel, queries: ExampleQueries, item_vectors: torch.Tensor,
                    user_index: torch.Tensor, item_index: torch.Tensor, labels: torch.Tensor,
                    config: OverArchTrainConfig, generator: torch.Generator,
                    progress: bool = True, validation: Optional[OverArchValidation] = None,
                    histories: Optional[UserHistories] = None
                    ) -> Tuple[List[List[float]], List[float]]:
    """Trains `model` in place; returns each epoch's mean per-task BCE and, with a
    validation cut, the validation AUC before training and after each epoch (the model ends
    at the best one's state when `config.early_stopping`).

    Args:
        queries: the frozen user side: (user index, item rows, clicked, cold) -> user vectors
            (towers.py ExampleQueries, linear.py LinearQueries);
        item_vectors: [N, D] frozen item tower outputs; user_index / item_index: int64 [E]
        impressions; labels: float32 [E, T] (task 0, the click, says which impressions are in
        the user's history); histories: what the target-aware OverArch attends over (user
        index rows; None: nothing).
    """
    n = int(labels.shape[0])
    sample = torch.randperm(n, generator=generator)[: config.init_sample]
    with torch.no_grad():
        rows = item_index[sample]
        user = queries(user_index[sample], rows, labels[sample, 0] > 0,
                       torch.zeros(sample.shape, dtype=torch.bool))
        init_from_dot(model, (user * item_vectors[rows]).sum(1), labels[sample])
    sparse, dense = split_parameters(model)
    optimizers = [torch.optim.Adam(dense, lr=config.learning_rate)]
    if sparse:
        optimizers.append(torch.optim.SparseAdam(sparse, lr=config.learning_rate))
    steps = (n + config.batch_size - 1) // config.batch_size
    bar = tqdm(total=config.epochs * steps, desc="overarch", disable=not progress,
               unit="step", leave=False)
    history: List[List[float]] = []
    aucs: List[float] = []
    best_state = None
    if validation is not None:
        aucs.append(validation_auc(model, queries, item_vectors, validation, histories))
        best_state = copy.deepcopy(model.state_dict())
    model.train()
    for _ in range(config.epochs):
        order = torch.randperm(n, generator=generator)
        totals = torch.zeros(labels.shape[1])
        for s in range(steps):
            batch = order[s * config.batch_size: (s + 1) * config.batch_size]
            users, rows, y = user_index[batch], item_index[batch], labels[batch]
            cold = torch.rand(users.shape, generator=generator) < config.cold_start_rate
            with torch.no_grad():
                user = queries(users, rows, y[:, 0] > 0, cold)
            attended = None
            if histories is not None:
                # a cold-start example's user has no history either
                attended = histories.padded(users).masked_fill(cold.unsqueeze(1), -1)
            losses = task_losses(model(user, item_vectors[rows], rows, attended, item_vectors),
                                 y)
            penalty = config.item_extra_l2 * model.item_extra(rows).pow(2).sum(1).mean()
            for opt in optimizers:
                opt.zero_grad()
            (losses.mean() + penalty).backward()
            for opt in optimizers:
                opt.step()
            totals += losses.detach() * batch.numel()
            bar.update()
            bar.set_postfix(bce=f"{losses.mean().item():.4f}")
        history.append((totals / n).tolist())
        if validation is not None:
            model.eval()
            aucs.append(validation_auc(model, queries, item_vectors, validation, histories))
            model.train()
            if aucs[-1] >= max(aucs[:-1]):
                best_state = copy.deepcopy(model.state_dict())
    bar.close()
    if config.early_stopping and best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return history, aucs


def retrieved_negatives(query: torch.Tensor, item_vectors: torch.Tensor,
                        user_index: torch.Tensor, item_index: torch.Tensor,
                        positives: torch.Tensor, per_positive: int, pool: int,
                        generator: torch.Generator, chunk: int = 1024
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Hard negatives for the OverArch: for every positive impression (user u), `per_positive`
    items drawn uniformly from u's top `pool` items by query . item that u has no impression
    of in the training log.

    Args:
        query: [U, D] every user's serving query vector (user_index rows into it).
        item_vectors: [N, D]; user_index / item_index: int64 [E] training impressions;
        positives: bool [E].
    Returns:
        (user_index, item_index) of the negatives, int64 [M] each.
    """
    num_items = item_vectors.shape[0]
    pool = min(pool, num_items)
    seen = torch.unique(user_index * num_items + item_index)
    users, counts = torch.unique(user_index[positives], return_counts=True)
    out_users, out_items = [], []
    for start in range(0, len(users), chunk):
        u = users[start: start + chunk]
        top = torch.topk(query[u] @ item_vectors.T, pool, dim=1).indices  # [b, pool]
        keys = u[:, None] * num_items + top
        pos = torch.searchsorted(seen, keys).clamp(max=len(seen) - 1)
        unseen = seen[pos] != keys
        wanted = counts[start: start + chunk] * per_positive
        # uniform over each user's unseen pool items: random keys, seen ones sorted last
        noise = torch.rand(top.shape, generator=generator).masked_fill(~unseen, 2.0)
        order = torch.argsort(noise, dim=1)
        available = unseen.sum(1)
        for i in range(len(u)):
            n = int(available[i])
            if n == 0:
                continue
            draws = int(wanted[i])
            picks = order[i, torch.randint(0, n, (draws,), generator=generator)]
            out_users.append(u[i].repeat(draws))
            out_items.append(top[i, picks])
    if not out_users:
        empty = torch.zeros(0, dtype=torch.int64)
        return empty, empty
    return torch.cat(out_users), torch.cat(out_items)

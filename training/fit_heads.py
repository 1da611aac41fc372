"""Baseline retrieval weights fitted in closed form / a few LBFGS steps from the logs.

- user embedding: the normalised mean embedding of the items the user clicked (liked and
  shared items count double), in the catalog's embedding space;
- cold-start embedding: the normalised mean of all user embeddings;
- one logistic head per task over the dot product: p_t = sigmoid(scale_t * dot + bias_t).

Fast (seconds) and real: every number comes from the logged labels. The learned two-tower model
and OverArch (training/) improve on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from world.synthetic import Interactions


@dataclass
class BaselineWeights:
    user_ids: np.ndarray  # int64 [U']
    user_embeddings: np.ndarray  # float32 [U', D]
    cold_start: np.ndarray  # float32 [D]
    head_scale: np.ndarray  # float32 [T]
    head_bias: np.ndarray  # float32 [T]


def user_profiles(user_raw_ids: np.ndarray, item_embeddings: np.ndarray, log: Interactions):
    """Mean engaged-item embedding per user (users without a click are left out)."""
    weight = log.labels[:, 0] + log.labels[:, 1:].sum(1)
    keep = weight > 0
    u, i, w = log.user_index[keep], log.item_index[keep], weight[keep]
    d = item_embeddings.shape[1]
    sums = np.zeros((user_raw_ids.shape[0], d), dtype=np.float64)
    np.add.at(sums, u, item_embeddings[i] * w[:, None])
    has = np.bincount(u, minlength=user_raw_ids.shape[0]) > 0
    emb = sums[has]
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-9)
    cold = emb.mean(0)
    cold /= max(np.linalg.norm(cold), 1e-9)
    return user_raw_ids[has], emb.astype(np.float32), cold.astype(np.float32)


@dataclass
class TrainConfig:
    lbfgs_steps: int = 50  # iterations of the task-head fit


def fit_weights(world, train_mask: np.ndarray, config: TrainConfig) -> BaselineWeights:
    """Weights of the user side and scorer, from the training interactions only."""
    log = world.interactions
    train = Interactions(log.user_index[train_mask], log.item_index[train_mask],
                         log.labels[train_mask], log.timestamp[train_mask])
    return fit_baseline(world.user_ids, world.catalog.embeddings, train, config.lbfgs_steps)


def fit_baseline(user_raw_ids: np.ndarray, item_embeddings: np.ndarray, log: Interactions,
                 steps: int = 50) -> BaselineWeights:
    ids, emb, cold = user_profiles(user_raw_ids, item_embeddings, log)
    raw = user_raw_ids[log.user_index]
    order = np.argsort(ids)
    pos = np.searchsorted(ids[order], raw).clip(max=len(ids) - 1)
    user_rows = np.where(ids[order][pos] == raw, order[pos], -1)  # -1: cold start row
    table = np.concatenate([emb, cold[None]])
    dot = (table[user_rows] * item_embeddings[log.item_index]).sum(1)
    x = torch.from_numpy(dot.astype(np.float32))
    y = torch.from_numpy(log.labels)
    scale = torch.ones(y.shape[1], requires_grad=True)
    bias = torch.zeros(y.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([scale, bias], max_iter=steps)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            x[:, None] * scale + bias, y)
        loss.backward()
        return loss

    opt.step(closure)
    return BaselineWeights(ids, emb, cold, scale.detach().numpy(), bias.detach().numpy())

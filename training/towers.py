"""Two-tower retrieval model: item tower, and training of both towers with in-batch negatives.

Each logged click is a positive (user, item) pair. In a batch of B pairs every other pair's
item is a negative, and the loss is the softmax cross-entropy of the true item among the B
(sampled softmax):

    logit_ij = <u_i, v_j> / temperature - log q_j,    loss = CE(logit_i., i)

with q_j the item's share of all positives: the logQ correction removes the popularity bias
in-batch sampling would teach (popular items are over-sampled as negatives), so the dot product
estimates affinity; popularity and quality are the OverArch's job. Copies of the positive item
elsewhere in the batch are masked out rather than counted as negatives.

The user tower reads the user's history vector, the mean item vector of their clicks. A training
example's history leaves out the example's own item (leave-one-out): otherwise the tower would
learn to find the item in the history instead of predicting it. Item vectors for histories are
a snapshot of the item tower, refreshed every `history_refresh_steps`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from stages.features import FeatureBag
from stages.user import UserTower, UserTowerConfig


@dataclass
class ItemTowerConfig:
    output_dim: int = 64  # item vector width = the ANN index dimension
    # free per-item embedding (zero-initialised: items without clicks are described by content
    # and features alone). None: 32 when the source has no content vectors (MovieLens), 0 when
    # it has (the synthetic world, ~4 impressions per item: the embeddings memorise their few
    # clickers, and the OverArch, trained on the same logs, then learns to trust that)
    id_dim: Optional[int] = None
    no_content_id_dim: int = 32  # the id embedding width None resolves to without content
    feature_dim: int = 32  # item feature (category, language, tags / genres) embedding width
    hidden_dim: int = 128  # MLP hidden width


class ItemTower(nn.Module):
    """item vector = normalize(content + MLP([content, features, id_embedding])) of catalog rows.

    When the content vectors have the item vectors' width the MLP is a residual on them that
    starts at zero (an untrained tower returns the content vectors); otherwise (e.g. no content)
    the item vector is the MLP's output alone.

    Args:
        content: float32 [N, Dc] content vectors (the synthetic catalog's embeddings; Dc may
            be 0).
        feature_values, feature_weights: [N, M] categorical features as an embedding bag.
        num_feature_values: size of the shared feature table.
    """

    def __init__(self, content: torch.Tensor, feature_values: torch.Tensor,
                 feature_weights: torch.Tensor, num_feature_values: int,
                 config: ItemTowerConfig):
        super().__init__()
        n = int(content.shape[0])
        self.register_buffer("content", content.float().contiguous())
        self.register_buffer("feature_values", feature_values.to(torch.int64).contiguous())
        self.register_buffer("feature_weights", feature_weights.float().contiguous())
        id_dim = config.id_dim
        if id_dim is None:
            id_dim = 0 if content.shape[1] > 0 else config.no_content_id_dim
        self.id_embedding = nn.Embedding(n, id_dim, sparse=True)
        nn.init.zeros_(self.id_embedding.weight)
        self.features = FeatureBag(num_feature_values, config.feature_dim)
        width = int(content.shape[1]) + config.feature_dim + id_dim
        self.mlp = nn.Sequential(nn.Linear(width, config.hidden_dim), nn.ReLU(),
                                 nn.Linear(config.hidden_dim, config.output_dim))
        self.residual = int(content.shape[1]) == config.output_dim
        if self.residual:
            nn.init.zeros_(self.mlp[2].weight)
            nn.init.zeros_(self.mlp[2].bias)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        """catalog rows int64 [B] -> float32 [B, D] unit-norm item vectors."""
        x = torch.cat([self.content[rows],
                       self.features(self.feature_values[rows], self.feature_weights[rows]),
                       self.id_embedding(rows)], -1)
        out = self.mlp(x)
        if self.residual:
            out = out + self.content[rows]
        return F.normalize(out, dim=-1)

    @torch.no_grad()
    def encode(self, rows: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
        """Item vectors of catalog rows int64 [M], float32 [M, D], computed `chunk` rows at a
        time into one output (a row's vector does not depend on the rows beside it)."""
        out = torch.empty(int(rows.shape[0]), self.mlp[2].out_features)
        for s in range(0, out.shape[0], chunk):
            out[s: s + chunk] = self(rows[s: s + chunk])
        return out

    def all_items(self, chunk: int = 65536) -> torch.Tensor:
        """Item vectors of the whole catalog, float32 [N, D]."""
        return self.encode(torch.arange(self.content.shape[0]), chunk)


@dataclass
class TwoTowerConfig:
    user: UserTowerConfig = field(default_factory=UserTowerConfig)
    item: ItemTowerConfig = field(default_factory=ItemTowerConfig)
    # passes over the training clicks at most; with a validation cut (training/train.py),
    # training stops after `patience` epochs without a better validation recall and keeps the
    # best epoch's towers. MovieLens ml-latest-small, validation recall@50 of the dot product:
    # 0.195 after 4 epochs (the former fixed count), best 0.245 at epoch 20 (docs/quality.md)
    epochs: int = 30
    patience: int = 3
    batch_size: int = 1024  # in-batch negatives per positive = batch_size - 1
    # Adam (dense parameters) and SparseAdam (id embeddings). Both towers start at the
    # closed-form baseline (zero residuals); faster rates left it behind on the ground truth
    learning_rate: float = 1e-3
    temperature: float = 0.05  # softmax temperature over cosine similarities
    history_refresh_steps: int = 100  # steps between snapshots of the item vectors
    # share of examples whose user is replaced by the cold-start row: that row is what
    # unknown users get at serving, so it must be trained on something like them
    cold_start_rate: float = 0.05


def in_batch_softmax_loss(users: torch.Tensor, items: torch.Tensor, item_rows: torch.Tensor,
                          log_q: torch.Tensor, temperature: float) -> torch.Tensor:
    """Sampled-softmax loss of B positive pairs against each other's items.

    Args:
        users, items: [B, D] vectors of the positive pairs; item_rows int64 [B] their items;
        log_q: [B] log sampling probability of each item (logQ correction).
    """
    logits = users @ items.T / temperature - log_q.unsqueeze(0)
    same = item_rows.unsqueeze(0) == item_rows.unsqueeze(1)
    same.fill_diagonal_(False)
    logits = logits.masked_fill(same, float("-inf"))
    return F.cross_entropy(logits, torch.arange(users.shape[0]))


def split_parameters(*modules: nn.Module):
    """(sparse-gradient embedding weights, everything else)."""
    sparse, dense = [], []
    for module in modules:
        sparse_ids = {id(m.weight) for m in module.modules()
                      if isinstance(m, nn.Embedding) and m.sparse}
        for p in module.parameters():
            (sparse if id(p) in sparse_ids else dense).append(p)
    return [p for p in sparse if p.numel() > 0], dense


class ClickHistory:
    """Per-user sums of item vectors over the users' clicks, for (leave-one-out) history
    vectors. It holds the vectors of the clicked items only (`items`), so that a refresh costs
    the clicks, not the catalog.

    Args:
        user_index, item_rows: int64 [P] the clicks; num_users: users (data user index).
    """

    def __init__(self, user_index: torch.Tensor, item_rows: torch.Tensor, num_users: int):
        self.user_index = user_index
        self.items, self.click_item = torch.unique(item_rows, return_inverse=True)
        self.counts = torch.bincount(user_index, minlength=num_users).float()
        self.sums = torch.zeros(num_users, 0)
        self.item_vectors = torch.zeros(0, 0)  # [len(items), D], row i: items[i]'s vector

    def refresh(self, item_vectors: torch.Tensor) -> None:
        """Recomputes the sums from a snapshot of all item vectors [N, D]."""
        self._set(item_vectors.detach()[self.items])

    def refresh_from(self, encode: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Recomputes the sums from `encode(rows)`, the current vectors [M, D] of catalog rows
        [M] (ItemTower.encode), asked for the clicked items only."""
        self._set(encode(self.items).detach())

    def _set(self, clicked_vectors: torch.Tensor) -> None:
        self.item_vectors = clicked_vectors
        self.sums = torch.zeros(self.counts.shape[0], clicked_vectors.shape[1]).index_add_(
            0, self.user_index, clicked_vectors[self.click_item])

    def vectors(self, user_index: torch.Tensor, item_rows: torch.Tensor,
                leave_out: torch.Tensor) -> torch.Tensor:
        """Mean clicked-item vector of each user [B, D]; where `leave_out`, without one click
        on the example's own item (the example is one of the user's clicks: an item no user
        clicked has nothing to leave out)."""
        at = torch.searchsorted(self.items, item_rows).clamp(max=max(len(self.items) - 1, 0))
        clicked = self.items[at] == item_rows if len(self.items) else \
            torch.zeros_like(leave_out)
        out = (leave_out & clicked).float().unsqueeze(1)
        own = self.item_vectors[at] if len(self.items) else \
            torch.zeros(item_rows.shape[0], self.sums.shape[1])
        sums = self.sums[user_index] - out * own
        counts = self.counts[user_index] - leave_out.float()
        return sums / counts.clamp(min=1.0).unsqueeze(1)

    def all_users(self) -> torch.Tensor:
        """Every user's mean clicked-item vector (zeros without clicks), [U, D]."""
        return self.sums / self.counts.clamp(min=1.0).unsqueeze(1)


class ExampleQueries:
    """Query vectors of training examples: the user tower on the example's user row, with the
    user's history minus the example's own item; `cold` examples get the cold-start row and
    no history (what an unknown user gets at serving).

    Args:
        users: the user tower; user_rows: int64 [U] id-map row per data user index;
        history: the users' click history.
    """

    def __init__(self, users: UserTower, user_rows: torch.Tensor, history: ClickHistory):
        self.users = users
        self.user_rows = user_rows
        self.history = history
        self.unknown_row = int(users.id_map.unknown_row)

    def __call__(self, user_index: torch.Tensor, item_rows: torch.Tensor,
                 clicked: torch.Tensor, cold: torch.Tensor) -> torch.Tensor:
        rows = torch.where(cold, torch.full_like(user_index, self.unknown_row),
                           self.user_rows[user_index])
        hist = self.history.vectors(user_index, item_rows, clicked)
        hist = hist.masked_fill(cold.unsqueeze(1), 0.0)
        return self.users.encode(rows, hist)


class ValidationCut:
    """Recall@k of exact dot-product retrieval on a validation cut: each evaluated user's
    clicks kept out of tower training, retrieved with the user's query vector (history = all
    their training clicks) among the items they did not interact with in training.

    Up to `max_items` catalog items that is all of them. A larger catalog (the cost of an
    epoch's check would grow with it: the item tower over every item, then every user against
    every item) is stood in for by the validation clicks' items plus a seeded sample of the
    others, `max_items` at most, the same every epoch: the figure is then recall@k among those
    (higher than over the whole catalog, as the lists are shorter) and it compares epochs,
    which is what early stopping reads.

    Args:
        user_index, item_rows: int64 [V] the validation clicks; seen_users, seen_rows: int64
            [S] the training interactions (excluded from the lists); max_users: a seeded
            sample of the validation users beyond that; max_items: see above.
    """

    def __init__(self, user_index: torch.Tensor, item_rows: torch.Tensor,
                 seen_users: torch.Tensor, seen_rows: torch.Tensor, k: int = 50,
                 max_users: int = 2000, seed: int = 0, max_items: int = 1_000_000):
        users = torch.unique(user_index)
        if users.numel() > max_users:
            pick = torch.randperm(users.numel(), generator=torch.Generator().manual_seed(seed))
            users = torch.sort(users[pick[:max_users]]).values
        self.users, self.k, self.seed, self.max_items = users, k, seed, max_items
        keep = torch.isin(user_index, users)
        self.relevant = (torch.searchsorted(users, user_index[keep]), item_rows[keep])
        keep = torch.isin(seen_users, users)
        self.seen = (torch.searchsorted(users, seen_users[keep]), seen_rows[keep])
        self._lists: Optional[tuple] = None

    def candidates(self, num_items: int) -> Tuple[Optional[torch.Tensor], tuple, tuple]:
        """(the catalog rows ranked, None: all; the seen and relevant (user, column) pairs
        with columns into those rows)."""
        if self._lists is not None and self._lists[0] == num_items:
            return self._lists[1:]
        rows, seen, relevant = None, self.seen, self.relevant
        if num_items > self.max_items:
            wanted = torch.unique(self.relevant[1])
            sample = torch.randperm(num_items, generator=torch.Generator().manual_seed(
                self.seed))[: max(self.max_items - len(wanted), 0)]
            rows = torch.unique(torch.cat([wanted, sample]))

            def columns(pairs):
                at = torch.searchsorted(rows, pairs[1]).clamp(max=len(rows) - 1)
                keep = rows[at] == pairs[1]
                return pairs[0][keep], at[keep]

            seen, relevant = columns(self.seen), columns(self.relevant)
        self._lists = (num_items, rows, seen, relevant)
        return rows, seen, relevant

    @torch.no_grad()
    def recall(self, queries: ExampleQueries, items: ItemTower, chunk: int = 256) -> float:
        rows, seen, relevant_pairs = self.candidates(int(items.content.shape[0]))
        vectors = items.all_items() if rows is None else items.encode(rows)
        queries.history.refresh_from(items.encode)
        hist = queries.history.all_users()[self.users]
        query = queries.users.encode(queries.user_rows[self.users], hist)
        # users per score block: the block is [users, all items], so bound it (64 MB of
        # fp32 at most) or a large catalog's build peaks here (1M items: 1 GB per block)
        chunk = max(1, min(chunk, (1 << 24) // max(int(vectors.shape[0]), 1)))
        total = 0.0
        for s in range(0, len(self.users), chunk):
            n = min(chunk, len(self.users) - s)
            scores = query[s: s + n] @ vectors.T
            sel = (seen[0] >= s) & (seen[0] < s + n)
            scores[seen[0][sel] - s, seen[1][sel]] = float("-inf")
            top = torch.topk(scores, min(self.k, scores.shape[1]), dim=1).indices
            relevant = torch.zeros_like(scores, dtype=torch.bool)
            sel = (relevant_pairs[0] >= s) & (relevant_pairs[0] < s + n)
            relevant[relevant_pairs[0][sel] - s, relevant_pairs[1][sel]] = True
            hits = relevant.gather(1, top).sum(1).float()
            total += float((hits / relevant.sum(1).clamp(max=self.k)).sum())
        return total / len(self.users)


def parameters_copy(*modules: nn.Module) -> List[Dict[str, torch.Tensor]]:
    """Copies of the modules' parameters, to restore with `load_state_dict(copy, strict=False)`:
    the towers' buffers (the item tower holds the catalog's content vectors and features) do
    not change in training, so a copy of the best epoch's towers leaves them out."""
    return [{name: p.detach().clone() for name, p in m.named_parameters()} for m in modules]


def train_two_tower(queries: ExampleQueries, items: ItemTower, user_index: torch.Tensor,
                    item_rows: torch.Tensor, config: TwoTowerConfig,
                    generator: torch.Generator, progress: bool = True,
                    validation: Optional[ValidationCut] = None
                    ) -> Tuple[List[float], List[float]]:
    """Trains both towers in place on positive pairs (the clicks of `queries.history`);
    returns the mean loss of each epoch and, with a validation cut, each epoch's validation
    recall (the towers end at the best epoch's).

    Args:
        user_index: int64 [P] data user index; item_rows: int64 [P] catalog rows.
    """
    users = queries.users
    num_pairs = int(user_index.shape[0])
    counts = torch.bincount(item_rows, minlength=int(items.content.shape[0])).float()
    log_q_all = torch.log(counts / max(num_pairs, 1)).clamp(min=-30.0)
    sparse, dense = split_parameters(users, items)
    optimizers = [torch.optim.Adam(dense, lr=config.learning_rate)]
    if sparse:
        optimizers.append(torch.optim.SparseAdam(sparse, lr=config.learning_rate))
    steps = (num_pairs + config.batch_size - 1) // config.batch_size
    bar = tqdm(total=config.epochs * steps, desc="two-tower", disable=not progress,
               unit="step", leave=False)
    epoch_losses, recalls = [], []
    best, best_state = -1.0, None
    users.train()
    items.train()
    step = 0
    for _ in range(config.epochs):
        order = torch.randperm(num_pairs, generator=generator)
        total = 0.0
        for s in range(steps):
            batch = order[s * config.batch_size: (s + 1) * config.batch_size]
            if batch.numel() < 2:  # a softmax over one item teaches nothing
                continue
            if step % config.history_refresh_steps == 0:
                queries.history.refresh_from(items.encode)
            step += 1
            its = item_rows[batch]
            cold = torch.rand(batch.shape, generator=generator) < config.cold_start_rate
            query = queries(user_index[batch], its, torch.ones_like(cold), cold)
            loss = in_batch_softmax_loss(query, items(its), its, log_q_all[its],
                                         config.temperature)
            for opt in optimizers:
                opt.zero_grad()
            loss.backward()
            for opt in optimizers:
                opt.step()
            total += loss.item() * batch.numel()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        epoch_losses.append(total / max(num_pairs, 1))
        if validation is not None:
            recalls.append(validation.recall(queries, items))
            bar.set_postfix(loss=f"{epoch_losses[-1]:.3f}", val=f"{recalls[-1]:.4f}")
            if recalls[-1] > best:
                best = recalls[-1]
                best_state = parameters_copy(users, items)
            elif len(recalls) - 1 - recalls.index(best) >= config.patience:
                break
    bar.close()
    if best_state is not None:
        users.load_state_dict(best_state[0], strict=False)
        items.load_state_dict(best_state[1], strict=False)
    users.eval()
    items.eval()
    return epoch_losses, recalls

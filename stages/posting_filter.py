"""The baseline's filter service: exact filtering over an inverted index (posting lists).

A feature-filter service of the pre-SilverTorch architecture (Lucene / Elasticsearch style)
keeps, for every (feature, value), the items having it, and combines those sets per query. This
layer stores each posting list already in the packed-bitmap layout of filtering/bits.py, as the
nonzero words only: (word index, word bits) pairs, so a term costs min(matches, N/64) writes
and AND / OR / NOT are word-wise over N/64 int64 words. The result is exact (no false
positives or negatives) and equals `ExactFeatureFilter` (stages/filter.py), which scans the
feature matrix instead.
"""

from typing import List, Tuple

import numpy as np
import torch
from torch import nn

from filtering.bits import num_words
from stages.plan import PostfixPlan

VALUE_RANGE = 1 << 40  # key = feature_id * VALUE_RANGE + value_id; larger value ids match nothing


def build_postings(feature_matrix: np.ndarray, column_start: np.ndarray, num_items: int
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Posting lists of every (feature, value) of a feature matrix, as packed nonzero words.

    Args:
        feature_matrix: int64 [N, S] value ids, -1 = none (stages/filter.py feature_matrix).
        column_start: int64 [F + 1], feature f owns columns column_start[f]:column_start[f+1].
    Returns:
        keys int64 [K] sorted, starts int64 [K + 1], words int64 [E], bits int64 [E]: key k's
        items are the set bits of words[starts[k]:starts[k+1]] (word indexes ascending).
    """
    keys, rows = [], []
    for f in range(len(column_start) - 1):
        block = feature_matrix[:, column_start[f]:column_start[f + 1]]
        r, c = np.nonzero((block >= 0) & (block < VALUE_RANGE))
        keys.append(f * VALUE_RANGE + block[r, c])
        rows.append(r.astype(np.int64))
    key = np.concatenate(keys) if keys else np.empty(0, np.int64)
    row = np.concatenate(rows) if rows else np.empty(0, np.int64)
    # one bit per (key, row), grouped into (key, word) entries whose bits are OR-ed
    pairs = np.unique(np.stack([key, row], 1), axis=0) if len(key) else np.empty((0, 2), np.int64)
    key, row = pairs[:, 0], pairs[:, 1]
    word = row >> 6
    bit = np.left_shift(np.int64(1), (row & 63).astype(np.int64))
    entry_start = np.flatnonzero(np.r_[True, (key[1:] != key[:-1]) | (word[1:] != word[:-1])]) \
        if len(key) else np.empty(0, np.int64)
    entry_bits = np.bitwise_or.reduceat(bit, entry_start) if len(key) else bit
    entry_key, entry_word = key[entry_start], word[entry_start]
    unique_keys, first = np.unique(entry_key, return_index=True)
    starts = np.r_[first, len(entry_key)].astype(np.int64)
    assert num_items <= 0 or (len(row) == 0 or row.max() < num_items)
    return (torch.from_numpy(unique_keys.astype(np.int64)), torch.from_numpy(starts),
            torch.from_numpy(entry_word.astype(np.int64)),
            torch.from_numpy(entry_bits.astype(np.int64)))


class PostingListFilter(nn.Module):
    """Filter plans -> packed bitmaps of exactly the matching items, over posting lists.

    Args: the four tensors of `build_postings`, and the number of items N.
    """

    def __init__(self, keys: torch.Tensor, starts: torch.Tensor, words: torch.Tensor,
                 bits: torch.Tensor, num_items: int):
        super().__init__()
        self.register_buffer("keys", keys.to(torch.int64).contiguous())
        self.register_buffer("starts", starts.to(torch.int64).contiguous())
        self.register_buffer("words", words.to(torch.int64).contiguous())
        self.register_buffer("bits", bits.to(torch.int64).contiguous())
        self.num_items = int(num_items)
        self.num_words = num_words(num_items)
        # every item's bit set, tail bits of the last word clear: the empty expression, and
        # what NOT complements against (bits past N must stay 0)
        everything = torch.full((self.num_words,), -1, dtype=torch.int64)
        tail = num_items % 64
        if tail and self.num_words > 0:
            everything[-1] = (1 << tail) - 1
        self.register_buffer("everything", everything)
        self.value_range = VALUE_RANGE
        self.plan = PostfixPlan()

    def term(self, feature_id: int, value_id: int) -> torch.Tensor:
        out = torch.zeros(self.num_words, dtype=torch.int64)
        if value_id < 0 or value_id >= self.value_range or self.keys.shape[0] == 0:
            return out
        key = torch.tensor([feature_id * self.value_range + value_id], dtype=torch.int64)
        k = int(torch.searchsorted(self.keys, key)[0])
        if k < self.keys.shape[0] and int(self.keys[k]) == int(key[0]):
            lo, hi = int(self.starts[k]), int(self.starts[k + 1])
            out[self.words[lo:hi]] = self.bits[lo:hi]  # word indexes are distinct per key
        return out

    def evaluate(self, plan: torch.Tensor) -> torch.Tensor:
        """plan int64 [L, 3] -> int64 [W]; padding rows (other opcodes) are skipped."""
        steps: List[List[int]] = plan.tolist()
        truths = [self.term(row[1], row[2]) for row in self.plan.terms(steps)]
        return self.plan(steps, truths, self.everything)

    def forward(self, plans: torch.Tensor) -> torch.Tensor:
        """plans int64 [B, L, 3] -> filter bits int64 [B, W]."""
        if plans.shape[0] == 0:
            return torch.zeros(0, self.num_words, dtype=torch.int64)
        return torch.stack([self.evaluate(plans[b]) for b in range(plans.shape[0])])

"""The `filter` stage: evaluates compiled filter plans over the catalog's item features.

Input is a batch of postfix plans (filtering/expression.py) and output one packed bitmap per
query (filtering/bits.py) of exactly the items that satisfy the expression.

`BloomFilterLayer` is the served layer: the index of filtering/bloom_index.py searched by
`torch.ops.iam.bloom_search` (kernels/bloom_search.py), then an exact check of the items the
Bloom filter leaves uncertain. `ExactFeatureFilter` is the plain reference it is tested against
(and the naive baseline of benchmarks/filter_benchmark.py).
"""

from dataclasses import dataclass, field
from typing import List, Tuple

import numpy as np
import torch
from torch import nn

import kernels  # noqa: F401  (registers torch.ops.iam.bloom_search)
from filtering.bits import pack_bits
from filtering.bloom_index import (
    MODE_EXACT,
    TERM_BLOOM,
    TERM_EMPTY,
    TERM_EXACT,
    BloomIndex,
    BloomIndexConfig,
    bloom_positions,
    build_bloom_index,
)
from filtering.expression import OP_TERM
from stages.plan import PostfixPlan
from world.synthetic import Catalog


@dataclass
class FilterConfig:
    """Build knobs of the filter layer."""

    # size/accuracy of the index: which features get exact bitmaps, Bloom hashes and width
    index: BloomIndexConfig = field(default_factory=BloomIndexConfig)


def feature_matrix(catalog: Catalog) -> Tuple[torch.Tensor, torch.Tensor]:
    """int64 [N, S] value ids of all features side by side and column_start [F + 1]."""
    start = np.cumsum([0] + [f.shape[1] for f in catalog.features])
    return torch.from_numpy(np.concatenate(catalog.features, axis=1)), torch.from_numpy(start)


def build_filter_stage(catalog: Catalog, config: FilterConfig) -> nn.Module:
    """The filter layer over `catalog` (in index row order)."""
    return BloomFilterLayer(build_bloom_index(catalog.schema, catalog.features, config.index))


class ExactFeatureFilter(nn.Module):
    """Exact evaluation over a dense feature matrix: a term is `(column == value).any()` over
    the feature's columns. It is the reference the indexed filter is checked against.

    Args:
        feature_matrix: int64 [N, S], value ids of every feature side by side, padded with -1
            (a multi-valued feature takes as many columns as its longest item).
        column_start: int64 [F + 1], feature f owns columns column_start[f]:column_start[f+1].
    """

    def __init__(self, feature_matrix: torch.Tensor, column_start: torch.Tensor):
        super().__init__()
        self.register_buffer("feature_matrix", feature_matrix.to(torch.int64).contiguous())
        self.register_buffer("column_start", column_start.to(torch.int64))
        self.num_items = int(feature_matrix.shape[0])
        self.plan = PostfixPlan()

    def term(self, feature_id: int, value_id: int) -> torch.Tensor:
        lo = int(self.column_start[feature_id])
        hi = int(self.column_start[feature_id + 1])
        return (self.feature_matrix[:, lo:hi] == value_id).any(dim=1)

    def evaluate(self, plan: torch.Tensor) -> torch.Tensor:
        """plan int64 [L, 3] -> bool [N]."""
        steps: List[List[int]] = plan.tolist()
        truths = [self.term(row[1], row[2]) for row in self.plan.terms(steps)]
        everything = torch.ones(self.num_items, dtype=torch.bool,
                                device=self.feature_matrix.device)
        return self.plan(steps, truths, everything)

    def forward(self, plans: torch.Tensor) -> torch.Tensor:
        """plans int64 [B, L, 3] -> filter bits int64 [B, W]."""
        masks = [self.evaluate(plans[b]) for b in range(plans.shape[0])]
        return pack_bits(torch.stack(masks))


# A de Bruijn sequence B(2, 6): the top 6 bits of (1 << j) * _DE_BRUIJN differ for every j,
# so a 64-entry table maps them back to j with integer operations only (float log2 is not
# exact everywhere: on CUDA it may return 62.999... for 2**63).
_DE_BRUIJN = 0x07EDD5E59A4E28C2


def lowest_bit_table() -> torch.Tensor:
    """int64 [64]: table[top 6 bits of (1 << j) * _DE_BRUIJN] = j."""
    table = torch.full((64,), -1, dtype=torch.int64)
    for j in range(64):
        top = (((1 << j) * _DE_BRUIJN) % (1 << 64)) >> 58
        table[top] = j
    assert bool((table >= 0).all()), "not a de Bruijn sequence"
    return table


def set_bits(words: torch.Tensor, bit_table: torch.Tensor
             ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(position in `words`, bit 0..63) of every set bit of the int64 [n] `words`.

    Each round takes the lowest set bit of every word still nonzero, so there are as many
    rounds as the fullest word has bits, each over the words left: cheap for the few bits an
    uncertain word holds (unpacking all 64 bits of every word costs 64 elements per word).
    `bit_table` is `lowest_bit_table()`.
    """
    de_bruijn = 0x07EDD5E59A4E28C2  # _DE_BRUIJN (TorchScript does not read module globals)
    index = torch.arange(words.shape[0], dtype=torch.int64, device=words.device)
    left = words != 0
    words, index = words[left], index[left]
    found_index: List[torch.Tensor] = []
    found_bit: List[torch.Tensor] = []
    while words.numel() > 0:
        lowest = words & -words  # 1 << 63 negates to itself: the int64 minimum, bit 63
        found_index.append(index)
        found_bit.append(bit_table[((lowest * de_bruijn) >> 58) & 63])
        words = words ^ lowest
        left = words != 0
        words, index = words[left], index[left]
    if len(found_index) == 0:
        return index, index
    return torch.cat(found_index), torch.cat(found_bit)


class BloomFilterLayer(nn.Module):
    """Exact filtering over the bit-sliced index of filtering/bloom_index.py.

    1. `resolve`: every term of every plan becomes rows of the index table: one exact bitmap
       row (TERM_EXACT), the K Bloom rows (TERM_BLOOM), or none for a value no item has
       (TERM_EMPTY).
    2. `torch.ops.iam.bloom_search` evaluates the resolved plans of the whole batch: definite
       and uncertain bitmaps; items are uncertain only through Bloom terms (under NOT too: a
       negated Bloom term keeps every true match, kernels/bloom_search.py).
    3. `check_uncertain`: the uncertain (query, item) pairs of the whole batch are decided
       exactly. Every term of a pair's query is evaluated for the pair's item at once for the
       batch (the item's bit in the term's exact bitmap, or the item's own values for a Bloom
       feature, held in the module), then each query's plan combines its terms' truths over
       its pairs (stages/plan.py `PostfixPlan`, shared with the reference); passing pairs join
       `definite`.

    Output: int64 [B, W] packed bitmaps of exactly the items satisfying each plan.

    Args:
        index: the built index (tensors become buffers of the module).
    """

    def __init__(self, index: BloomIndex):
        super().__init__()
        self.register_buffer("words", index.words.contiguous())
        self.register_buffer("exact_values", index.exact_values.contiguous())
        self.register_buffer("verify_values", index.verify_values.contiguous())
        self.num_items = index.num_items
        self.num_words = int(index.words.shape[1])
        self.modes: List[int] = list(index.modes)
        self.exact_start: List[int] = index.exact_start.tolist()
        self.verify_start: List[int] = index.verify_start.tolist()
        self.num_exact_rows = index.num_exact_rows
        self.bloom_width = index.width
        self.num_hashes = index.num_hashes
        self.rows_per_term = index.num_hashes if index.width > 0 else 1
        self.register_buffer("bit_table", lowest_bit_table())
        # constants as attributes: TorchScript cannot read module-level globals
        self.op_term = OP_TERM
        self.plan = PostfixPlan()
        self.mode_exact = MODE_EXACT
        self.term_empty, self.term_exact, self.term_bloom = TERM_EMPTY, TERM_EXACT, TERM_BLOOM

    def resolve(self, plans: torch.Tensor) -> torch.Tensor:
        """plans int64 [B, L, 3] -> resolved plans int64 [B, L, 2 + R] of the op:
        (opcode, term kind, R rows of `words`, -1 = unused)."""
        ops, features = plans[:, :, 0], plans[:, :, 1]
        values = plans[:, :, 2].contiguous()
        is_term = (ops == self.op_term) & (values >= 0)  # negative ids are padding: no item
        kinds = torch.full_like(ops, self.term_empty)
        rows = torch.full((plans.shape[0], plans.shape[1], self.rows_per_term), -1,
                          dtype=torch.int64, device=plans.device)
        for f in range(len(self.modes)):
            chosen = is_term & (features == f)
            if self.modes[f] != self.mode_exact:  # values without a bitmap: Bloom rows
                positions = bloom_positions(features, values, self.num_hashes, self.bloom_width)
                kinds = torch.where(chosen, self.term_bloom, kinds)
                rows = torch.where(chosen.unsqueeze(2), positions + self.num_exact_rows, rows)
            lo, hi = self.exact_start[f], self.exact_start[f + 1]
            if hi > lo:  # values with a bitmap: that row
                known = self.exact_values[lo:hi]
                i = torch.searchsorted(known, values).clamp(max=hi - lo - 1)
                found = chosen & (known[i] == values)
                kinds = torch.where(found, self.term_exact, kinds)
                rows = torch.where(found.unsqueeze(2), -1, rows)
                rows[:, :, 0] = torch.where(found, lo + i, rows[:, :, 0])
        return torch.cat([ops.unsqueeze(2), kinds.unsqueeze(2), rows], dim=2)

    def term_truth(self, kinds: torch.Tensor, rows: torch.Tensor, features: torch.Tensor,
                   values: torch.Tensor, pair: torch.Tensor,
                   items: torch.Tensor) -> torch.Tensor:
        """Exact truth (int64 0/1) of resolved terms (kinds, rows, features, values: [E]) for
        the items of pairs `pair` [E] (`items` [P]: each pair's item)."""
        truth = torch.zeros_like(kinds)
        # exact terms: the item's bit in the term's bitmap
        at = (kinds == self.term_exact).nonzero().squeeze(1)
        item = items[pair[at]]
        word = self.words.view(-1).index_select(0, rows[at] * self.num_words + (item >> 6))
        bits = (word >> (item & 63)) & 1
        truth.index_put_((at,), bits)
        # Bloom terms: the item's own values, read once per pair
        at = (kinds == self.term_bloom).nonzero().squeeze(1)
        if at.numel() > 0:
            own = self.verify_values[items]  # [P, S]
            for f in range(len(self.modes)):
                lo, hi = self.verify_start[f], self.verify_start[f + 1]
                if hi > lo:
                    has = (own[pair[at], lo:hi] == values[at].unsqueeze(1)).any(1)
                    has = has & (features[at] == f)
                    truth.index_put_((at,), truth[at] | has.to(torch.int64))
        return truth

    def check_uncertain(self, plans: torch.Tensor, resolved: torch.Tensor,
                        queries: torch.Tensor, definite: torch.Tensor,
                        uncertain: torch.Tensor) -> None:
        """Add to `definite` the uncertain items of `queries` that satisfy their plan."""
        num_words = self.num_words
        flat = uncertain.index_select(0, queries).view(-1)
        hit = flat.nonzero().squeeze(1)
        if hit.numel() == 0:
            return
        # (query, item) pairs in order: position q * 64W + item of the [Q, 64W] bit space
        word_index, bit = set_bits(flat[hit], self.bit_table)
        position, _ = torch.sort(hit[word_index] * 64 + bit)
        pair_query, items = position // (num_words * 64), position % (num_words * 64)
        num_pairs = items.shape[0]
        # the terms of each checked plan, in plan order: a [Q, width] table of (kind, first
        # row, feature, value), padded with TERM_EMPTY
        plans, resolved = plans.index_select(0, queries), resolved.index_select(0, queries)
        is_term = resolved[:, :, 0] == self.op_term
        terms_per_query = is_term.sum(1)
        width = int(terms_per_query.max())
        term_query, term_step = is_term.nonzero().unbind(1)
        rank = torch.arange(term_query.shape[0], device=items.device) - (
            torch.cumsum(terms_per_query, 0) - terms_per_query)[term_query]
        flat_step = term_query * resolved.shape[1] + term_step
        table = torch.full((queries.shape[0], width, 4), self.term_empty, dtype=torch.int64,
                           device=items.device)
        table[term_query, rank] = torch.cat([
            resolved.reshape(-1, resolved.shape[2]).index_select(0, flat_step)[:, 1:3],
            plans.reshape(-1, 3).index_select(0, flat_step)[:, 1:3]], dim=1)
        # every term of a pair's query for the pair's item: truth [P, width]
        per_pair = table.index_select(0, pair_query).view(-1, 4)
        pair = torch.arange(num_pairs * width, device=items.device) // width
        truth = self.term_truth(per_pair[:, 0], per_pair[:, 1], per_pair[:, 2], per_pair[:, 3],
                                pair, items).view(num_pairs, width) == 1
        # each query's plan over its own pairs (a block of rows of `truth`)
        pairs_per_query: List[int] = torch.bincount(
            pair_query, minlength=queries.shape[0]).tolist()
        terms: List[int] = terms_per_query.tolist()
        steps: List[List[List[int]]] = resolved[:, :, :1].tolist()
        passed: List[torch.Tensor] = []
        start = 0
        for q in range(len(steps)):
            block = truth[start: start + pairs_per_query[q]]
            start += pairs_per_query[q]
            columns = [block[:, c] for c in range(terms[q])]
            everything = torch.ones(pairs_per_query[q], dtype=torch.bool, device=items.device)
            passed.append(self.plan(steps[q], columns, everything))
        keep = torch.cat(passed)
        items, rows = items[keep], queries[pair_query[keep]]
        definite.view(-1).index_add_(0, rows * num_words + (items >> 6),
                                     torch.ones_like(items) << (items & 63))

    def forward(self, plans: torch.Tensor) -> torch.Tensor:
        """plans int64 [B, L, 3] (filtering/expression.py) -> filter bits int64 [B, W]."""
        resolved = self.resolve(plans)
        definite, uncertain = torch.ops.iam.bloom_search(resolved, self.words, self.num_items)
        queries = (resolved[:, :, 1] == self.term_bloom).any(1).nonzero().squeeze(1)
        if queries.numel() > 0:
            self.check_uncertain(plans, resolved, queries, definite, uncertain)
        return definite

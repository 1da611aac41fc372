"""The filter index: exact bitmaps for low-cardinality features and popular values, a
bit-sliced Bloom filter for the rest, and the item values the exact check needs.

Every (feature, value) pair of every item goes into one of two structures:

- **exact bitmaps**: one packed bitmap per value, bit j of word w = item row w*64 + j has the
  value. A term over such a value is one row of words and is exact. Every value of a feature
  with few distinct values (`BloomIndexConfig.exact_max_values`: category, language, tags)
  gets one, and so does every *popular* value of the other features
  (`exact_min_share`: the biggest creators), whose items would otherwise all be left
  uncertain by the Bloom filter and checked one by one.
- **Bloom filter** (the other creators): the anchor system's bit-sliced layout. Item r owns
  `width` bit positions; position i of items w*64..w*64+63 is the 64-bit word `bloom[i, w]`,
  so one load tests one position for 64 items. A pair (f, v) sets the `num_hashes` positions
  `bloom_positions(f, v)` of its item; a term is the AND of those rows: a superset of the items
  having the value (false positives, never false negatives). `width = max bloom values per item
  * num_hashes * width_multiplier` bits, as in the anchor (one width for the whole catalog: the
  anchor's per-bundle width only saves memory when values per item vary between bundles,
  which they do not in this catalog).

Both structures are rows of one int64 table `words` [R, W] (W = ceil(N / 64)): rows
0..E-1 are the exact bitmaps (value i of `exact_values` has row i), rows E..E+width-1 the
Bloom positions. The model layer (stages/filter.py) resolves each plan term to rows of this
table and calls `torch.ops.iam.bloom_search` (kernels/bloom_search.py); the values of the
Bloom-mode features (`verify_values`) let it check the items a Bloom term leaves uncertain.

Values are the catalog's value ids; negative ids are padding (items.csv omits them), so no
item has a negative value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Sequence

import numpy as np
import torch

from world.schema import Schema

# Kind of a resolved plan term (column 1 of a resolved plan, see kernels/bloom_search.py).
TERM_EMPTY = 0  # no item has the value: exactly no items
TERM_EXACT = 1  # the AND of its rows is exactly the items having the value
TERM_BLOOM = 2  # the AND of its rows is a superset of them

MODE_EXACT = 0
MODE_BLOOM = 1



@dataclass
class BloomIndexConfig:
    """Size/accuracy knobs of the filter index."""

    # Features with at most this many distinct values get one exact bitmap per value
    # (N/8 bytes each); the others go into the Bloom filter. 64 keeps category (50 values),
    # language (10) and tags (40) exact: 12.5 bytes per item, no uncertainty.
    exact_max_values: int = 64
    # A value of a Bloom-mode feature that at least this share of the items have gets an exact
    # bitmap too (at most 1/share of them per feature: <= 64 bytes per item at 1/512). Every
    # item of a Bloom term is uncertain and checked one by one, so popular values are cheaper
    # as bitmaps. Measured on the 1M-item synthetic catalog (benchmarks/filter_benchmark.py
    # queries, depth 2): 1/256 gives 16 creators a bitmap (2 bytes per item) and leaves 9,095
    # uncertain pairs per 64 queries; 1/512, 38 creators (4.75 bytes), 2,569 pairs; 1/1024,
    # 96 creators (12 bytes), 1,108 pairs.
    exact_min_share: float = 1 / 512
    # Bloom hash positions per (feature, value). With width_multiplier 6 that is 30 bits per
    # value and a false-positive rate near (1 - e^(-1/6))^5 = 8.5e-5 (measured:
    # benchmarks/filter_benchmark.py); the anchor's K=3 x 5 gives 15 bits and about 6e-3.
    num_hashes: int = 5
    # Bloom bits per value and per hash (the anchor's b_multiplier, 5 to 10 there).
    width_multiplier: float = 6.0


def _fmix64(h: torch.Tensor) -> torch.Tensor:
    """murmur3's 64-bit finaliser on int64 bits: wrapping multiplies, and arithmetic shifts
    masked to logical ones. Constants are locals because TorchScript compiles this function
    and cannot read module globals; the multipliers are 0xFF51AFD7ED558CCD and
    0xC4CEB9FE1A85EC53 as int64 bit patterns."""
    low_31_bits = 0x7FFF_FFFF  # what survives a logical shift right by 33
    h = h ^ ((h >> 33) & low_31_bits)
    h = h * -49064778989728563
    h = h ^ ((h >> 33) & low_31_bits)
    h = h * -4265267296055464877
    return h ^ ((h >> 33) & low_31_bits)


def bloom_positions(feature_ids: torch.Tensor, value_ids: torch.Tensor, num_hashes: int,
                    width: int) -> torch.Tensor:
    """Bloom bit positions of (feature, value) pairs: int64 [..., num_hashes] in [0, width).

    position k = fmix64(fmix64(value + fmix64(feature)) + k * golden) mod width. The build and
    the model layer (TorchScript) both call this one function, so they agree bit for bit.
    Positions of one pair may coincide (probability ~ K^2 / (2 * width)); that only costs a
    little accuracy, never correctness.
    """
    golden = -7046029254386353131  # 0x9E3779B97F4A7C15, the step between hash seeds
    key = _fmix64(value_ids.to(torch.int64) + _fmix64(feature_ids.to(torch.int64)))
    seeds = torch.arange(num_hashes, dtype=torch.int64, device=key.device) * golden
    return (_fmix64(key.unsqueeze(-1) + seeds) & 0x7FFF_FFFF_FFFF_FFFF) % width


@dataclass
class BloomIndex:
    """The built index (tensors on the CPU, in index row order)."""

    num_items: int
    modes: List[int]  # per feature: MODE_EXACT (every value has a bitmap) or MODE_BLOOM
    words: torch.Tensor  # int64 [E + width, W]: exact bitmaps, then Bloom positions
    exact_values: torch.Tensor  # int64 [E]: values with a bitmap, sorted within each feature
    exact_start: torch.Tensor  # int64 [F + 1]: feature f's are [exact_start[f], ...[f+1])
    width: int  # Bloom bits per item (rows E..E+width-1 of `words`); 0 without Bloom features
    num_hashes: int
    verify_values: torch.Tensor  # int16/32/64 [N, S]: values of the Bloom features, -1 padded
    verify_start: torch.Tensor  # int64 [F + 1]: columns of each feature (none when exact)

    @property
    def num_exact_rows(self) -> int:
        return int(self.exact_values.shape[0])

    def bytes_per_item(self) -> Dict[str, float]:
        """Memory of each part, in bytes per catalog item."""
        words_per_row = self.words.shape[1] * 8
        n = max(self.num_items, 1)
        parts = {
            "exact_bitmaps": self.num_exact_rows * words_per_row / n,
            "bloom": self.width * words_per_row / n,
            "verify_values": self.verify_values.numel() * self.verify_values.element_size() / n,
            "value_tables": (self.exact_values.numel() + self.exact_start.numel()
                             + self.verify_start.numel()) * 8 / n,
        }
        parts["total"] = sum(parts.values())
        return parts


# items per step of the build (a multiple of 64: a step owns whole words): the (bitmap row,
# item) pairs of all items at once are ~70 bytes per pair, several gigabytes at 10M items;
# the synthetic catalog has ~9 pairs per item, so a step of 256k items holds ~0.16 GB
BUILD_CHUNK = 1 << 18


def _set_bits(words: torch.Tensor, table_rows: np.ndarray, item_rows: np.ndarray) -> None:
    """Sets bit (item_row % 64) of word (table_row, item_row // 64) of `words` int64
    [rows, num_words] for every pair; the pairs' words hold no bit yet."""
    num_words = words.shape[1]
    flat = np.unique(table_rows.astype(np.int64) * (num_words * 64) + item_rows)
    bit = torch.from_numpy(np.left_shift(np.int64(1), flat % 64))
    # distinct bits of one word never carry, so their sum is their OR (1 << 63 wraps to the
    # int64 minimum, which is that bit)
    words.view(-1).index_add_(0, torch.from_numpy(flat // 64), bit)


def build_bloom_index(schema: Schema, features: Sequence[np.ndarray],
                      config: BloomIndexConfig, chunk: int = BUILD_CHUNK) -> BloomIndex:
    """Build the index over `features[f]` int64 [N, M_f] (value ids, -1 padded; rows in index
    order, as `Catalog.features`), `chunk` items at a time (the index does not depend on it)."""
    if config.num_hashes < 1 or config.width_multiplier <= 0:
        raise ValueError(f"num_hashes must be >= 1 and width_multiplier > 0, got "
                         f"{config.num_hashes} and {config.width_multiplier}")
    if len(features) != len(schema.features):
        raise ValueError(f"{len(features)} feature arrays for {len(schema.features)} features")
    if chunk < 64 or chunk % 64:
        raise ValueError(f"chunk must be a positive multiple of 64, got {chunk}")
    n = int(features[0].shape[0]) if features else 0
    num_words = (n + 63) // 64
    modes, exact_values, exact_start = [], [], [0]
    for values in features:
        distinct, counts = np.unique(values[values >= 0], return_counts=True)
        if len(distinct) <= config.exact_max_values:
            modes.append(MODE_EXACT)
            exact_values.append(distinct)
        else:
            modes.append(MODE_BLOOM)
            exact_values.append(distinct[counts >= config.exact_min_share * n])
        exact_start.append(exact_start[-1] + len(exact_values[-1]))
    num_exact = exact_start[-1]

    def pairs(f: int, lo: int, hi: int):
        """(item rows, values, bitmap slots, whether exact) of feature f's values of items
        lo..hi-1; a value with a bitmap has row exact_start[f] + its slot among the feature's
        exact values, the other values (of Bloom features) go into the Bloom filter."""
        rows, cols = np.nonzero(features[f][lo:hi] >= 0)
        value = features[f][lo:hi][rows, cols]
        known = exact_values[f]
        slot = np.searchsorted(known, value).clip(max=max(len(known) - 1, 0))
        exact = (known[slot] == value) if len(known) else np.zeros(len(rows), dtype=bool)
        return rows + lo, value, slot, exact

    bloom = [f for f, m in enumerate(modes) if m == MODE_BLOOM]
    # Bloom filter: width from the largest number of Bloom values one item has
    max_values = 0
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        per_item = np.zeros(hi - lo, dtype=np.int64)
        for f in bloom:
            rows, _, _, exact = pairs(f, lo, hi)
            per_item += np.bincount(rows[~exact] - lo, minlength=hi - lo)
        max_values = max(max_values, int(per_item.max(initial=0)))
    width = max(1, math.ceil(max_values * config.num_hashes * config.width_multiplier)) \
        if bloom else 0

    words = torch.zeros((num_exact + width, num_words), dtype=torch.int64)
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        table_rows, item_rows = [], []
        for f in range(len(features)):
            rows, value, slot, exact = pairs(f, lo, hi)
            table_rows.append(exact_start[f] + slot[exact])
            item_rows.append(rows[exact])
            if modes[f] == MODE_BLOOM:
                pos = bloom_positions(torch.full((int((~exact).sum()),), f, dtype=torch.int64),
                                      torch.from_numpy(value[~exact]), config.num_hashes, width)
                table_rows.append(num_exact + pos.numpy().reshape(-1))
                item_rows.append(np.repeat(rows[~exact], config.num_hashes))
        if table_rows:
            _set_bits(words, np.concatenate(table_rows), np.concatenate(item_rows))

    bloom_features = [f for f, m in enumerate(modes) if m == MODE_BLOOM]
    verify = [features[f] for f in bloom_features]
    verify_start = np.cumsum([0] + [features[f].shape[1] if modes[f] == MODE_BLOOM else 0
                                    for f in range(len(features))])
    verify_values = (np.concatenate(verify, axis=1) if verify
                     else np.zeros((n, 0), dtype=np.int64))
    for narrow in (np.int16, np.int32):  # the narrowest type holding the values (and -1)
        info = np.iinfo(narrow)
        if verify_values.size == 0 or (verify_values.min() >= info.min
                                       and verify_values.max() <= info.max):
            verify_values = verify_values.astype(narrow)  # compared after promotion to int64
            break
    return BloomIndex(
        num_items=n, modes=modes, words=words,
        exact_values=torch.from_numpy(np.concatenate(exact_values).astype(np.int64)),
        exact_start=torch.tensor(exact_start, dtype=torch.int64), width=width,
        num_hashes=config.num_hashes,
        verify_values=torch.from_numpy(np.ascontiguousarray(verify_values)),
        verify_start=torch.from_numpy(verify_start.astype(np.int64)))

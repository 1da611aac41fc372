"""Request mixes for the load test and the benchmarks, built from the indexed catalog.

Filters are grouped by how much of the catalog they let through, because that is what makes
filtered retrieval hard (design notes: IVF lists run dry under selective filters; vector
databases switch plans):

    unfiltered      the empty expression: every item
    broad           10% to 50% of the items   e.g. `language:es OR language:pt`
    selective       about 0.5% (0.2% to 1%)   e.g. `category:news AND language:de`
    one_creator     one creator's items: a handful, often fewer than k x oversample

The expressions are generated from `items.csv` (the builder's catalog, spelled as expressions
spell values) and their match counts are computed from it, so a mix is reproducible from a
build and its selectivity is measured, not assumed.

Histories: with `history=N` (Locust's `--triton-history`) every request also carries the
optional `history` input: N distinct item ids drawn, by the seeded generator that draws the
rest of the request, from the `item_id` column of the same items.csv (the served catalog's
ids, so the server resolves them rather than skipping them; a uniform sample, not a
behaviour-shaped sequence). N = 0, the default, sends no history and draws exactly the
requests it drew before histories existed.
"""

from __future__ import annotations

import copy
import csv
import random
from collections import Counter
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from client.catalog import DEFAULT_ITEMS_CSV
from filtering.spelling import spell_value, split_values

KINDS = ("unfiltered", "broad", "selective", "one_creator")
# match-fraction range of each kind (inclusive); one_creator is defined by construction
BROAD = (0.10, 0.50)
SELECTIVE = (0.002, 0.01)
ONE_CREATOR_ITEMS = (2, 100)  # creators with this many items
FILTERS_PER_KIND = 16
# named mixes: request weights per kind
MIXES: Dict[str, Dict[str, int]] = {
    "mixed": {"unfiltered": 1, "broad": 1, "selective": 1, "one_creator": 1},
    "unfiltered": {"unfiltered": 1},
    "filtered": {"broad": 1, "selective": 1, "one_creator": 1},
    **{kind: {kind: 1} for kind in KINDS[1:]},
}
# the low-cardinality features broad and selective filters are made of, and the creator one
FEATURES = ("category", "language", "tags")
CREATOR = "creator"


@dataclass(frozen=True)
class FilterCase:
    kind: str
    expression: str
    matches: int  # items of the catalog that satisfy it


@dataclass(frozen=True)
class Request:
    kind: str
    user_id: int
    filter: str
    k: int
    history: Optional[Tuple[int, ...]] = None  # raw item ids, newest first; None = not sent


def parse_mix(spec: str) -> Dict[str, int]:
    """A named mix (`mixed`, `unfiltered`, `filtered`, or one kind) or explicit integer
    weights `unfiltered=2,broad=1,...`."""
    spec = spec.strip()
    if spec in MIXES:
        return dict(MIXES[spec])
    weights = {}
    for part in spec.split(","):
        name, _, weight = part.partition("=")
        name = name.strip()
        if name not in KINDS or not weight.strip().isdigit():
            raise ValueError(f"bad request mix {spec!r}: use one of {sorted(MIXES)} or "
                             f"weights like 'unfiltered=2,broad=1' over {KINDS}")
        weights[name] = int(weight)
    if not any(weights.values()):
        raise ValueError(f"request mix {spec!r} has no positive weight")
    return {k: w for k, w in weights.items() if w > 0}


def parse_history_sizes(spec: str, most: int) -> List[int]:
    """`--history` of the serving benchmark: item ids per request's history, one size or
    several separated by commas (`0,100`: every model without and with 100-item histories), in
    the order given; each an integer from 0 (no history input) to `most` (the server's limit,
    stages/history.py MAX_HISTORY), none twice."""
    sizes: List[int] = []
    for part in spec.split(","):
        part = part.strip()
        try:
            size = int(part)
        except ValueError:
            raise ValueError(f"history sizes are integers separated by commas (e.g. 0,100), "
                             f"not {spec!r}") from None
        if not 0 <= size <= most:
            raise ValueError(f"a history holds 0 to {most} item ids, not {size}")
        if size in sizes:
            raise ValueError(f"history size {size} is listed twice in {spec!r}")
        sizes.append(size)
    return sizes


class Catalog:
    """Per-value item masks of the filterable features, and the item ids, read from items.csv."""

    def __init__(self, items_csv: Path = DEFAULT_ITEMS_CSV):
        self.items_csv = Path(items_csv)
        columns: Dict[str, List[List[str]]] = {}
        ids: List[int] = []
        with open(self.items_csv, newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                for name, value in row.items():
                    if name == "item_id":
                        ids.append(int(value))
                    else:
                        columns.setdefault(name, []).append(split_values(value))
        self.item_ids = np.array(ids, dtype=np.int64)  # in items.csv order
        self.num_items = len(next(iter(columns.values())))
        self.masks: Dict[Tuple[str, str], np.ndarray] = {}
        for name in FEATURES:
            for r, values in enumerate(columns.get(name, [])):
                for v in values:
                    mask = self.masks.get((name, v))
                    if mask is None:
                        mask = self.masks[(name, v)] = np.zeros(self.num_items, bool)
                    mask[r] = True
        self.creator_counts = Counter(v for values in columns.get(CREATOR, []) for v in values)

    def filter_cases(self, seed: int = 0, per_kind: int = FILTERS_PER_KIND
                     ) -> Dict[str, List[FilterCase]]:
        """Up to `per_kind` expressions of every kind, drawn reproducibly from `seed`."""
        rng = random.Random(seed)
        terms = sorted(self.masks)
        n = self.num_items
        candidates: Dict[str, List[FilterCase]] = {k: [] for k in KINDS}
        candidates["unfiltered"].append(FilterCase("unfiltered", "", n))
        matrix = np.stack([self.masks[t] for t in terms]).astype(np.float32)
        single = matrix.sum(1).astype(np.int64)
        both = np.rint(matrix @ matrix.T).astype(np.int64)  # items having term a and term b

        def add(kind, expression, count, bounds):
            if bounds[0] <= count / n <= bounds[1]:
                candidates[kind].append(FilterCase(kind, expression, int(count)))

        for a, ta in enumerate(terms):  # a term, or NOT a term
            add("broad", _term(ta), single[a], BROAD)
            add("broad", f"NOT {_term(ta)}", n - single[a], BROAD)
        for a, b in combinations(range(len(terms)), 2):
            ta, tb = terms[a], terms[b]
            if ta[0] == tb[0]:  # same feature: OR widens
                add("broad", f"{_term(ta)} OR {_term(tb)}", single[a] + single[b] - both[a, b],
                    BROAD)
            else:  # different features: AND narrows
                add("selective", f"{_term(ta)} AND {_term(tb)}", both[a, b], SELECTIVE)
        lo, hi = ONE_CREATOR_ITEMS
        for creator, count in sorted(self.creator_counts.items(), key=lambda c: int(c[0])):
            if lo <= count <= hi:
                candidates["one_creator"].append(
                    FilterCase("one_creator", _term((CREATOR, creator)), count))
        return {kind: rng.sample(cases, min(per_kind, len(cases)))
                for kind, cases in candidates.items()}


def _term(key: Tuple[str, str]) -> str:
    """(feature name, value) as a filter term."""
    return f"{key[0]}:{spell_value(key[1])}"


def read_users(items_csv: Path = DEFAULT_ITEMS_CSV) -> List[int]:
    """The known user ids (users.csv, written by the builder next to items.csv)."""
    with open(Path(items_csv).with_name("users.csv"), newline="") as fh:
        return [int(row["user_id"]) for row in csv.DictReader(fh)]


class Workload:
    """Draws requests: a kind by the mix's weights, one of its filters, a known user, and
    (with `history` > 0) a history of that many distinct catalog items.

    Args:
        filters: kind -> filter cases (Catalog.filter_cases).
        users: user ids to draw from.
        mix: kind -> integer weight (parse_mix); kinds without filters are an error.
        k: results per request.
        num_items: catalog size (to report selectivity).
        item_ids: raw item ids histories are drawn from (Catalog.item_ids).
        history: item ids per request's `history` input; 0 = the input is not sent.
    """

    def __init__(self, filters: Dict[str, List[FilterCase]], users: Sequence[int],
                 mix: Dict[str, int], k: int, num_items: int, item_ids: Sequence[int] = (),
                 history: int = 0):
        missing = [kind for kind, w in mix.items() if w > 0 and not filters.get(kind)]
        if missing:
            raise ValueError(f"the catalog has no filters of kind {missing}")
        if not users:
            raise ValueError("no user ids to draw from")
        self.filters = filters
        self.users = list(users)
        self.mix = {kind: w for kind, w in mix.items() if w > 0}
        self.k = k
        self.num_items = num_items
        self.item_ids = np.asarray(item_ids, dtype=np.int64)
        self._check_history(history)
        self.history = history

    def _check_history(self, history: int) -> None:
        if history < 0:
            raise ValueError(f"history must be >= 0 item ids per request, not {history}")
        if history > len(self.item_ids):
            raise ValueError(f"a history of {history} distinct items needs that many item ids; "
                             f"the workload has {len(self.item_ids)}")

    @classmethod
    def from_catalog(cls, items_csv: Path = DEFAULT_ITEMS_CSV, mix: str = "mixed", k: int = 10,
                     seed: int = 0, history: int = 0) -> Workload:
        catalog = Catalog(items_csv)
        return cls(catalog.filter_cases(seed), read_users(items_csv), parse_mix(mix), k,
                   catalog.num_items, catalog.item_ids, history)

    def with_history(self, history: int) -> Workload:
        """The same workload whose requests carry `history` item ids (0: none); the filters
        and users are shared, not rebuilt from the catalog."""
        self._check_history(history)
        other = copy.copy(self)
        other.history = history
        return other

    def sample(self, rng: random.Random, kind: Optional[str] = None) -> Request:
        if kind is None:
            kind = rng.choices(list(self.mix), weights=list(self.mix.values()))[0]
        case = rng.choice(self.filters[kind])
        user = rng.choice(self.users)
        history = None
        if self.history:  # drawn last, and only then: without it the draws are as before
            rows = rng.sample(range(len(self.item_ids)), self.history)
            history = tuple(int(self.item_ids[r]) for r in rows)
        return Request(kind, user, case.expression, self.k, history)

    def evaluation_set(self, per_kind: int, seed: int = 0) -> List[Request]:
        """`per_kind` requests of every kind in the mix, reproducible from `seed`."""
        rng = random.Random(seed)
        return [self.sample(rng, kind) for kind in self.mix for _ in range(per_kind)]

    def describe(self) -> str:
        """One line per kind: weight, number of filters, match fraction range."""
        lines = []
        for kind, weight in self.mix.items():
            cases = self.filters[kind]
            lo, hi = min(c.matches for c in cases), max(c.matches for c in cases)
            lines.append(f"{kind}: weight {weight}, {len(cases)} filters matching {lo:,}-{hi:,} "
                         f"of {self.num_items:,} items ({lo / self.num_items:.2%}-"
                         f"{hi / self.num_items:.2%}), e.g. {cases[0].expression!r}")
        if self.history:
            lines.append(f"history: {self.history} distinct item ids per request, drawn from "
                         f"the catalog's {len(self.item_ids):,} items")
        return "\n".join(lines)

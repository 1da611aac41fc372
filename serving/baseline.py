"""The architecture this project replaces, served by the same Triton for the benchmarks.

Before "index as model", retrieval was a chain of services: an exact feature-filter service,
a separate ANN service (FAISS on the CPU, fp32), then scoring. The `baseline` ensemble deploys
exactly that, as honestly as the `retrieval` ensemble is deployed:

    baseline_filter ──► baseline_ann ──► scorer ──► aggregator
    (inverted index,    (FAISS IVF-Flat      (the SAME scorer and aggregator models
     exact bitmap)       fp32, ID selector)   as `retrieval` and `unified`)

- `baseline_filter` is the `FilterRunner` over `PostingListFilter` (stages/posting_filter.py):
  posting lists per (feature, value), combined word-wise; exact, like the filter services
  (Lucene, Elasticsearch) this architecture used.
- `baseline_ann` (this file) searches a FAISS index with the filter bitmap as an
  `IDSelectorBitmap` (search-time filtering: FAISS skips filtered ids inside the probed lists),
  and, like vector databases (Qdrant, Lucene), plans per filter: when so few items match that
  scoring all of them costs no more than the IVF probe would, it scores exactly those items.
  FAISS pads short results with id -1; they are cut here and never leave the model.

Artifacts (written by builder/baseline.py): `model.pt` is the user tower (the same module the
`ann` stage embeds queries with), `index.faiss` the item index (FAISS id = index row), and
`faiss.json` the build-time settings; `config.pbtxt` parameters override them (e.g. `nprobe`).
"""

from __future__ import annotations

import json
from typing import Dict, List

import numpy as np
import torch

from builder.baseline import HISTORY_FILE, INDEX_FILE, SETTINGS_FILE
from serving.runners import AnnRunner, FilterRunner


def passing_rows(filter_bits: np.ndarray, num_items: int) -> np.ndarray:
    """Rows whose bit is set in one packed bitmap (filtering/bits.py layout): int64 [matches]."""
    bits = np.unpackbits(filter_bits.view(np.uint8), bitorder="little")[:num_items]
    return np.flatnonzero(bits)


def exact_top(vectors: np.ndarray, rows: np.ndarray, query: np.ndarray, count: int) -> np.ndarray:
    """The `count` rows of `rows` with the largest inner product with `query`, best first."""
    if len(rows) == 0 or count <= 0:
        return rows[:0]
    scores = vectors[rows] @ query
    if count < len(rows):
        keep = np.argpartition(-scores, count - 1)[:count]
    else:
        keep = np.arange(len(rows))
    return rows[keep[np.argsort(-scores[keep], kind="stable")]]


class FaissAnnRunner(AnnRunner):
    """The separate ANN service: user id + exact filter bitmap + k -> candidate rows.

    The `ann` stage's tensors and request checks (`AnnRunner`), so the same scorer and
    aggregator follow; only the search differs.
    Parameters (config.pbtxt, else faiss.json): `nprobe`, `oversample` (candidates per
    requested result, as the `ann` stage), `faiss_threads`, and `search`: "index" (default) or
    "exact" (every query scores all matching items: the ground truth for recall).
    The service chain predates request histories: no `history` input. Its `history_rows`
    output is each user's built history (history.pt, the `ann` stage's BuiltHistory), the
    feature a service chain would fetch for its scorer, so the shared scorer attends over what
    it attends over in `retrieval` and `unified` for a request without `history` (and the exact
    reference, `search: exact`, scores as they do).
    """

    INPUTS = tuple(s for s in AnnRunner.INPUTS if s.name != "history")

    def __init__(self, version_dir, params=None):
        import faiss  # the ANN service's library; only this model needs it

        super().__init__(version_dir, params)  # model.pt: the user tower
        settings: Dict[str, str] = json.loads((self.version_dir / SETTINGS_FILE).read_text())
        settings.update(self.params)
        self.faiss = faiss
        self.oversample = int(settings["oversample"])
        self.nprobe = int(settings["nprobe"])
        self.search_mode = settings.get("search", "index")
        if self.search_mode not in ("index", "exact"):
            raise ValueError(f"{self.version_dir}: search must be 'index' or 'exact', "
                             f"not {self.search_mode!r}")
        faiss.omp_set_num_threads(int(settings.get("faiss_threads", "1")))
        self.index = faiss.read_index(str(self.version_dir / INDEX_FILE))
        self.num_items = int(self.index.ntotal)
        ivf = faiss.try_extract_index_ivf(self.index)
        self.nlist = int(ivf.nlist) if ivf is not None else 1
        self.nprobe = min(self.nprobe, self.nlist)
        if ivf is not None:
            ivf.make_direct_map()  # lets reconstruct_n read the vectors back for exact scoring
        self.vectors = self.index.reconstruct_n(0, self.num_items)
        self.built_history = torch.jit.load(str(self.version_dir / HISTORY_FILE),
                                            map_location="cpu")
        # Scoring the matching items one by one is exact and costs one gather + dot product
        # per match; the IVF probe costs one per vector in the probed lists. Below this many
        # matches exact scoring is the cheaper plan (and the IVF would miss most of them).
        self.exact_below = self.num_items * self.nprobe // self.nlist
        if ivf is None:  # a flat index scans everything: exact scoring is cheaper when filtered
            self.exact_below = self.num_items

    def compute(self, prepared):
        users = torch.tensor([p.user_id for p in prepared], dtype=torch.int64)
        queries = np.ascontiguousarray(self.forward(users).numpy(), dtype=np.float32)
        wanted = [self.oversample * p.k for p in prepared]
        rows: List[np.ndarray] = [np.empty(0, np.int64)] * len(prepared)
        # Requests with the same filter (the unfiltered ones, above all) share one FAISS call.
        groups: Dict[bytes, List[int]] = {}
        for i, p in enumerate(prepared):
            groups.setdefault(p.filter_bits.tobytes(), []).append(i)
        for members in groups.values():
            bits = prepared[members[0]].filter_bits
            matching = passing_rows(bits, self.num_items)
            if self.search_mode == "exact" or len(matching) < self.exact_below:
                for i in members:
                    rows[i] = exact_top(self.vectors, matching, queries[i], wanted[i])
                continue
            selector = None
            if len(matching) < self.num_items:
                bitmap = np.ascontiguousarray(bits).view(np.uint8)  # FAISS's layout: LSB first
                selector = self.faiss.IDSelectorBitmap(len(bitmap), self.faiss.swig_ptr(bitmap))
            params = self.faiss.SearchParametersIVF(sel=selector, nprobe=self.nprobe) \
                if self.nlist > 1 else self.faiss.SearchParameters(sel=selector)
            _, found = self.index.search(queries[members], max(wanted[i] for i in members),
                                         params=params)
            for j, i in enumerate(members):
                hit = found[j]
                rows[i] = hit[hit >= 0][: wanted[i]]  # FAISS pads short lists with -1
        history = self.built_history(users).numpy()
        return [{"candidate_rows": r.astype(np.int64).reshape(1, -1),
                 "user_embedding": queries[i: i + 1],
                 "history_rows": history[i: i + 1][:, history[i] >= 0]}
                for i, r in enumerate(rows)]


RUNNERS = {"baseline_filter": FilterRunner, "baseline_ann": FaissAnnRunner}

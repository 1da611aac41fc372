"""Artifacts of the `baseline` ensemble (serving/baseline.py), built from the same catalog,
the same index row order and the same user tower as the project's own models.

    baseline_filter/1/model.pt     the posting-list filter (stages/posting_filter.py), scripted
    baseline_filter/1/schema.json  what the parser needs
    baseline_ann/1/model.pt        the user tower of the `ann` stage, scripted
    baseline_ann/1/history.pt      the users' built histories (stages/history.py BuiltHistory),
                                   scripted: the history rows its scorer attends over
    baseline_ann/1/index.faiss     FAISS index of the item vectors (faiss.write_index), id = row
    baseline_ann/1/faiss.json      its build settings (nlist, nprobe, oversample)
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict

import numpy as np
import torch

from stages.filter import feature_matrix
from stages.posting_filter import PostingListFilter, build_postings
from world.schema import Schema
from world.synthetic import Catalog

MODELS = ("baseline_filter", "baseline_ann")
HISTORY_FILE = "history.pt"  # the built histories of baseline_ann (read by serving/baseline.py)
INDEX_FILE = "index.faiss"  # the FAISS index of baseline_ann (read by serving/baseline.py)
SETTINGS_FILE = "faiss.json"  # its build settings


@dataclass
class BaselineConfig:
    # "ivf": IndexIVFFlat (what an ANN service runs); "flat": IndexFlatIP (exact, slowest)
    index: str = "ivf"
    # IVF lists; 0 = about sqrt(N). FAISS suggests 4-16 sqrt(N) for large N; sqrt(N) keeps the
    # k-means of a 200k catalog near 5 s on 2 cores and the lists long enough for filters.
    nlist: int = 0
    # lists probed per query: the recall knob (config.pbtxt `nprobe` overrides it at load);
    # benchmarks/serving.py measures the recall it gives against exact search
    nprobe: int = 24
    train_points_per_list: int = 64  # k-means sample size per list (FAISS's default is 256)
    seed: int = 0


def _trained_ivf(vectors: np.ndarray, config: BaselineConfig):
    """An empty IndexIVFFlat whose lists are trained on `vectors`."""
    import faiss

    n, dim = vectors.shape
    nlist = config.nlist or max(1, round(math.sqrt(n)))
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.max_points_per_centroid = config.train_points_per_list
    index.cp.seed = config.seed
    index.train(vectors)
    return index


def add_presized(index, vectors: np.ndarray, batch: int = 65536) -> None:
    """`index.add(vectors)` (ids 0..n-1) into an empty IndexIVFFlat, with every inverted list
    allocated once at its final size: add() grows each list by doubling, which held 0.32 GiB
    instead of 0.25 for 1M 64-wide vectors. The lists are assigned in add()'s own batches of
    65,536, so the index is add()'s to the byte (tests/test_baseline.py)."""
    import faiss

    if index.ntotal:
        raise ValueError("add_presized fills an empty index")
    n = vectors.shape[0]
    assign = np.empty(n, dtype=np.int64)
    for start in range(0, n, batch):
        assign[start: start + batch] = index.quantizer.assign(
            vectors[start: start + batch], 1).reshape(-1)
    order = np.argsort(assign, kind="stable")
    ends = np.cumsum(np.bincount(assign, minlength=index.nlist))
    del assign
    lists = index.invlists
    for list_no in range(index.nlist):
        start = int(ends[list_no - 1]) if list_no else 0
        if ends[list_no] > start:
            ids = order[start: int(ends[list_no])]  # int64, kept alive across the call
            codes = np.ascontiguousarray(vectors[ids]).view(np.uint8)
            lists.add_entries(list_no, len(ids), faiss.swig_ptr(ids), faiss.swig_ptr(codes))
    index.ntotal = n


def _ivf_index(vectors: np.ndarray, config: BaselineConfig):
    index = _trained_ivf(vectors, config)
    add_presized(index, vectors)  # ids 0..n-1 = index rows
    return index


def build_baseline(out_dirs: Dict[str, Path], catalog: Catalog, item_vectors: np.ndarray,
                   user_tower: torch.nn.Module, schema: Schema, oversample: int,
                   config: BaselineConfig, built_history: torch.nn.Module) -> None:
    """Write the baseline models' artifacts into `out_dirs[model]` (the version folders the
    builder stages, builder/build.py).

    Args:
        catalog: in index row order (row r of every tensor is catalog row r).
        item_vectors: float32 [N, D], the vectors the `ann` stage searches, index row order.
        user_tower: raw user id int64 [B] -> query vector float32 [B, D], as in the `ann` stage.
        oversample: ANN candidates per requested result, as the `ann` stage.
        built_history: user id int64 [B] -> history rows int64 [B, L] (-1 padded), the `ann`
            stage's (stages/history.py BuiltHistory).
    """
    import faiss

    out = Path(out_dirs["baseline_filter"])
    matrix, column_start = feature_matrix(catalog)
    postings = build_postings(matrix.numpy(), column_start.numpy(), catalog.num_items)
    torch.jit.script(PostingListFilter(*postings, catalog.num_items).eval()).save(
        str(out / "model.pt"))
    (out / "schema.json").write_text(schema.to_json())

    out = Path(out_dirs["baseline_ann"])
    torch.jit.script(user_tower.eval()).save(str(out / "model.pt"))
    torch.jit.script(built_history.eval()).save(str(out / HISTORY_FILE))
    vectors = np.ascontiguousarray(item_vectors, dtype=np.float32)
    if config.index == "ivf":
        index = _ivf_index(vectors, config)
    elif config.index == "flat":
        index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(vectors)
    else:
        raise ValueError(f"baseline index must be 'ivf' or 'flat', not {config.index!r}")
    faiss.write_index(index, str(out / INDEX_FILE))
    ivf = faiss.try_extract_index_ivf(index)
    settings = {"index": config.index, "nlist": int(ivf.nlist) if ivf is not None else 1,
                "nprobe": config.nprobe, "oversample": int(oversample),
                "config": asdict(config)}
    (out / SETTINGS_FILE).write_text(json.dumps(settings, indent=1))


def is_built(repository: Path) -> bool:
    return all((Path(repository) / m / "1" / "model.pt").exists() for m in MODELS) and \
        (Path(repository) / "baseline_ann" / "1" / INDEX_FILE).exists()

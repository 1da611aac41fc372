"""Catalog + trained weights -> a Triton model repository.

Writes, for every stage, `<repository>/<stage>/1/model.pt` (TorchScript) next to the
checked-in `config.pbtxt` and `model.py`, plus `filter/1/schema.json` (what the parser needs)
and the indexed catalog as `items.csv` so that anyone can check results. When the target is not
the checked-in `model_repository/`, the configs and model.py files are copied there first.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import py_compile
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from tqdm import tqdm

import kernels  # noqa: F401  (ops must exist before modules that call them are scripted)
from builder.baseline import BaselineConfig, build_baseline
from builder.baseline import is_built as baseline_is_built
from filtering.spelling import join_values
from fresh.store import create_store, fresh_dir_for, header_for
from stages.aggregator import ValueModel
from stages.ann import AnnConfig, build_ann_stage, index_order
from stages.filter import FilterConfig, build_filter_stage
from stages.fresh import FreshAnn, FreshFilter
from stages.scorer import build_scorer_stage
from stages.unified import UnifiedRetrieval
from stages.user import build_user_tower
from training.data import from_world, time_split
from training.train import WEIGHTS_DIR, TrainConfig, load_or_train
from training.weights import TrainedWeights
from world.synthetic import Catalog, World, WorldConfig, generate_world

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "model_repository"
STAGES = ("filter", "ann", "scorer", "aggregator", "unified")


@dataclass
class BuildConfig:
    world: WorldConfig = field(default_factory=WorldConfig)
    repository: Path = TEMPLATE
    items_csv: Path = ROOT / "build" / "items.csv"
    filter: FilterConfig = field(default_factory=FilterConfig)
    ann: AnnConfig = field(default_factory=AnnConfig)
    training: TrainConfig = field(default_factory=TrainConfig)
    # Value Model defaults: value = sum_t w_t * p_t over (click, like, share)
    task_weights: tuple = (1.0, 2.0, 4.0)
    holdout_fraction: float = 0.1  # latest interactions kept out of fitting, for evaluation
    # trained weights are reused from / saved to here (training/train.py load_or_train);
    # None = always train, save nothing
    weights_dir: Optional[Path] = WEIGHTS_DIR
    # the pre-SilverTorch service chain the benchmarks compare against (builder/baseline.py)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    # Version folder the artifacts go to: 1 builds a repository (and a new, empty fresh store);
    # N > 1 writes a rebuilt index next to the served versions, for a swap (serving/swap.py),
    # and keeps the fresh store.
    version: int = 1
    fresh_capacity: int = 4096  # rows of the fresh index: items added between rebuilds
    fresh_dir: Optional[Path] = None  # None: fresh_items/ next to the repository


def write_items_csv(catalog: Catalog, path: Path) -> None:
    """item_id plus one column per feature, each value spelled as a filter expression spells
    it (bare `comedy` or quoted `"Science Fiction"`), several joined by '|' (join_values)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    specs = catalog.schema.features
    spelled = []
    for spec, values in zip(specs, catalog.features):
        if spec.kind == "int":
            spelled.append([[str(v) for v in row if v >= 0] for row in values.tolist()])
        else:
            vocab = spec.vocabulary
            spelled.append([[vocab[v] for v in row if v >= 0] for row in values.tolist()])
    with open(path, "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["item_id"] + [s.name for s in specs])
        for r, item_id in enumerate(catalog.item_ids.tolist()):
            out.writerow([item_id] + [join_values(col[r]) for col in spelled])


def split_holdout(world: World, fraction: float):
    """(train mask, holdout mask) over interactions: the latest `fraction` by time."""
    return time_split(world.interactions, fraction)


def precompile_entry_points(repository: Path) -> None:
    """Compile every version folder's model.py into its __pycache__/ now, so that loading a
    model never writes into its folder. Triton reloads (every version of) a model whose folder
    changed, and the Python-backend stub, an isolated interpreter that ignores
    PYTHONDONTWRITEBYTECODE, writes __pycache__/ at its first load: the next load request, an
    index swap, would reload the served version too. Caches that are up to date are kept."""
    for source in sorted(Path(repository).glob("*/*/model.py")):
        cached = Path(importlib.util.cache_from_source(str(source)))
        if not cached.exists() or cached.stat().st_mtime < source.stat().st_mtime:
            py_compile.compile(str(source), cfile=str(cached), doraise=True)


def export_modules(built: Built) -> Dict[str, torch.nn.Module]:
    """What each model's model.pt holds: the stages, the filter and ANN layers wrapped to serve
    the fresh rows too (stages/fresh.py), and `unified`."""
    ids = torch.from_numpy(built.catalog.item_ids)
    return dict(built.modules, filter=FreshFilter(built.modules["filter"], ids),
                ann=FreshAnn(built.modules["ann"], built.catalog.num_items))


def write_fresh_store(built: Built, cfg: BuildConfig) -> Path:
    """An empty fresh store for a new repository (version 1); a rebuilt version keeps the
    store it serves with (same layout required: fresh/store.py create_store)."""
    catalog = built.catalog
    header = header_for(catalog.schema, catalog.embeddings.shape[1], cfg.fresh_capacity,
                        [f.shape[1] for f in catalog.features])
    directory = cfg.fresh_dir or fresh_dir_for(cfg.repository)
    create_store(directory, header, replace=cfg.version == 1)
    return directory


def prepare_repository(target: Path) -> None:
    target = Path(target)
    if target.resolve() == TEMPLATE.resolve():
        return
    for model_dir in sorted(TEMPLATE.iterdir()):
        if not (model_dir / "config.pbtxt").exists():
            continue
        dst = target / model_dir.name
        (dst / "1").mkdir(parents=True, exist_ok=True)
        shutil.copy2(model_dir / "config.pbtxt", dst / "config.pbtxt")
        if (model_dir / "1" / "model.py").exists():
            shutil.copy2(model_dir / "1" / "model.py", dst / "1" / "model.py")


def is_built(repository: Path) -> bool:
    """Every model's artifacts exist (the stages, `unified` and the baseline's)."""
    return all((Path(repository) / s / "1" / "model.pt").exists() for s in STAGES) \
        and baseline_is_built(repository)


@dataclass
class Built:
    modules: Dict[str, torch.nn.Module]
    catalog: Catalog  # in index row order: row r of every stage tensor is catalog row r
    weights: TrainedWeights


def retrieval_stages(catalog: Catalog, weights: TrainedWeights, ann: AnnConfig,
                     task_weights: tuple) -> Tuple[Dict[str, torch.nn.Module], Catalog]:
    """The ann, scorer and aggregator stages from trained weights, and the catalog they index.

    The ANN indexes the item tower's vectors (what the user tower's queries were trained
    against), so they replace the catalog's embeddings before the index decides the row
    order. Returns the stages and that catalog in index row order.
    """
    learned = replace(catalog, embeddings=weights.item_vectors.numpy())
    order = index_order(learned, ann)
    indexed = learned.take(order)
    stages = {
        "ann": build_ann_stage(indexed, build_user_tower(weights), ann),
        "scorer": build_scorer_stage(weights, order),
        "aggregator": ValueModel(torch.from_numpy(indexed.item_ids),
                                 torch.tensor(task_weights, dtype=torch.float32)),
    }
    return stages, indexed


def build_modules(world: World, cfg: BuildConfig, progress: bool = False) -> Built:
    weights = load_or_train(from_world(world), cfg.holdout_fraction, cfg.training,
                            cfg.weights_dir, progress)
    stages, catalog = retrieval_stages(world.catalog, weights, cfg.ann, cfg.task_weights)
    modules = {"filter": build_filter_stage(catalog, cfg.filter), **stages}
    modules["unified"] = UnifiedRetrieval(modules["filter"], modules["ann"], modules["scorer"],
                                          modules["aggregator"])
    return Built(modules, catalog, weights)


def indexed_item_vectors(built: Built) -> np.ndarray:
    """The item vectors the `ann` stage searches, in index row order: the baseline's FAISS
    index holds the same ones (builder/baseline.py)."""
    return built.catalog.embeddings


def build(cfg: BuildConfig, world: World = None, progress: bool = True) -> World:
    """Build the repository; returns the world it was built from."""
    t0 = time.perf_counter()
    steps = tqdm(total=4 + len(STAGES), desc="build", disable=not progress, unit="step")
    if world is None:
        steps.set_postfix_str(f"synthetic world, {cfg.world.num_items:,} items")
        world = generate_world(cfg.world)
    steps.update()
    steps.set_postfix_str("training (or loading) weights")
    built = build_modules(world, cfg, progress)
    steps.update()
    repo = Path(cfg.repository)
    if cfg.version == 1:
        prepare_repository(repo)
    elif not (repo / "retrieval" / "config.pbtxt").exists():
        raise ValueError(f"{repo}: version {cfg.version} goes next to a built repository; "
                         "build version 1 first")
    version = str(cfg.version)
    exported = export_modules(built)
    for name in STAGES:
        steps.set_postfix_str(f"scripting {name}")
        out = repo / name / version
        out.mkdir(parents=True, exist_ok=True)
        if version != "1":  # the entry point of every version is the same one-liner
            shutil.copy2(repo / name / "1" / "model.py", out / "model.py")
        torch.jit.script(exported[name].eval()).save(str(out / "model.pt"))
        steps.update()
    for name in ("filter", "unified"):  # the models that parse filter expressions
        (repo / name / version / "schema.json").write_text(world.catalog.schema.to_json())
    write_fresh_store(built, cfg)
    # --- the baseline (builder/baseline.py): the service chain this project replaces, over the
    # same catalog rows, item vectors and user tower as the `ann` stage -----------------------
    steps.set_postfix_str("baseline (FAISS index)")
    build_baseline(repo, built.catalog, indexed_item_vectors(built), built.modules["ann"].users,
                   world.catalog.schema, cfg.ann.oversample, cfg.baseline, cfg.version)
    steps.update()
    # --- end of the baseline ----------------------------------------------------------------
    steps.set_postfix_str("items.csv")
    precompile_entry_points(repo)
    write_items_csv(built.catalog, Path(cfg.items_csv))
    # the indexed vectors in items.csv order: `client update --embedding-from-item`
    np.save(Path(cfg.items_csv).with_name("item_embeddings.npy"), built.catalog.embeddings)
    with open(Path(cfg.items_csv).with_name("users.csv"), "w") as fh:
        fh.write("user_id\n" + "\n".join(str(u) for u in world.user_ids.tolist()) + "\n")
    info = {"world": asdict(cfg.world), "num_items": world.catalog.num_items,
            "task_weights": list(cfg.task_weights), "config": asdict(cfg),
            "items_csv": str(cfg.items_csv), "build_seconds": round(time.perf_counter() - t0, 1)}
    Path(cfg.items_csv).with_name("build_info.json").write_text(
        json.dumps(info, indent=1, default=str))
    steps.update()
    steps.close()
    return world

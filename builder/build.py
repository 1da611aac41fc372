"""Catalog + trained weights -> a Triton model repository.

Writes, for every stage, `<repository>/<stage>/<version>/model.pt` (TorchScript) next to the
`config.pbtxt` and `model.py` of the checked-in template, plus `schema.json` (what the parser
needs), the fresh store, and the indexed catalog as `items.csv` so that anyone can check
results. The source is the synthetic world or a catalog directory (catalog/, docs/catalog.md).

Nothing served is touched until the build is complete: version 1 is built in a sibling
directory that then replaces the repository (and its files next to items.csv), version N in
hidden folders renamed into place at the end.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import py_compile
import re
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from tqdm import tqdm

import kernels  # noqa: F401  (ops must exist before modules that call them are scripted)
from builder.baseline import MODELS as BASELINE_MODELS
from builder.baseline import BaselineConfig, build_baseline
from builder.baseline import is_built as baseline_is_built
from builder.inputs import BuildInput, Provenance, fold_fresh, read_fresh
from catalog import CatalogSource, read_catalog
from filtering.spelling import join_values
from fresh.store import LOG_NAME, FreshStore, create_store, fresh_dir_for, header_for
from stages.ann import AnnConfig
from stages.archive import TensorFiles
from stages.filter import FilterConfig, build_filter_stage
from stages.fresh import FreshAnn, FreshFilter
from stages.unified import UnifiedRetrieval
from training.retrieval import RetrievalModel, retrieval_stages
from training.train import HOLDOUT_FRACTION, WEIGHTS_DIR, TrainConfig, load_or_train
from world.synthetic import Catalog, World, WorldConfig, generate_world

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "model_repository"
STAGES = ("filter", "ann", "scorer", "aggregator", "unified")
CATALOG_BUILDS = ROOT / "build" / "catalogs"
TITLES_CSV = "item_titles.csv"  # item_id,title next to items.csv, when the catalog has titles
TASK_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def catalog_build_dir(catalog_dir: Path) -> Path:
    """Where `--catalog DIR` builds by default: build/catalogs/<DIR's name>/ holding
    model_repository/, items.csv and the rest (the checked-in model_repository/ stays the
    synthetic world's)."""
    return CATALOG_BUILDS / Path(catalog_dir).resolve().name


@dataclass
class BuildConfig:
    world: WorldConfig = field(default_factory=WorldConfig)
    # a catalog directory (docs/catalog.md) to build from instead of the synthetic world
    catalog: Optional[Path] = None
    # interactions naming items not in the catalog: "error" or "skip" (None: catalog.toml's)
    unknown_items: Optional[str] = None
    repository: Path = TEMPLATE
    items_csv: Path = ROOT / "build" / "items.csv"
    filter: FilterConfig = field(default_factory=FilterConfig)
    ann: AnnConfig = field(default_factory=AnnConfig)
    training: TrainConfig = field(default_factory=TrainConfig)
    # Value Model defaults, one per task (None: the source's: the synthetic world's
    # click 1, like 2, share 4; a catalog's [tasks])
    task_weights: Optional[tuple] = None
    holdout_fraction: float = HOLDOUT_FRACTION  # latest interactions kept out of fitting
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
    # take the fresh store's items into the rebuilt index (and retired ones out of it), so
    # that nothing acknowledged is lost; False discards them (a version-1 build only)
    fold_fresh: bool = True

def write_items_csv(catalog: Catalog, path: Path, chunk: int = 1 << 18) -> None:
    """item_id plus one column per feature, each value spelled as a filter expression spells
    it (bare `comedy` or quoted `"Science Fiction"`), several joined by '|' (join_values);
    CSV as csv.writer writes it.

    Written `chunk` rows at a time, each distinct cell of a chunk spelled once: a catalog has
    few distinct values per feature, and 10M rows one by one through csv.writer take minutes."""

    def field(text: str) -> str:  # csv.writer's quoting, for a row of several fields
        if any(c in text for c in ',"\r\n'):
            return '"' + text.replace('"', '""') + '"'
        return text

    path.parent.mkdir(parents=True, exist_ok=True)
    specs = catalog.schema.features
    with open(path, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerow(["item_id"] + [s.name for s in specs])
        for start in range(0, catalog.num_items, chunk):
            end = min(start + chunk, catalog.num_items)
            columns = [map(str, catalog.item_ids[start:end].tolist())]
            for spec, values in zip(specs, catalog.features):
                if values.shape[1] == 0:
                    columns.append([""] * (end - start))
                    continue
                distinct, which = np.unique(values[start:end], axis=0, return_inverse=True)
                cells = np.array([field(join_values([spec.spell(v) for v in row if v >= 0]))
                                  for row in distinct.tolist()], dtype=object)
                columns.append(cells[which.reshape(-1)].tolist())
            fh.write("".join(",".join(row) + "\r\n" for row in zip(*columns)))


def write_titles_csv(catalog: Catalog, titles: np.ndarray, path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        out = csv.writer(fh)
        out.writerow(["item_id", "title"])
        out.writerows(zip(catalog.item_ids.tolist(), ["" if t is None else str(t)
                                                      for t in titles]))


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


def configure_tasks(config: str, tasks: Tuple[str, ...]) -> str:
    """A config.pbtxt with T = len(tasks): `task_weights` dims [T], task score outputs
    [-1, T], and the `tasks` parameter naming them (what runners and clients read)."""
    t = len(tasks)
    config = re.sub(r'(name: "task_weights"[^}]*dims: \[ )\d+( \])', rf"\g<1>{t}\2", config)
    config = re.sub(r'(name: "(?:candidate_)?task_scores"[^}]*dims: \[ -1, )\d+( \])',
                    rf"\g<1>{t}\2", config)
    return re.sub(r'(key: "tasks" value: \{ string_value: ")[^"]*(")',
                  rf"\g<1>{','.join(tasks)}\2", config)


# `model_version: V` of an ensemble step (serving/swap.py moves them on a swap)
STEP_VERSION = re.compile(r"(model_version\s*:\s*)(-?\d+)")


def pin_step_versions(config: str, version: int) -> str:
    """An ensemble config whose every step names `version` (other configs are unchanged)."""
    return STEP_VERSION.sub(lambda m: f"{m.group(1)}{version}", config)


def prepare_repository(target: Path, tasks: Tuple[str, ...]) -> None:
    """The template's configs (for `tasks`; ensemble steps on version 1, whatever a swap of
    a repository served from the template wrote there) and entry points in a new repository
    `target`."""
    for model_dir in sorted(TEMPLATE.iterdir()):
        if not (model_dir / "config.pbtxt").exists():
            continue
        dst = target / model_dir.name
        (dst / "1").mkdir(parents=True, exist_ok=True)
        (dst / "config.pbtxt").write_text(pin_step_versions(
            configure_tasks((model_dir / "config.pbtxt").read_text(), tasks), 1))
        for entry in ("model.py", ".gitkeep"):
            if (model_dir / "1" / entry).exists():
                shutil.copy2(model_dir / "1" / entry, dst / "1" / entry)


def served_tasks(repository: Path) -> Tuple[str, ...]:
    """The tasks a built repository serves (its `retrieval` config's `tasks` parameter)."""
    text = (Path(repository) / "retrieval" / "config.pbtxt").read_text()
    m = re.search(r'key: "tasks" value: \{ string_value: "([^"]*)"', text)
    return tuple(m.group(1).split(",")) if m else ("click", "like", "share")


def is_built(repository: Path) -> bool:
    """Every model's artifacts exist (the stages, `unified` and the baseline's)."""
    return all((Path(repository) / s / "1" / "model.pt").exists() for s in STAGES) \
        and baseline_is_built(repository)


@dataclass
class Built:
    modules: Dict[str, torch.nn.Module]
    catalog: Catalog  # in index row order: row r of every stage tensor is catalog row r
    tasks: Tuple[str, ...]
    titles: Optional[np.ndarray] = None  # index row order
    folded: str = ""  # what the fresh store contributed, for the summary


def load_model(source: BuildInput, cfg: BuildConfig, progress: bool = False
               ) -> RetrievalModel:
    """Trained (or cached) weights when the source has interactions, else its pretrained
    vectors."""
    if source.data is not None:
        from training.train import training_config_for

        return RetrievalModel.trained(load_or_train(
            source.data, cfg.holdout_fraction, training_config_for(source.data, cfg.training),
            cfg.weights_dir, progress))
    return RetrievalModel.pretrained(source.user_ids, source.user_vectors,
                                     source.catalog.embeddings)


def build_modules(source, cfg: BuildConfig, progress: bool = False,
                  store: Optional[FreshStore] = None) -> Built:
    """Every stage module of `source` (a World or a BuildInput), with the items of the fresh
    `store` folded in (fold_fresh) when one is given."""
    if isinstance(source, World):
        source = BuildInput.from_world(source)
    return assemble_modules(source.catalog, source.titles, load_model(source, cfg, progress),
                            tuple(cfg.task_weights or source.task_weights), cfg, store)


def assemble_modules(catalog: Catalog, titles: Optional[np.ndarray], model: RetrievalModel,
                     task_weights: Tuple[float, ...], cfg: BuildConfig,
                     store: Optional[FreshStore] = None) -> Built:
    """The stage modules of `model` over `catalog` (source order; its content embeddings are
    not read: the index holds the model's item vectors), the fresh store folded in."""
    folded = ""
    if store is not None:
        f = fold_fresh(catalog, model, titles, store)
        catalog, model, titles = f.catalog, f.model, f.titles
        folded = f"folded the fresh store: {f.added:,} items added, {f.dropped:,} retired or " \
                 "replaced"
    stages, indexed, order = retrieval_stages(catalog, model, cfg.ann, task_weights)
    modules = {"filter": build_filter_stage(indexed, cfg.filter), **stages}
    modules["unified"] = UnifiedRetrieval(modules["filter"], modules["ann"], modules["scorer"],
                                          modules["aggregator"])
    return Built(modules, indexed, tuple(model.tasks),
                 None if titles is None else titles[order], folded)


def export_modules(built: Built) -> Dict[str, torch.nn.Module]:
    """What each model's model.pt holds: the stages, the filter and ANN layers wrapped to serve
    the fresh rows too (stages/fresh.py), and `unified`."""
    ids = torch.from_numpy(built.catalog.item_ids)
    return dict(built.modules, filter=FreshFilter(built.modules["filter"], ids),
                ann=FreshAnn(built.modules["ann"], built.catalog.num_items))


def indexed_item_vectors(built: Built) -> np.ndarray:
    """The item vectors the `ann` stage searches, in index row order: the baseline's FAISS
    index holds the same ones (builder/baseline.py)."""
    return built.catalog.embeddings


class Staging:
    """Where a build writes before anything served changes, and the moves that publish it.

    Version 1: a sibling `<repository>.building/` (the template copied in) that replaces the
    repository at `commit()`; version N: `<model>/.<N>.building/` folders renamed to `<N>/`.
    Files next to items.csv are written as `<name>.building` and renamed. A failed build
    removes what it wrote (`abort()`).
    """

    def __init__(self, repository: Path, version: int, tasks: Tuple[str, ...]):
        self.repository = Path(repository)
        self.version = version
        self.moves: List[Tuple[Path, Path]] = []
        if version == 1:
            self.root = self.repository.with_name(self.repository.name + ".building")
            shutil.rmtree(self.root, ignore_errors=True)
            prepare_repository(self.root, tasks)
        else:
            if not (self.repository / "retrieval" / "config.pbtxt").exists():
                raise ValueError(f"{self.repository}: version {version} goes next to a built "
                                 "repository; build version 1 first")
            served = served_tasks(self.repository)
            if served != tuple(tasks):
                raise ValueError(f"{self.repository} serves the tasks {', '.join(served)}; "
                                 f"version {version} has {', '.join(tasks)}: a swap cannot "
                                 "change the tasks (build version 1 instead)")
            self.root = self.repository

    def model_dir(self, model: str) -> Path:
        """The folder to write `model`'s version into."""
        if self.version == 1:
            out = self.root / model / "1"
        else:
            out = self.root / model / f".{self.version}.building"
            shutil.rmtree(out, ignore_errors=True)
            final = self.root / model / str(self.version)
            self.moves.append((out, final))
        out.mkdir(parents=True, exist_ok=True)
        if self.version != 1:  # the entry point of every version is the same one-liner
            shutil.copy2(self.repository / model / "1" / "model.py", out / "model.py")
        return out

    def file(self, path: Path) -> Path:
        """A temporary name for `path`, renamed onto it at commit."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".building")
        self.moves.append((tmp, path))
        return tmp

    def commit(self) -> None:
        if self.version == 1:
            old = self.repository.with_name(self.repository.name + ".replaced")
            shutil.rmtree(old, ignore_errors=True)
            if self.repository.exists():
                os.replace(self.repository, old)
            os.replace(self.root, self.repository)
            shutil.rmtree(old, ignore_errors=True)
        for tmp, final in self.moves:
            if tmp.is_dir() and final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        self.moves.clear()

    def abort(self) -> None:
        if self.version == 1:
            shutil.rmtree(self.root, ignore_errors=True)
        for tmp, _ in self.moves:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)


def write_fresh_store(built: Built, cfg: BuildConfig, staging: Staging) -> Path:
    """Version 1: a new, empty store (the old one's items are in the index: fold_fresh),
    published with the build. Version N: the served store is kept; its items stay in it (and
    are also in N's index, where the same rows are hidden in favour of the fresh copies), so
    the served version keeps serving them until the swap."""
    catalog = built.catalog
    header = header_for(catalog.schema, catalog.embeddings.shape[1], cfg.fresh_capacity,
                        [f.shape[1] for f in catalog.features])
    directory = Path(cfg.fresh_dir or fresh_dir_for(cfg.repository))
    if cfg.version == 1:
        tmp = staging.file(directory / LOG_NAME)
        tmp.unlink(missing_ok=True)
        scratch = directory.with_name(directory.name + ".building")
        shutil.rmtree(scratch, ignore_errors=True)
        create_store(scratch, header, replace=True)
        os.replace(scratch / LOG_NAME, tmp)
        shutil.rmtree(scratch, ignore_errors=True)
        return directory
    if (directory / LOG_NAME).exists():
        existing = FreshStore(directory).header
        if not existing.compatible_with(header):
            raise ValueError(
                f"{directory}: the served fresh store's layout (capacity {existing.capacity}, "
                "features and values) differs from version "
                f"{cfg.version}'s: a swap keeps the store, so the catalog's features, values "
                "and --fresh-capacity must stay; build version 1 to change them")
        return directory
    create_store(directory, header)
    return directory


def read_source(cfg: BuildConfig, world: Optional[World] = None,
                echo: Callable[[str], None] = lambda s: None):
    """(BuildInput, the World or CatalogSource it came from) for `cfg`."""
    if cfg.catalog is not None:
        source = read_catalog(cfg.catalog, cfg.unknown_items, echo=echo)
        for task in source.tasks:
            if not TASK_NAME.match(task):
                raise ValueError(f"task {task!r}: task names are letters, digits, '_', '.', "
                                 "'-' (they name columns and config parameters)")
        return BuildInput.from_catalog(source), source
    world = world if world is not None else generate_world(cfg.world)
    return BuildInput.from_world(world), world


def build(cfg: BuildConfig, world: World = None, progress: bool = True,
          keep_source: bool = True):
    """Build the repository; returns what it was built from (the World, or the
    CatalogSource of `cfg.catalog`), or None with `keep_source=False`, which releases the
    source (its catalog's content vectors, logs and, for the synthetic world, latents: ~0.4 KB
    per item) once the model is trained, before the index and the artifacts are built (the
    CLI's choice: a 10M-item build peaks ~4 GB lower). Nothing served changes unless the
    build completes."""
    t0 = time.perf_counter()
    steps = tqdm(total=4 + len(STAGES), desc="build", disable=not progress, unit="step")
    steps.set_postfix_str(f"catalog {cfg.catalog}" if cfg.catalog
                          else f"synthetic world, {cfg.world.num_items:,} items")
    source, origin = read_source(cfg, world, echo=tqdm.write if progress else (lambda s: None))
    if progress and isinstance(origin, CatalogSource):
        tqdm.write(origin.summary())
    steps.update()
    steps.set_postfix_str("training (or loading) weights" if source.data is not None
                          else "pretrained vectors")
    store = read_fresh(cfg.fresh_dir or fresh_dir_for(cfg.repository)) \
        if cfg.fold_fresh else None
    model = load_model(source, cfg, progress)
    # once the model exists, the stages need the source's item ids, features and titles; its
    # content vectors, logs and (keep_source=False) the world they came from can go
    catalog = replace(source.catalog, embeddings=np.zeros((source.catalog.num_items, 0),
                                                          np.float32))
    titles, provenance = source.titles, source.provenance()
    weights = tuple(cfg.task_weights or source.task_weights)
    source = None
    if not keep_source:
        origin = None
    built = assemble_modules(catalog, titles, model, weights, cfg, store)
    del model, catalog, titles
    if built.folded and progress:
        tqdm.write(built.folded)
    steps.update()
    staging = Staging(cfg.repository, cfg.version, built.tasks)
    try:
        _write(built, provenance, cfg, staging, steps, t0)
        staging.commit()
    except BaseException:
        staging.abort()
        raise
    precompile_entry_points(cfg.repository)
    steps.close()
    return origin


def _write(built: Built, source: Provenance, cfg: BuildConfig, staging: Staging, steps,
           t0: float) -> None:
    exported = export_modules(built)
    schema = built.catalog.schema.to_json()
    files = TensorFiles()  # each catalog tensor written once, linked into every model
    for name in STAGES:
        steps.set_postfix_str(f"scripting {name}")
        out = staging.model_dir(name)
        files.save(exported[name], out)
        if name in ("filter", "unified"):  # the models that parse filter expressions
            (out / "schema.json").write_text(schema)
        steps.update()
    write_fresh_store(built, cfg, staging)
    # --- the baseline (builder/baseline.py): the service chain this project replaces, over the
    # same catalog rows, item vectors and user tower as the `ann` stage -----------------------
    steps.set_postfix_str("baseline (FAISS index)")
    baseline_dirs = {m: staging.model_dir(m) for m in BASELINE_MODELS}
    build_baseline(baseline_dirs, built.catalog, indexed_item_vectors(built),
                   built.modules["ann"].users, built.catalog.schema, cfg.ann.oversample,
                   cfg.baseline, built.modules["ann"].built_history)
    steps.update()
    # --- end of the baseline ----------------------------------------------------------------
    steps.set_postfix_str("items.csv")
    items_csv = Path(cfg.items_csv)
    write_items_csv(built.catalog, staging.file(items_csv))
    titles_csv = items_csv.with_name(TITLES_CSV)
    if built.titles is not None:
        write_titles_csv(built.catalog, built.titles, staging.file(titles_csv))
    elif cfg.version == 1:
        titles_csv.unlink(missing_ok=True)
    # the indexed vectors in items.csv order: `client update --embedding-from-item`
    with open(staging.file(items_csv.with_name("item_embeddings.npy")), "wb") as fh:
        np.save(fh, built.catalog.embeddings)
    with open(staging.file(items_csv.with_name("users.csv")), "w") as fh:
        fh.write("user_id\n" + "".join(f"{u}\n" for u in source.user_ids.tolist()))
    info = {"source": source.info, "name": source.name, "num_items": built.catalog.num_items,
            "tasks": list(built.tasks),
            "task_weights": list(cfg.task_weights or source.task_weights),
            "features": [f.name for f in built.catalog.schema.features],
            "repository": str(Path(cfg.repository).resolve()), "version": cfg.version,
            "fresh": built.folded, "config": asdict(cfg), "items_csv": str(items_csv),
            "build_seconds": round(time.perf_counter() - t0, 1)}
    staging.file(items_csv.with_name("build_info.json")).write_text(
        json.dumps(info, indent=1, default=str))
    steps.update()

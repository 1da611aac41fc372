"""Catalog + trained weights -> a Triton model repository.

Writes, for every stage, `<repository>/<stage>/1/model.pt` (TorchScript) next to the
checked-in `config.pbtxt` and `model.py`, plus `filter/1/schema.json` (what the parser needs)
and the indexed catalog as `items.csv` so that anyone can check results. When the target is not
the checked-in `model_repository/`, the configs and model.py files are copied there first.
"""

from __future__ import annotations

import csv
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict

import numpy as np
import torch
from tqdm import tqdm

import kernels  # noqa: F401  (ops must exist before modules that call them are scripted)
from stages.aggregator import ValueModel
from stages.ann import AnnStage, ExactSearch
from stages.filter import ExactFeatureFilter
from stages.scorer import DotProductTaskScorer
from stages.user import UserTable
from training.fit_heads import fit_baseline
from world.synthetic import Catalog, World, WorldConfig, generate_world

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "model_repository"
STAGES = ("filter", "ann", "scorer", "aggregator")


@dataclass
class BuildConfig:
    world: WorldConfig = field(default_factory=WorldConfig)
    repository: Path = TEMPLATE
    items_csv: Path = ROOT / "build" / "items.csv"
    oversample: int = 4  # ANN candidates per requested result, reordered by the scorer
    # Value Model defaults: value = sum_t w_t * p_t over (click, like, share)
    task_weights: tuple = (1.0, 2.0, 4.0)
    holdout_fraction: float = 0.1  # latest interactions kept out of fitting, for evaluation


def feature_matrix(catalog: Catalog):
    """int64 [N, S] value ids of all features side by side and column_start [F + 1]."""
    cols = [f for f in catalog.features]
    start = np.cumsum([0] + [c.shape[1] for c in cols])
    return torch.from_numpy(np.concatenate(cols, axis=1)), torch.from_numpy(start)


def write_items_csv(catalog: Catalog, path: Path) -> None:
    """item_id plus one column per feature, each value spelled as a filter expression spells
    it; multi-valued features joined by '|'."""
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
            out.writerow([item_id] + ["|".join(col[r]) for col in spelled])


def split_holdout(world: World, fraction: float):
    """(train mask, holdout mask) over interactions: the latest `fraction` by time."""
    ts = world.interactions.timestamp
    cut = np.quantile(ts, 1.0 - fraction)
    return ts < cut, ts >= cut


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


def build_modules(world: World, cfg: BuildConfig) -> Dict[str, torch.nn.Module]:
    catalog = world.catalog
    train, _ = split_holdout(world, cfg.holdout_fraction)
    log = world.interactions
    fitted = fit_baseline(world.user_ids, catalog.embeddings, type(log)(
        log.user_index[train], log.item_index[train], log.labels[train], log.timestamp[train]))
    emb = torch.from_numpy(catalog.embeddings)
    matrix, start = feature_matrix(catalog)
    users = UserTable(torch.from_numpy(fitted.user_ids), torch.from_numpy(fitted.user_embeddings),
                      torch.from_numpy(fitted.cold_start))
    return {
        "filter": ExactFeatureFilter(matrix, start),
        "ann": AnnStage(users, ExactSearch(emb), oversample=cfg.oversample),
        "scorer": DotProductTaskScorer(emb, torch.from_numpy(fitted.head_scale),
                                       torch.from_numpy(fitted.head_bias)),
        "aggregator": ValueModel(torch.from_numpy(catalog.item_ids),
                                 torch.tensor(cfg.task_weights, dtype=torch.float32)),
    }


def build(cfg: BuildConfig, world: World = None, progress: bool = True) -> World:
    """Build the repository; returns the world it was built from."""
    t0 = time.perf_counter()
    steps = tqdm(total=3 + len(STAGES), desc="build", disable=not progress, unit="step")
    if world is None:
        steps.set_postfix_str(f"synthetic world, {cfg.world.num_items:,} items")
        world = generate_world(cfg.world)
    steps.update()
    steps.set_postfix_str("fitting weights")
    modules = build_modules(world, cfg)
    steps.update()
    repo = Path(cfg.repository)
    prepare_repository(repo)
    for name in STAGES:
        steps.set_postfix_str(f"scripting {name}")
        out = repo / name / "1"
        out.mkdir(parents=True, exist_ok=True)
        torch.jit.script(modules[name].eval()).save(str(out / "model.pt"))
        steps.update()
    (repo / "filter" / "1" / "schema.json").write_text(world.catalog.schema.to_json())
    steps.set_postfix_str("items.csv")
    write_items_csv(world.catalog, Path(cfg.items_csv))
    with open(Path(cfg.items_csv).with_name("users.csv"), "w") as fh:
        fh.write("user_id\n" + "\n".join(str(u) for u in world.user_ids.tolist()) + "\n")
    info = {"world": asdict(cfg.world), "num_items": world.catalog.num_items,
            "task_weights": list(cfg.task_weights), "oversample": cfg.oversample,
            "items_csv": str(cfg.items_csv), "build_seconds": round(time.perf_counter() - t0, 1)}
    Path(cfg.items_csv).with_name("build_info.json").write_text(json.dumps(info, indent=1))
    steps.update()
    steps.close()
    return world

"""Catalog directories (catalog/, docs/catalog.md): every form read to the same arrays, every bad
input named by file, row and column, builds that touch nothing unless they complete, and
rebuilds that fold the fresh store."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from catalogs import (
    csv_shop,
    movielens_dir,
    parquet_shop,
    pretrained_shop,
    shop_interactions,
    shop_items,
    to_arrow,
    write_csv,
)

from builder.__main__ import main as builder_main
from catalog import CatalogError, read_catalog
from catalog.tables import MAX_DISTINCT_VALUES
from client.catalog import load_items
from training.train import TrainConfig


def raw_values(source, name):
    """feature -> per item the set of raw values."""
    schema = source.catalog.schema
    spec = schema.features[schema.feature_id(name)]
    column = source.catalog.features[schema.feature_id(name)]
    return [{spec.spell(v) for v in row if v >= 0} for row in column.tolist()]


def test_parquet_and_csv_forms_read_the_same_catalog(tmp_path):
    pq_source = read_catalog(parquet_shop(tmp_path / "pq"))
    printed = []
    csv_source = read_catalog(csv_shop(tmp_path / "csv"), echo=printed.append)
    items = shop_items()
    for source in (pq_source, csv_source):
        assert source.catalog.item_ids.tolist() == items["item_id"].tolist()
        assert raw_values(source, "brand") == [{b} for b in items["brand"]]
        assert raw_values(source, "category") == [{c} for c in items["category"]]
        assert raw_values(source, "shelf") == [{str(s)} for s in items["shelf"]]
        np.testing.assert_array_equal(source.catalog.embeddings, items["embedding"])
        assert source.titles.tolist() == items["title"]
        assert source.tasks == ("click", "buy") and source.logged_impressions
        inter = shop_interactions(items)
        assert source.catalog.item_ids[source.interactions.item_index].tolist() == \
            inter["item_id"].tolist()
        assert source.user_ids[source.interactions.user_index].tolist() == \
            inter["user_id"].tolist()
        np.testing.assert_array_equal(source.interactions.labels[:, 1], inter["buy"])
    assert raw_values(pq_source, "tags") == [set(t) for t in items["tags"]]
    assert pq_source.task_weights == (1.0, 3.0) and csv_source.task_weights == (1.0, 1.0)
    # the CSV form had no catalog.toml: the inferred schema is printed as catalog.toml
    text = printed[0]
    assert 'brand = { kind = "str" }' in text and 'shelf = { kind = "int" }' in text
    assert 'tags = { kind = "str", multi_valued = true }' in text
    assert "price" not in text.split("[features]")[1]  # a float column is no filter feature
    assert 'title = "title"' in text and 'vector_ids = "item_vector_ids.npy"' in text


def test_movielens_layout_and_pretrained_vectors(tmp_path):
    ml = read_catalog(movielens_dir(tmp_path / "ml"))
    assert ml.layout == "movielens" and ml.tasks == ("rated", "liked", "loved")
    assert not ml.logged_impressions and ml.catalog.embeddings.shape == (5, 0)
    assert raw_values(ml, "genres")[3] == {"(no genres listed)"}
    pre = read_catalog(pretrained_shop(tmp_path / "pre"))
    assert pre.interactions is None and pre.user_vectors.shape == (50, 16)
    assert pre.user_ids.tolist() == list(range(1000, 50001, 1000))


def _table(path: Path, columns: dict) -> None:
    if path.suffix == ".parquet":
        pq.write_table(to_arrow(columns), path)
    else:
        write_csv(columns, path)


def _shop(tmp_path: Path, edit) -> Path:
    """The Parquet shop, its items and interactions passed through `edit(items, inter)`."""
    d = parquet_shop(tmp_path / "shop")
    items = shop_items()
    inter = shop_interactions(items)
    result = edit(items, inter)
    if isinstance(result, tuple):  # an edit may return new (items, interactions)
        items, inter = result
    _table(d / "items.parquet", items)
    _table(d / "interactions.parquet", inter)
    return d


def _set(column, row, value):
    column = list(column) if not isinstance(column, np.ndarray) else column.copy()
    column[row] = value
    return column


BAD_INPUTS = {
    "missing item_id": (lambda i, x: i.pop("item_id"), r"items.parquet: no column 'item_id'"),
    "missing declared column": (lambda i, x: i.pop("shelf"),
                                r"items.parquet: no column 'shelf' \(columns: item_id, brand"),
    "duplicate ids": (lambda i, x: i.update(item_id=_set(i["item_id"], 9, i["item_id"][2])),
                      r"items.parquet: rows 3 and 10, column 'item_id': duplicate item id"),
    "ids not int64": (lambda i, x: i.update(item_id=[str(v) for v in i["item_id"][:4]]
                                            + ["sku-5"] + [str(v) for v in i["item_id"][5:]]),
                      r"items.parquet: row 5, column 'item_id': 'sku-5' is not an int64 "
                      r"integer"),
    "NaN vector": (lambda i, x: i["embedding"].__setitem__((7, 3), np.nan),
                   r"items.parquet: column 'embedding': row 8: vector has NaN or infinity"),
    "wrong-width vectors": (
        lambda i, x: i.update(embedding=[list(v) for v in i["embedding"][:11]]
                              + [list(i["embedding"][11][:15])]
                              + [list(v) for v in i["embedding"][12:]]),
        r"items.parquet: row 12, column 'embedding': vector of 15 values, row 1 has 16"),
    "unknown items": (lambda i, x: x.update(item_id=_set(x["item_id"], 4, 42)),
                      r"interactions.parquet: row 5, column 'item_id': item 42 is not in the "
                      r"catalog \(1 of 3,000 rows name unknown items; unknown_items = \"skip\""),
    "empty catalog": (lambda i, x: ({k: v[:0] for k, v in i.items()}, x),
                      r"items.parquet: no items \(an empty catalog cannot be served\)"),
    "unparsable timestamp": (lambda i, x: x.update(timestamp=_set(
        [str(t) for t in x["timestamp"]], 6, "next tuesday")),
        r"interactions.parquet: row 7, column 'timestamp': cannot read 'next tuesday' as a "
        r"time"),
    "labels not 0/1": (lambda i, x: x.update(buy=_set(x["buy"], 2, 5)),
                       r"interactions.parquet: row 3, column 'buy': task labels are 0 or 1"),
    "negative int value": (lambda i, x: i.update(shelf=_set(i["shelf"], 0, -3)),
                           r"items.parquet: row 1, column 'shelf': -3 is negative"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_named_by_file_row_and_column(tmp_path, case):
    edit, message = BAD_INPUTS[case]
    d = _shop(tmp_path, edit)
    with pytest.raises(CatalogError, match=message):
        read_catalog(d)


def test_unknown_kind_and_too_many_values_and_skip(tmp_path):
    d = parquet_shop(tmp_path / "shop")
    toml = (d / "catalog.toml").read_text()
    (d / "catalog.toml").write_text(toml.replace('shelf = { kind = "int" }',
                                                 'shelf = { kind = "float" }'))
    with pytest.raises(CatalogError, match=r"catalog.toml: features.shelf: unknown kind "
                                           r"'float' \(kinds: 'str', 'int'\)"):
        read_catalog(d)
    (d / "catalog.toml").write_text(toml)
    items = shop_items()
    inter = shop_interactions(items)
    inter["item_id"] = _set(inter["item_id"], 4, 42)
    _table(d / "interactions.parquet", inter)
    source = read_catalog(d, unknown_items="skip")
    assert source.skipped_interactions == 1 and len(source.interactions.item_index) == 2999
    # a str feature with more distinct values than the limit
    many = {"item_id": np.arange(MAX_DISTINCT_VALUES + 1, dtype=np.int64),
            "sku": pa.array(np.arange(MAX_DISTINCT_VALUES + 1).astype(str))}
    big = tmp_path / "big"
    big.mkdir()
    pq.write_table(pa.table(many), big / "items.parquet")
    (big / "catalog.toml").write_text('[features]\nsku = { kind = "str" }\n')
    with pytest.raises(CatalogError, match=r"column 'sku' has 1,000,001 distinct values, over "
                                           r"the filter index's limit of 1,000,000"):
        read_catalog(big)


def test_nothing_to_rank_by(tmp_path):
    d = parquet_shop(tmp_path / "shop", interactions=False)
    with pytest.raises(CatalogError, match="item vectors without interactions need pretrained "
                                           "user vectors"):
        read_catalog(d)


def _digest(directory: Path) -> dict:
    return {str(p.relative_to(directory)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_failed_build_leaves_the_served_repository_untouched(tmp_path, capsys):
    """Build a repository from pretrained vectors, then a bad catalog into the same place:
    the error names the problem, exit 2, and every file is as it was."""
    out = tmp_path / "out"
    args = ["--repository", str(out / "model_repository"), "--items-csv",
            str(out / "items.csv")]
    assert builder_main(["--catalog", str(pretrained_shop(tmp_path / "pre"))] + args) == 0
    before = _digest(out)
    assert (out / "model_repository" / "unified" / "1" / "model.pt").exists()
    bad = pretrained_shop(tmp_path / "bad")
    items = shop_items()
    items["item_id"] = _set(items["item_id"], 9, items["item_id"][2])
    _table(bad / "items.parquet", items)
    assert builder_main(["--catalog", str(bad)] + args) == 2
    err = capsys.readouterr().err
    assert "duplicate item id" in err and "nothing was written" in err
    assert _digest(out) == before
    assert not list(tmp_path.rglob("*.building"))


def test_pretrained_build_serves_the_dot_product(tmp_path):
    """No interactions: one task `similarity`, scores sigmoid(<u, v>) of the given vectors,
    results exactly the exact top k by inner product (small catalog: exact fallback)."""
    import torch

    from builder.build import BuildConfig, build, served_tasks
    from serving.runners import RUNNERS

    d = pretrained_shop(tmp_path / "pre")
    repo = tmp_path / "repo"
    source = build(BuildConfig(catalog=d, repository=repo, items_csv=tmp_path / "items.csv"),
                   progress=False)
    assert served_tasks(repo) == ("similarity",)
    unified = RUNNERS["unified"](repo / "unified" / "1", {"tasks": "similarity"})
    user = int(source.user_ids[3])
    out = unified.run([{"user_id": np.array([[user]]), "k": np.array([[10]], np.int32),
                        "filter": np.array([[b""]], object)}])[0]
    scores = source.catalog.embeddings @ source.user_vectors[3]
    best = source.catalog.item_ids[np.argsort(-scores)[:10]]
    assert set(out["item_ids"][0].tolist()) == set(best.tolist())
    np.testing.assert_allclose(out["task_scores"][0][:, 0],
                               torch.sigmoid(torch.from_numpy(np.sort(scores)[::-1][:10]
                                                              .copy())).numpy(), rtol=1e-4)


def test_rebuild_folds_the_fresh_store(tmp_path):
    """Items added, replaced and retired through the store are in (or out of) the rebuilt
    index; version 1 then starts an empty store of the new capacity; version 2 keeps it."""
    from builder.build import BuildConfig, build
    from fresh.store import FreshStore

    d = pretrained_shop(tmp_path / "pre")
    repo, items_csv = tmp_path / "repo", tmp_path / "items.csv"
    cfg = BuildConfig(catalog=d, repository=repo, items_csv=items_csv, fresh_capacity=64)
    source = build(cfg, progress=False)
    ids = source.catalog.item_ids
    store = FreshStore(tmp_path / "fresh_items", writable=True)
    vec = np.ones(16, np.float32)
    new_id, replaced, retired = 777, int(ids[0]), int(ids[1])
    store.write([[store.header.upsert(new_id, vec, 'brand="Procter & Gamble",category=home,'
                                                   'shelf=3,tags=sale')],
                 [store.header.upsert(replaced, vec, "brand=plain,category=home,shelf=99")],
                 [store.header.retire(retired)]])
    build(BuildConfig(catalog=d, repository=repo, items_csv=items_csv, version=2,
                      fresh_capacity=64), progress=False)
    v2 = load_items(items_csv)
    assert v2[new_id] == {"brand": ["Procter & Gamble"], "category": ["home"], "shelf": ["3"],
                          "tags": ["sale"]}
    assert v2[replaced]["shelf"] == ["99"]
    assert retired not in v2 and len(v2) == len(ids)
    assert FreshStore(tmp_path / "fresh_items").updates == 1  # kept for the served version
    build(BuildConfig(catalog=d, repository=repo, items_csv=items_csv, fresh_capacity=128),
          progress=False)
    v1 = load_items(items_csv)
    assert v1 == v2
    fresh = FreshStore(tmp_path / "fresh_items")
    assert fresh.updates == 0 and fresh.header.capacity == 128
    assert not (repo / "unified" / "2").exists()  # a version-1 build is a new repository


def test_builder_overarch_epochs_reach_the_training_config(capsys):
    """--overarch-epochs sets OverArchTrainConfig.epochs (0: the logistic fit is kept); a
    negative count is a usage error naming the option."""
    from builder.__main__ import config_from_args

    cfg, _ = config_from_args(["--overarch-epochs", "0"])
    assert cfg.training.over_arch.epochs == 0
    cfg, _ = config_from_args([])
    assert cfg.training == TrainConfig(retrieval=cfg.training.retrieval)  # the cache key holds
    with pytest.raises(SystemExit):
        config_from_args(["--overarch-epochs", "-1"])
    assert "--overarch-epochs must be >= 0" in capsys.readouterr().err

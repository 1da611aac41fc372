"""Learned retrieval (issue 5): training lowers the losses, the user tower / item tower /
OverArch scorer script and match eager, the scorer is request-only, the Value Model's order
follows the task weights, weights files round-trip and are reused."""

import dataclasses

import numpy as np
import pytest
import torch

from stages.aggregator import ValueModel
from stages.scorer import OverArch, OverArchConfig
from stages.user import UserTower
from training.data import from_world, holdout_split, subset, time_split
from training.evaluate import ndcg
from training.over_arch import (
    OverArchModel,
    OverArchTrainConfig,
    OverArchValidation,
    retrieved_negatives,
    task_losses,
    train_over_arch,
    validation_auc,
)
from training.retrieval import RetrievalModel, build_user_tower
from training.towers import (
    ClickHistory,
    ExampleQueries,
    ItemTower,
    TwoTowerConfig,
    ValidationCut,
    in_batch_softmax_loss,
    train_two_tower,
)
from training.train import (
    TrainConfig,
    load_or_train,
    rows_per_user,
    train,
    training_config_for,
    weights_path,
)
from training.weights import TrainedWeights
from world.synthetic import WorldConfig, generate_world

WORLD = generate_world(WorldConfig(seed=11, num_items=900, num_users=240, num_creators=40,
                                   impressions_per_user=30))
DATA = from_world(WORLD)
TRAIN_MASK, HOLDOUT_MASK = time_split(DATA.interactions, 0.1)
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-6)}


@pytest.fixture(scope="module")
def weights() -> TrainedWeights:
    return train(DATA, TRAIN_MASK, TrainConfig(), progress=False, holdout_mask=HOLDOUT_MASK)


def towers(config: TwoTowerConfig):
    log = subset(DATA.interactions, TRAIN_MASK)
    id_map, user_rows, values, feature_weights = rows_per_user(
        DATA, np.unique(log.user_index), 0, TrainConfig())
    users = UserTower(id_map, values, feature_weights, DATA.user_features.num_values,
                      torch.zeros(id_map.unknown_row + 1, config.user.history_dim), config.user)
    items = ItemTower(torch.from_numpy(DATA.catalog.embeddings),
                      torch.from_numpy(DATA.item_features.values),
                      torch.from_numpy(DATA.item_features.weights),
                      DATA.item_features.num_values, config.item)
    clicks = torch.from_numpy(log.labels[:, 0] > 0)
    ui, ii = torch.from_numpy(log.user_index), torch.from_numpy(log.item_index)
    history = ClickHistory(ui[clicks], ii[clicks], len(DATA.user_ids))
    return ExampleQueries(users, user_rows, history), items, ui, ii, clicks, log


def fixed_batch_loss(queries, items, ui, ii, temperature):
    """The in-batch softmax loss of the first 512 clicks, no cold-start substitution."""
    with torch.no_grad():
        queries.history.refresh(items.all_items())
        u, i = ui[:512], ii[:512]
        q = queries(u, i, torch.ones_like(u, dtype=torch.bool),
                    torch.zeros_like(u, dtype=torch.bool))
        counts = torch.bincount(ii, minlength=DATA.catalog.num_items).float()
        log_q = torch.log(counts / ii.numel()).clamp(min=-30.0)
        return float(in_batch_softmax_loss(q, items(i), i, log_q[i], temperature))


def test_two_tower_training_lowers_the_in_batch_softmax_loss():
    config = TwoTowerConfig(epochs=6, batch_size=256, learning_rate=3e-3, cold_start_rate=0.0)
    torch.manual_seed(0)
    queries, items, ui, ii, clicks, _ = towers(config)
    before = fixed_batch_loss(queries, items, ui[clicks], ii[clicks], config.temperature)
    losses, recalls = train_two_tower(queries, items, ui[clicks], ii[clicks], config,
                                      torch.Generator().manual_seed(0), progress=False)
    assert recalls == []  # no validation cut: every epoch
    after = fixed_batch_loss(queries, items, ui[clicks], ii[clicks], config.temperature)
    assert np.isfinite(losses).all()
    assert after < before - 0.1, (before, after)


def test_validation_cut_recall_matches_a_per_user_loop():
    queries, items, ui, ii, clicks, _ = towers(TwoTowerConfig())
    rng = np.random.default_rng(3)
    held = torch.from_numpy(rng.random(len(ui)) < 0.2) & clicks
    cut = ValidationCut(ui[held], ii[held], ui[~held], ii[~held], k=7, max_users=30)
    got = cut.recall(queries, items)
    vectors = items.all_items()
    recalls = []
    for u in cut.users.tolist():
        query = queries.users.encode(queries.user_rows[[u]], queries.history.all_users()[[u]])
        scores = (query @ vectors.T)[0]
        scores[ii[~held][ui[~held] == u]] = float("-inf")
        top = torch.topk(scores, 7).indices
        relevant = torch.unique(ii[held][ui[held] == u])
        recalls.append(float(torch.isin(top, relevant).sum()) / min(7, len(relevant)))
    assert len(recalls) == 30
    assert got == pytest.approx(np.mean(recalls))


def test_validation_cut_over_a_large_catalog_ranks_a_fixed_sample_with_the_clicked_items():
    queries, items, ui, ii, clicks, _ = towers(TwoTowerConfig())
    rng = np.random.default_rng(4)
    held = torch.from_numpy(rng.random(len(ui)) < 0.2) & clicks
    cut = ValidationCut(ui[held], ii[held], ui[~held], ii[~held], k=7, max_users=30,
                        max_items=300)
    assert ValidationCut(ui[held], ii[held], ui[~held], ii[~held]).candidates(
        DATA.catalog.num_items)[0] is None  # up to max_items: every item, exact
    rows = cut.candidates(DATA.catalog.num_items)[0]
    relevant_items = torch.unique(ii[held][torch.isin(ui[held], cut.users)])
    assert torch.isin(relevant_items, rows).all()
    assert len(relevant_items) < len(rows) <= 300 < DATA.catalog.num_items
    assert torch.equal(rows, cut.candidates(DATA.catalog.num_items)[0])  # the same each epoch
    got = cut.recall(queries, items)
    vectors = items.all_items()
    recalls = []
    for u in cut.users.tolist():  # the per-user loop over the candidate rows only
        query = queries.users.encode(queries.user_rows[[u]], queries.history.all_users()[[u]])
        scores = torch.full((DATA.catalog.num_items,), float("-inf"))
        scores[rows] = (query @ vectors[rows].T)[0]
        scores[ii[~held][ui[~held] == u]] = float("-inf")
        top = torch.topk(scores, 7).indices
        relevant = torch.unique(ii[held][ui[held] == u])
        recalls.append(float(torch.isin(top, relevant).sum()) / min(7, len(relevant)))
    assert got == pytest.approx(np.mean(recalls))


def test_click_history_holds_the_clicked_items_only_and_sums_as_a_per_user_loop():
    queries, items, ui, ii, clicks, _ = towers(TwoTowerConfig())
    with torch.no_grad():  # a tower that is not the identity on the content
        for p in items.mlp.parameters():
            p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(1))
    history = ClickHistory(ui[clicks], ii[clicks], len(DATA.user_ids))
    history.refresh_from(items.encode)
    assert len(history.items) == len(torch.unique(ii[clicks])) < DATA.catalog.num_items
    full = ClickHistory(ui[clicks], ii[clicks], len(DATA.user_ids))
    full.refresh(items.all_items())
    assert torch.equal(history.sums, full.sums)  # the same vectors, summed in the same order
    vectors = items.all_items()
    examples = torch.arange(0, len(ui), 7)
    leave_out = clicks[examples]
    got = history.vectors(ui[examples], ii[examples], leave_out)
    for j, e in enumerate(examples.tolist()):
        mine = clicks & (ui == ui[e])
        rows = ii[mine].tolist()
        if leave_out[j]:
            rows.remove(int(ii[e]))
        want = vectors[rows].sum(0) / max(len(rows), 1)
        torch.testing.assert_close(got[j], want, **TOLERANCE[torch.float32])


def over_arch_inputs(tower_epochs: int):
    """Trained towers (as `towers`), their item vectors, and the impressions' labels."""
    torch.manual_seed(0)
    queries, items, ui, ii, _, log = towers(TwoTowerConfig(epochs=tower_epochs, batch_size=256,
                                                           cold_start_rate=0.0))
    item_vectors = items.all_items()
    queries.history.refresh(item_vectors)
    return queries, item_vectors, ui, ii, torch.from_numpy(log.labels)


def test_over_arch_training_improves_on_its_calibrated_dot_product_start():
    queries, item_vectors, ui, ii, labels = over_arch_inputs(2)
    model = OverArchModel(64, DATA.catalog.num_items, 3, OverArchConfig())
    train_config = OverArchTrainConfig(epochs=0, cold_start_rate=0.0)
    train_over_arch(model, queries, item_vectors, ui, ii, labels, train_config,
                    torch.Generator().manual_seed(0), progress=False)  # the start only

    def bce():
        with torch.no_grad():
            u = queries(ui, ii, labels[:, 0] > 0, torch.zeros_like(ui, dtype=torch.bool))
            return task_losses(model(u, item_vectors[ii], ii), labels)

    start = bce()
    history, aucs = train_over_arch(model, queries, item_vectors, ui, ii, labels,
                                    dataclasses.replace(train_config, epochs=4),
                                    torch.Generator().manual_seed(1), progress=False)
    end = bce()
    assert len(history) == 4 and aucs == []  # no validation cut: the last epoch
    assert torch.all(end < start), (start, end)


def test_over_arch_keeps_the_epoch_best_on_its_validation_cut():
    """With a validation cut: one AUC before training (the dot-product fit) and one per
    epoch, and the model ends with the best one's weights (recomputed here, not taken from the
    list); without early stopping, with the last epoch's. A learning rate far too high makes
    the later epochs worse, so that the two differ."""
    queries, item_vectors, ui, ii, labels = over_arch_inputs(1)
    cut = torch.arange(len(ui)) % 5 == 0
    validation = OverArchValidation(ui[cut], ii[cut], labels[cut])
    for early in (True, False):
        model = OverArchModel(64, DATA.catalog.num_items, 3, OverArchConfig())
        train_config = OverArchTrainConfig(epochs=2, cold_start_rate=0.0, learning_rate=0.3,
                                           early_stopping=early)
        history, aucs = train_over_arch(model, queries, item_vectors, ui[~cut], ii[~cut],
                                        labels[~cut], train_config,
                                        torch.Generator().manual_seed(1), progress=False,
                                        validation=validation)
        assert len(history) == 2 and len(aucs) == 3
        final = validation_auc(model, queries, item_vectors, validation)
        assert final == pytest.approx(max(aucs) if early else aucs[-1], abs=1e-9), (early, aucs)
        assert max(aucs) > aucs[-1]  # else the two would not differ


def test_training_metrics_and_determinism(weights):
    m = weights.metrics
    assert m["id_map_overflow"] == 0
    # early stopping on the validation cut: at most `epochs`, at least one past the best
    recalls = m["validation_recall@50"]
    assert len(m["tower_loss"]) == len(recalls) <= TrainConfig().two_tower.epochs
    assert all(0.0 <= r <= 1.0 for r in recalls)
    assert all(0.5 < a <= 1.0 for a in m["holdout_auc"])  # held-out: better than chance
    again = train(DATA, TRAIN_MASK, TrainConfig(), progress=False)
    torch.testing.assert_close(again.item_vectors, weights.item_vectors, rtol=0, atol=0)
    torch.testing.assert_close(again.item_extra, weights.item_extra, rtol=0, atol=0)


def test_user_tower_scripts_matches_eager_and_serves_unknown_users_the_cold_start_row(weights):
    tower = build_user_tower(weights)
    scripted = torch.jit.script(tower)
    ids = torch.from_numpy(WORLD.user_ids[:7].copy())
    ids[5], ids[6] = 987654321, -3  # unknown, negative (padding) ids
    eager = tower(ids)
    torch.testing.assert_close(scripted(ids), eager, **TOLERANCE[torch.float32])
    torch.testing.assert_close(eager.norm(dim=1), torch.ones(7), **TOLERANCE[torch.float32])
    unknown = tower.id_map.unknown_row
    cold = tower.encode(torch.tensor([unknown]), torch.zeros(1, 64))[0]
    torch.testing.assert_close(eager[5], cold, **TOLERANCE[torch.float32])
    torch.testing.assert_close(eager[6], cold, **TOLERANCE[torch.float32])
    # serving only reads the id map
    before = tower.id_map.identities.clone()
    tower(torch.tensor([111, 222, 333]))
    assert torch.equal(tower.id_map.identities, before)
    # known users are told apart from the cold-start row
    assert not torch.allclose(eager[0], cold)


def test_item_tower_scripts_and_matches_eager():
    for content in (torch.from_numpy(DATA.catalog.embeddings), torch.zeros(900, 0)):
        tower = ItemTower(content, torch.from_numpy(DATA.item_features.values),
                          torch.from_numpy(DATA.item_features.weights),
                          DATA.item_features.num_values, TwoTowerConfig().item)
        torch.nn.init.normal_(tower.mlp[2].weight)  # a non-trivial residual
        rows = torch.tensor([0, 5, 899, 17, 17])
        torch.testing.assert_close(torch.jit.script(tower)(rows), tower(rows),
                                   **TOLERANCE[torch.float32])


def test_scorer_scripts_matches_eager_and_is_request_only(weights):
    order = np.random.default_rng(0).permutation(DATA.catalog.num_items)
    scorer = RetrievalModel.trained(weights).scorer(order)
    scripted = torch.jit.script(scorer)
    user = build_user_tower(weights)(torch.from_numpy(WORLD.user_ids[:3].copy()))
    rows = torch.tensor([[0, 4, 7, 899, 3], [12, 13, -1, -1, -1], [5, 5, 6, 1, 2]])
    eager = scorer(user, rows)
    assert eager.shape == (3, 5, 3)
    torch.testing.assert_close(scripted(user, rows), eager, **TOLERANCE[torch.float32])
    # request-only: scoring each candidate alone (its own copy of the user vector) gives the
    # same probabilities as one user vector broadcast over the request's candidates
    for b in range(3):
        for c in range(5):
            alone = scorer(user[b: b + 1], rows[b: b + 1, c: c + 1])
            torch.testing.assert_close(alone[0, 0], eager[b, c], **TOLERANCE[torch.float32])
    # rows are index rows: row r holds catalog item order[r]
    catalog_rows = torch.from_numpy(order[[0, 4, 7, 899, 3]])
    over_arch = scorer.over_arch
    direct = torch.sigmoid(over_arch(user[:1], weights.item_vectors[catalog_rows][None],
                                     weights.item_extra[catalog_rows][None]))
    torch.testing.assert_close(direct[0], eager[0], **TOLERANCE[torch.float32])


def test_value_model_order_follows_the_task_weights(weights):
    scorer = RetrievalModel.trained(weights).scorer(np.arange(DATA.catalog.num_items))
    value_model = ValueModel(torch.from_numpy(DATA.catalog.item_ids),
                             torch.tensor([1.0, 2.0, 4.0]))
    user = build_user_tower(weights)(torch.from_numpy(WORLD.user_ids[:1].copy()))
    rows = torch.arange(0, 600, 3).unsqueeze(0)
    tasks = scorer(user, rows)
    counts, k = torch.tensor([rows.shape[1]]), torch.tensor([20])
    orders = {}
    for name, w in {"click": [1.0, 0.0, 0.0], "like": [0.0, 1.0, 0.0],
                    "share": [0.0, 0.0, 1.0], "default": [1.0, 2.0, 4.0]}.items():
        weights_t = torch.tensor([w])
        ids, values, top_tasks, n = value_model(rows, tasks, counts, k, weights_t)
        assert int(n[0]) == 20
        value = (tasks[0] * weights_t).sum(1)
        want = torch.sort(value, descending=True, stable=True).indices[:20]
        assert torch.equal(ids[0], value_model.item_ids[rows[0, want]]), name
        torch.testing.assert_close(values[0], value[want])
        torch.testing.assert_close(top_tasks[0], tasks[0, want])
        orders[name] = ids[0].tolist()
    # different task weights give different top 20s (the heads are not one score)
    assert len({tuple(o) for o in orders.values()}) == 4


def test_weights_file_round_trip_and_reuse(weights, tmp_path, monkeypatch):
    path = tmp_path / "w.pt"
    weights.save(path)
    loaded = TrainedWeights.load(path)
    ids = torch.from_numpy(WORLD.user_ids[:4].copy())
    torch.testing.assert_close(build_user_tower(loaded)(ids), build_user_tower(weights)(ids),
                               rtol=0, atol=0)
    rows = torch.tensor([[1, 2, 3]])
    q = build_user_tower(weights)(ids[:1])
    order = np.arange(DATA.catalog.num_items)
    loaded_scorer, scorer = (RetrievalModel.trained(w).scorer(order) for w in (loaded, weights))
    torch.testing.assert_close(loaded_scorer(q, rows),
                               scorer(q, rows), rtol=0, atol=0)
    # load_or_train: trains and saves once, then reuses the file for the same data and config
    config = TrainConfig(two_tower=TwoTowerConfig(epochs=1),
                         over_arch=OverArchTrainConfig(epochs=1))
    first = load_or_train(DATA, 0.1, config, tmp_path, progress=False)
    assert weights_path(DATA, 0.1, config, tmp_path).exists()

    def no_training(*args, **kwargs):
        raise AssertionError("trained again although matching weights exist")

    monkeypatch.setattr("training.train.train", no_training)
    again = load_or_train(DATA, 0.1, config, tmp_path, progress=False)
    torch.testing.assert_close(again.item_vectors, first.item_vectors, rtol=0, atol=0)
    other = dataclasses.replace(config, seed=1)
    assert weights_path(DATA, 0.1, other, tmp_path) != weights_path(DATA, 0.1, config, tmp_path)


def test_over_arch_head_shapes_and_ndcg():
    model = OverArch(8, 3, OverArchConfig(hidden_dim=16, trunk_dim=8, head_dim=4,
                                          item_extra_dim=2))
    out = model(torch.randn(2, 8), torch.randn(2, 5, 8), torch.randn(2, 5, 2))
    assert out.shape == (2, 5, 3)
    assert ndcg(np.array([1.0, 1.0, 0.0]), np.array([1.0, 1.0])) == pytest.approx(1.0)
    assert ndcg(np.array([0.0, 1.0]), np.array([1.0])) == pytest.approx(1 / np.log2(3))
    assert ndcg(np.zeros(3), np.zeros(0)) == 0.0


def test_evaluation_pipelines_are_the_served_stages(weights):
    from stages.ann import AnnConfig
    from training.evaluate import EvalConfig, Pipelines, heldout_metrics

    config = EvalConfig(max_users=40, truth_users=10, ann=AnnConfig(search="exact"))
    pipes = Pipelines(DATA, weights, config)
    users = WORLD.user_ids[[3, 8, 21]]
    excluded = [np.array([0, 1, 2]), np.zeros(0, np.int64), np.array([899])]
    lists = pipes.run(users, excluded, 7)
    query = build_user_tower(weights)(torch.from_numpy(users))
    scores = query @ weights.item_vectors.T
    for i, rows in enumerate(excluded):
        scores[i, torch.from_numpy(rows)] = float("-inf")
        want = torch.topk(scores[i], 7).indices.numpy()
        assert np.array_equal(lists["a"][i], want)  # (a): the exact dot-product top 7
        assert len(lists["b"][i]) == 7 and not np.isin(lists["b"][i], rows).any()
        # (b) reorders the 4 * 7 best by dot product: its items come from there
        assert np.isin(lists["b"][i], torch.topk(scores[i], 28).indices.numpy()).all()
    result = heldout_metrics(DATA, pipes, config)
    # an independent reference for (a): the users with a held-out click (a seeded sample of
    # 40), each one's exact dot-product top 10 among the items not seen in training
    train_mask, held_mask = holdout_split(DATA, config.holdout_fraction)
    train, held = subset(DATA.interactions, train_mask), subset(DATA.interactions, held_mask)
    clicked = held.labels[:, 0] > 0
    evaluated = np.unique(held.user_index[clicked])
    assert result["a"]["users"] == result["b"]["users"] == min(len(evaluated), 40)
    if len(evaluated) > 40:
        evaluated = np.sort(np.random.default_rng(config.seed).choice(evaluated, 40,
                                                                      replace=False))
    query = build_user_tower(weights)(torch.from_numpy(DATA.user_ids[evaluated]))
    scores = query @ weights.item_vectors.T
    recalls = []
    for i, u in enumerate(evaluated):
        scores[i, torch.from_numpy(train.item_index[train.user_index == u])] = float("-inf")
        top = torch.topk(scores[i], 10).indices.numpy()
        relevant = np.unique(held.item_index[clicked & (held.user_index == u)])
        recalls.append(np.isin(top, relevant).sum() / min(10, len(relevant)))
    assert result["a"]["recall@10"][0] == pytest.approx(np.mean(recalls))
    half_width = 1.96 * np.std(recalls, ddof=1) / np.sqrt(len(recalls))
    assert result["a"]["recall@10"][1] == pytest.approx(half_width)


def test_retrieved_negatives_are_unseen_items_from_the_users_top_pool():
    g = torch.Generator().manual_seed(0)
    users, items, dim, pool = 6, 300, 8, 20
    query = torch.nn.functional.normalize(torch.randn(users, dim, generator=g), dim=1)
    vectors = torch.nn.functional.normalize(torch.randn(items, dim, generator=g), dim=1)
    top = torch.topk(query @ vectors.T, pool, dim=1).indices
    # user u saw the first 5 of its pool items (clicked the first 2) and 3 random others
    user_index = torch.arange(users).repeat_interleave(8)
    item_index = torch.cat([torch.cat([top[u, :5], torch.randint(0, items, (3,), generator=g)])
                            for u in range(users)])
    positives = torch.zeros(len(user_index), dtype=torch.bool)
    positives[torch.arange(users) * 8] = True
    positives[torch.arange(users) * 8 + 1] = True
    neg_users, neg_items = retrieved_negatives(query, vectors, user_index, item_index,
                                               positives, 3, pool, g, chunk=4)
    assert len(neg_users) == users * 2 * 3  # 3 per positive
    for u, i in zip(neg_users.tolist(), neg_items.tolist()):
        assert i in top[u].tolist(), "a negative outside the user's retrieval pool"
        assert i not in item_index[user_index == u].tolist(), "a negative the user has seen"


def test_only_sources_without_logged_impressions_get_retrieved_negatives():
    assert training_config_for(DATA).over_arch.retrieved_negatives == 0
    random_negatives = dataclasses.replace(DATA, logged_impressions=False)
    assert training_config_for(random_negatives).over_arch.retrieved_negatives > 0

"""`idmap.zero_collision`: the module API, TorchScript, state_dict, and stale-row reset of the
embedding table and optimizer state."""

import pytest
import torch
from torch import nn

from idmap.zero_collision import (
    ZeroCollisionConfig,
    ZeroCollisionMap,
    reset_optimizer_rows,
    reset_stale_rows,
)


def _ids(seed: int, count: int, high: int = 1 << 40) -> torch.Tensor:
    return torch.randint(0, high, (count,), generator=torch.Generator().manual_seed(seed))


def test_scripted_map_equals_eager():
    config = ZeroCollisionConfig(num_slots=301, max_probe=7, eviction_policy="ttl", ttl=2)
    eager = ZeroCollisionMap(config)
    scripted = torch.jit.script(ZeroCollisionMap(config))
    for step in range(5):
        ids = torch.cat([_ids(step, 90, high=400), torch.tensor([-1])]).view(7, 13)
        a, b = eager.insert(ids, step * 3), scripted.insert(ids, step * 3)
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)
        assert a.rows.shape == ids.shape
        assert torch.equal(eager(ids), scripted(ids))
        assert torch.equal(eager.lookup(ids), scripted.lookup(ids))
    assert torch.equal(eager.identities, scripted.identities)
    assert eager.num_live() == scripted.num_live() == int((eager.identities >= 0).sum())


def test_lookup_returns_unknown_row_and_changes_nothing():
    config = ZeroCollisionConfig(num_slots=1000, max_probe=8)
    id_map = ZeroCollisionMap(config)
    known = _ids(1, 500)
    inserted = id_map.insert(known, now=10)
    state = {k: v.clone() for k, v in id_map.state_dict().items()}
    unknown = _ids(2, 50) + (1 << 41)
    rows = id_map(torch.cat([known, unknown, torch.tensor([-3])]))
    assert torch.equal(rows[:500], inserted.rows)
    assert (rows[500:] == config.unknown_row).all()
    for key, value in id_map.state_dict().items():
        assert torch.equal(value, state[key])


def test_insert_reports_reset_and_evicted_rows():
    config = ZeroCollisionConfig(num_slots=64, max_probe=64, eviction_policy="lru", ttl=5)
    id_map = ZeroCollisionMap(config)
    first = id_map.insert(torch.arange(64), now=0)  # fills every slot
    assert first.reset_rows.numel() == 64 and first.evicted_rows.numel() == 0
    id_map.insert(torch.arange(32), now=10)  # ids 0..31 seen again; 32..63 expire at 10 - 5
    newcomers = torch.arange(1000, 1040)
    result = id_map.insert(newcomers, now=10)
    assert result.reset_rows.numel() == 32  # the 32 expired slots; 8 newcomers overflow
    assert (result.rows == config.unknown_row).sum() == 8
    assert torch.equal(torch.sort(result.evicted_ids).values, torch.arange(32, 64))
    assert torch.equal(result.evicted_rows.sort().values, result.reset_rows.sort().values)
    assert torch.equal(id_map.identities[result.evicted_rows], newcomers[result.rows < 64])


def test_state_dict_round_trip():
    config = ZeroCollisionConfig(num_slots=257, max_probe=5)
    source = ZeroCollisionMap(config)
    ids = _ids(3, 200)
    source.insert(ids, now=4)
    restored = ZeroCollisionMap(config)
    restored.load_state_dict(source.state_dict())
    assert torch.equal(restored.lookup(ids), source.lookup(ids))
    with pytest.raises(RuntimeError, match="size mismatch"):
        ZeroCollisionMap(ZeroCollisionConfig(num_slots=256)).load_state_dict(source.state_dict())


@pytest.mark.parametrize("optimizer_name", ["adam", "adagrad"])
def test_reassigned_row_is_reinitialised_with_its_optimizer_state(optimizer_name):
    config = ZeroCollisionConfig(num_slots=16, max_probe=16, eviction_policy="ttl", ttl=1)
    id_map = ZeroCollisionMap(config)
    table = nn.Embedding(config.num_rows, 4)
    if optimizer_name == "adam":
        optimizer = torch.optim.Adam(table.parameters(), lr=0.1)
    else:
        optimizer = torch.optim.Adagrad(table.parameters(), lr=0.1, initial_accumulator_value=0.3)

    def init_fn(rows: torch.Tensor) -> None:
        nn.init.constant_(rows, 0.5)

    def train_step(ids: torch.Tensor, now: int):
        result = id_map.insert(ids, now)
        reset_stale_rows(table.weight, result.reset_rows, optimizer, init_fn=init_fn)
        optimizer.zero_grad()
        table(result.rows).pow(2).sum().mul(-1).backward()  # pushes rows away from 0.5
        optimizer.step()
        return result

    old = train_step(torch.arange(16), now=0)  # every slot taken and trained
    keep = train_step(torch.arange(8), now=5)  # ids 8..15 have expired by now=5 (ttl=1)
    trained_rows = table.weight.detach().clone()
    state_before = {k: v.clone() for k, v in optimizer.state[table.weight].items()}

    result = id_map.insert(torch.tensor([100, 101, 3]), now=5)
    assert result.evicted_ids.tolist() and set(result.evicted_ids.tolist()) <= set(range(8, 16))
    reset = result.reset_rows
    assert reset.numel() == 2 and not set(reset.tolist()) & set(keep.rows.tolist())
    reset_stale_rows(table.weight, reset, optimizer, init_fn=init_fn)

    weight = table.weight.detach()
    assert (weight[reset] == 0.5).all()  # the newcomers start from the initialiser, not id 8..15
    untouched = torch.ones(config.num_rows, dtype=torch.bool)
    untouched[reset] = False
    assert torch.equal(weight[untouched], trained_rows[untouched])
    assert (trained_rows[reset] != 0.5).all()  # so the reset did change them
    for key, value in optimizer.state[table.weight].items():
        if value.dim() == 0:  # Adam's step is shared by all rows
            assert torch.equal(value, state_before[key])
            continue
        initial = 0.3 if key == "sum" else 0.0
        assert (value[reset] == initial).all(), key
        assert torch.equal(value[untouched], state_before[key][untouched]), key
        assert (state_before[key][reset] != initial).any(), key
    assert old.rows.unique().numel() == 16


def test_reset_optimizer_rows_without_state_is_a_no_op():
    table = nn.Embedding(5, 3)
    optimizer = torch.optim.SGD(table.parameters(), lr=0.1, momentum=0.9)
    reset_optimizer_rows(optimizer, table.weight, torch.tensor([1]))  # no state yet
    with pytest.raises(ValueError, match="rows must lie in"):
        reset_stale_rows(table.weight, torch.tensor([5]))


def test_config_is_validated():
    with pytest.raises(ValueError, match="eviction_policy"):
        ZeroCollisionMap(ZeroCollisionConfig(num_slots=8, eviction_policy="fifo"))
    with pytest.raises(ValueError, match="max_probe"):
        ZeroCollisionMap(ZeroCollisionConfig(num_slots=8, max_probe=0))
    assert ZeroCollisionConfig(num_slots=10).num_rows == 11

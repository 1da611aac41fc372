"""Fuzzing (hypothesis) of what untrusted requests reach: the filter expression parser and the
runners' request decoding.

- Parser: any text or bytes gives a plan or a FilterError, never another exception (no
  RecursionError, IndexError, ...). Accepted text has a canonical form that parses back to
  the same canonical form and means the same thing on random items.
- Runners: batches mixing good requests with mutated ones (inputs dropped, wrong dtypes and
  shapes, extreme values, binary garbage) give every request a result or a RequestError,
  never an exception, and the good requests get the results they get alone.
"""

from __future__ import annotations

import random
import string

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from filtering.expression import (
    MAX_EXPRESSION_BYTES,
    MAX_NESTING,
    FilterError,
    evaluate,
    parse,
    parse_plan,
    spell_value,
    to_string,
)
from filtering.spelling import quote_value
from serving.runners import RUNNERS, RequestError
from world.synthetic import WorldConfig, make_schema

SCHEMA = make_schema(WorldConfig())
FUZZ = settings(max_examples=300, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])

# --- the parser ----------------------------------------------------------------------------


def _terms():
    """Valid terms, by name or by numeric id (the anchor syntax), some with a weight, values
    bare or quoted."""
    options = []
    for fid, spec in enumerate(SCHEMA.features):
        values = spec.vocabulary[:6] if spec.kind == "str" else ["0", "7", "42", "-3"]
        for v in values:
            options.append(f"{spec.name}:{spell_value(v)}")
            options.append(f"{spec.name}:{quote_value(v)}")
            vid = spec.value_id(v)
            options.append(f"{fid}:{vid}")
            options.append(f"{spec.name}:{spell_value(v)}:1.5")
            options.append(f"{spec.name}:{quote_value(v)}:1.5")
    return st.sampled_from(options)


KEYWORDS = {"and": ["AND", "and", "&", "And"], "or": ["OR", "or", "|"], "not": ["NOT", "not", "!"]}


def _expressions():
    """Syntactically valid expressions with random spelling, spacing and parentheses."""
    def combine(children):
        return st.one_of(
            st.builds(lambda a, b, op: f"{a} {op} {b}", children, children,
                      st.sampled_from(KEYWORDS["and"] + KEYWORDS["or"])),
            st.builds(lambda a, op: f"{op} {a}", children, st.sampled_from(KEYWORDS["not"])),
            st.builds(lambda a, sp: f"({sp}{a}{sp})", children, st.sampled_from(["", " ", "  "])),
        )

    return st.recursive(_terms(), combine, max_leaves=12)


TOKENS = st.sampled_from(["(", ")", " ", "AND", "OR", "NOT", "&", "|", "!", ":", "category",
                          "comedy", "language:en", "creator:7", "0:1", "9:9", "tags:", "::",
                          "\t", "\n", "\x00", "é", "\u202e", "😀", '"', "\\", '\\"',
                          '"a b"', 'category:"comedy"', 'tags:"AND"', '"x\\\\"'])


def _assert_plan_or_filter_error(raw) -> None:
    try:
        plan = parse_plan(raw, SCHEMA)
    except FilterError as e:
        assert isinstance(e.position, int) and e.position >= 0
        assert str(e).startswith("filter error at position")
        return
    assert plan.ndim == 2 and plan.shape[1] == 3 and plan.shape[0] >= 1


@FUZZ
@given(st.text(max_size=200))
def test_any_text_gives_a_plan_or_a_filter_error(text):
    _assert_plan_or_filter_error(text)


@FUZZ
@given(st.binary(max_size=300))
def test_any_bytes_give_a_plan_or_a_filter_error(raw):
    _assert_plan_or_filter_error(raw)


@FUZZ
@given(st.lists(TOKENS, max_size=60).map(" ".join))
def test_token_soup_gives_a_plan_or_a_filter_error(text):
    _assert_plan_or_filter_error(text)


@FUZZ
@given(_expressions(), st.data())
def test_mutated_expressions_give_a_plan_or_a_filter_error(text, data):
    """Valid expressions with a few characters deleted, duplicated or inserted."""
    chars = list(text)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(chars)))
        what = data.draw(st.sampled_from(["delete", "insert", "duplicate"]))
        if what == "delete" and i < len(chars):
            del chars[i]
        elif what == "duplicate" and i < len(chars):
            chars.insert(i, chars[i])
        else:
            chars.insert(i, data.draw(st.sampled_from('()&|!: aZ9"\\')))
    _assert_plan_or_filter_error("".join(chars))


def _random_item(rng: random.Random):
    """Value ids of one item per feature (multi-valued; sometimes none)."""
    item = []
    for spec in SCHEMA.features:
        pool = range(len(spec.vocabulary)) if spec.kind == "str" else [-3, 0, 7, 42]
        item.append(rng.sample(list(pool), rng.randint(0, min(3, len(pool)))))
    return item


@FUZZ
@given(_expressions())
def test_accepted_text_round_trips_through_its_canonical_form(text):
    """to_string is canonical: its text parses to a tree whose text is the same, and that
    tree means the same as the original on random items. (Trees themselves may differ:
    `(a OR b) OR c` prints as `a OR b OR c`, which parses flat.)"""
    node = parse(text, SCHEMA)
    canonical = to_string(node, SCHEMA)
    again = parse(canonical, SCHEMA)
    assert to_string(again, SCHEMA) == canonical
    rng = random.Random(len(text))
    for _ in range(20):
        item = _random_item(rng)
        assert evaluate(node, item) == evaluate(again, item), (text, canonical, item)


@pytest.mark.parametrize("depth", [MAX_NESTING - 1, MAX_NESTING, MAX_NESTING + 1, 5000])
@pytest.mark.parametrize("shape", ["parens", "not", "mixed"])
def test_nesting_limit_is_exact_and_never_recursion_error(depth, shape):
    term = "category:comedy"
    if shape == "parens":
        text = "(" * depth + term + ")" * depth
    elif shape == "not":
        text = "NOT " * depth + term
    else:
        text = "(NOT " * (depth // 2) + term + ")" * (depth // 2)
    if len(text.encode()) > MAX_EXPRESSION_BYTES:
        with pytest.raises(FilterError, match="byte limit"):
            parse_plan(text, SCHEMA)
        return
    nesting = depth if shape != "mixed" else 2 * (depth // 2)
    if nesting <= MAX_NESTING:
        parse_plan(text, SCHEMA)
    else:
        with pytest.raises(FilterError, match=f"nested deeper than {MAX_NESTING}"):
            parse_plan(text, SCHEMA)


def test_longest_flat_expression_within_the_limit_parses():
    """A flat chain of terms just under the byte limit (no nesting) parses fine."""
    terms = " OR ".join(f"creator:{i}" for i in range(10_000))
    text = terms[: terms.rfind(" OR ", 0, MAX_EXPRESSION_BYTES)]
    assert len(text.encode()) <= MAX_EXPRESSION_BYTES
    plan = parse_plan(text, SCHEMA)
    assert plan.shape[0] == 2 * text.count(" OR ") + 1


# --- the runners' request decoding ---------------------------------------------------------

K = np.array([[7]], dtype=np.int32)


@pytest.fixture(scope="module")
def stages(small_build):
    """Every runner on the small build, plus good requests of each and their results alone."""
    repo = small_build.repository
    runners = {s: RUNNERS[s](repo / s / "1") for s in RUNNERS}
    good = {s: [] for s in runners}
    users = [int(small_build.world.user_ids[0]), 424242]
    ids = small_build.world.catalog.item_ids
    # a request history (known items and an unknown one), or none
    histories = [None, np.array([[ids[4], ids[40], 987_654_321]], dtype=np.int64), None]
    for (f, user), history in zip([("", users[0]), ("language:en AND NOT category:comedy",
                                                    users[1]),
                                   ("tags:funny OR creator:3", users[0])], histories):
        text = np.array([[f.encode()]], dtype=object)
        weights = np.array([[0.5, 1.0, 2.0]], dtype=np.float32)
        good["filter"].append({"filter": text, "k": K, "task_weights": weights})
        bits = runners["filter"].run([{"filter": text}])[0]
        ann_req = {"user_id": np.array([[user]], dtype=np.int64), "k": K, **bits}
        if history is not None:
            ann_req["history"] = history
        good["ann"].append(ann_req)
        ann = runners["ann"].run([ann_req])[0]
        good["scorer"].append(dict(ann))
        scored = runners["scorer"].run([ann])[0]
        good["aggregator"].append({"candidate_rows": ann["candidate_rows"], "k": K,
                                   "task_weights": weights, **scored})
        good["unified"].append({"user_id": ann_req["user_id"], "filter": text, "k": K,
                                "task_weights": weights,
                                **({} if history is None else {"history": history})})
    alone = {s: [runners[s].run([r])[0] for r in good[s]] for s in runners}
    for s, results in alone.items():
        assert all(isinstance(r, dict) for r in results), (s, results)
    return runners, good, alone


DTYPES = [np.int8, np.int32, np.int64, np.uint64, np.float16, np.float32, np.float64, np.bool_,
          object]
EXTREMES = [0, -1, 1, 2**31 - 1, -(2**31), 2**63 - 1, -(2**63), float("nan"), float("inf"),
            -float("inf"), 1e30, -0.0]


@st.composite
def mutations(draw, template: dict):
    """A copy of a good request with one or two inputs spoiled."""
    request = dict(template)
    for _ in range(draw(st.integers(1, 2))):
        name = draw(st.sampled_from(sorted(request) + ["bogus_input"]))
        value = request.get(name, np.array([[1]], dtype=np.int64))
        how = draw(st.sampled_from(["drop", "dtype", "shape", "extreme", "bytes", "object",
                                    "random", "values"]))
        if how == "drop":
            request.pop(name, None)
            continue
        if how == "dtype":
            dtype = draw(st.sampled_from(DTYPES))
            try:
                with np.errstate(invalid="ignore", over="ignore"):
                    value = value.astype(dtype)
            except (ValueError, TypeError, OverflowError):
                value = np.zeros(value.shape, dtype=dtype)
        elif how == "shape":
            shape = draw(st.sampled_from([(0,) + value.shape[1:], (2,) + value.shape[1:],
                                          value.shape[1:], (1,) + value.shape,
                                          (1, 0), (1, 5), (1, 3, 3), ()]))
            flat = np.resize(value.reshape(-1), int(np.prod(shape))) if value.size else \
                np.zeros(int(np.prod(shape)), dtype=value.dtype)
            value = flat.reshape(shape)
        elif how == "extreme":
            x = draw(st.sampled_from(EXTREMES))
            if value.dtype == object:
                value = np.full(value.shape, x, dtype=object)
            else:
                with np.errstate(invalid="ignore", over="ignore"):
                    try:
                        value = np.full(value.shape, x).astype(value.dtype)
                    except (ValueError, OverflowError):
                        value = np.full(value.shape, -1).astype(value.dtype)
        elif how == "bytes":
            blob = draw(st.binary(max_size=64) | st.sampled_from(
                [b"\xff" * 5000, b"(" * 100 + b"category:comedy", b"category:comedy\x00"]))
            value = np.array([[blob]], dtype=object)
        elif how == "object":
            value = np.array([[draw(st.sampled_from([None, 3, 2.5, ["x"], "text"]))]],
                             dtype=object)
        elif how == "values" and value.dtype.kind in "iuf":
            # same shape and dtype, other numbers: rows past the index's end, huge weights, ...
            values = draw(st.lists(st.integers(0, 20_000) | st.integers(-(2**31), 2**31 - 1),
                                   min_size=value.size, max_size=value.size))
            value = np.array(values, dtype=np.int64).astype(value.dtype).reshape(value.shape)
        else:
            n = draw(st.integers(0, 8))
            # small ones are plausible rows, some past the index's end
            ints = draw(st.lists(st.integers(0, 20_000) | st.integers(-(2**63), 2**63 - 1),
                                 min_size=n, max_size=n))
            value = np.array([ints], dtype=np.int64)
        request[name] = value
    return request


def _same(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for name in want:
        if got[name].dtype.kind == "f":
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_array_equal(got[name], want[name])


@pytest.mark.parametrize("stage", sorted(RUNNERS))
def test_mixed_batches_answer_every_request_and_spare_the_good_ones(stages, stage):
    runners, good, alone = stages
    runner = runners[stage]

    @settings(max_examples=100, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow])
    @given(st.data())
    def check(data):
        batch, expected = [], []
        for _ in range(data.draw(st.integers(1, 5))):
            g = data.draw(st.integers(0, len(good[stage]) - 1))
            if data.draw(st.booleans()):
                batch.append(good[stage][g])
                expected.append(alone[stage][g])
            else:
                batch.append(data.draw(mutations(good[stage][g])))
                expected.append(None)
        assume(any(e is None for e in expected))
        results = runner.run(batch)
        assert len(results) == len(batch)
        for result, want in zip(results, expected):
            assert isinstance(result, (dict, RequestError)), result
            if isinstance(result, RequestError):
                assert str(result).strip(), "an error without a message"
            if want is not None:
                assert isinstance(result, dict), f"good request failed: {result}"
                _same(result, want)

    check()


def test_error_messages_name_the_input(stages):
    """Spot checks of the decoder's wording (the server tests check them over the wire)."""
    runners, good, _ = stages
    base = good["unified"][0]
    cases = [
        ({k: v for k, v in base.items() if k != "user_id"}, "user_id: missing required input"),
        ({**base, "user_id": base["user_id"].astype(np.float32)},
         "user_id: expected INT64 data, got float32"),
        ({**base, "k": np.zeros((0, 1), np.int32)}, "k: empty batch"),
        ({**base, "task_weights": np.ones((1, 2), np.float32)},
         "task_weights: expected shape [1, 3]"),
        ({**base, "filter": np.array([[7]], dtype=object)}, "filter: expected BYTES elements"),
        ({**base, "filter": np.array([[b"\xc3\x28"]], dtype=object)}, "not valid UTF-8"),
        ({**base, "filter": np.array([["".join(random.Random(1).choices(
            string.ascii_letters, k=MAX_EXPRESSION_BYTES + 1)).encode()]], dtype=object)},
         f"over the {MAX_EXPRESSION_BYTES}-byte limit"),
    ]
    results = runners["unified"].run([c for c, _ in cases])
    for result, (_, words) in zip(results, cases):
        assert isinstance(result, RequestError) and words in str(result), (words, result)


@pytest.mark.parametrize("stage, name, value", [
    ("ann", "filter_bits", np.full((1, 3), -1, dtype=np.int64)),  # too few words
    ("scorer", "candidate_rows", np.array([[10**9, 1]], dtype=np.int64)),  # past the end
    ("aggregator", "candidate_rows", np.full((1, 28), 10**9, dtype=np.int64)),
])
def test_a_request_the_module_fails_on_fails_alone(stages, stage, name, value):
    """Well-formed tensors a direct caller of an internal stage may send that the module
    cannot process: that request gets an INTERNAL error, its batch-mates their results."""
    runners, good, alone = stages
    bad = {**good[stage][0], name: value}
    if stage == "aggregator":
        bad["candidate_task_scores"] = np.full((1, value.shape[1], 3), 0.5, dtype=np.float32)
    results = runners[stage].run([good[stage][0], bad, good[stage][1]])
    assert isinstance(results[1], RequestError) and results[1].status == "INTERNAL"
    assert f"{stage}: the model failed on this request" in str(results[1])
    _same(results[0], alone[stage][0])
    _same(results[2], alone[stage][1])


# --- item_updates ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def updates(small_build, tmp_path_factory):
    """An item_updates runner over a store of its own (the small build's layout), and good
    requests: an upsert of a new item, a replacement, a retire."""
    from catalog.write import feature_column
    from fresh.store import create_store, header_for
    from serving.updates import ItemUpdateRunner

    root = tmp_path_factory.mktemp("updates")
    catalog = small_build.world.catalog
    header = header_for(catalog.schema, catalog.embeddings.shape[1], 256,
                        [f.shape[1] for f in catalog.features])
    create_store(root / "fresh_items", header)
    runner = ItemUpdateRunner(root / "repo" / "item_updates" / "1")
    spelled = ",".join(
        f"{spec.name}=" + "|".join(quote_value(str(v)) for v in (
            column if isinstance(column, list) else [column]))
        for spec, column in zip(catalog.schema.features,
                                (feature_column(s, f[:1])[0] for s, f in
                                 zip(catalog.schema.features, catalog.features))))
    features = np.array([[spelled.encode()]], dtype=object)
    emb = catalog.embeddings[:1].astype(np.float32)
    good = [{"item_id": np.array([[990_000_000_001]], np.int64), "embedding": emb,
             "features": features},
            {"item_id": np.array([[int(catalog.item_ids[5])]], np.int64), "embedding": emb,
             "features": features},
            {"item_id": np.array([[int(catalog.item_ids[9])]], np.int64),
             "retire": np.array([[True]])}]
    return runner, good


def test_item_updates_any_input_gives_a_row_or_an_error_and_writes_only_good_requests(updates):
    runner, good = updates

    @settings(max_examples=200, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow])
    @given(st.data())
    def check(data):
        batch, is_good = [], []
        for _ in range(data.draw(st.integers(1, 4))):
            g = good[data.draw(st.integers(0, len(good) - 1))]
            if data.draw(st.booleans()):
                batch.append(g)
                is_good.append(True)
            else:
                batch.append(data.draw(mutations(g)))
                is_good.append(False)
        before = runner.store.updates
        results = runner.run(batch)
        assert len(results) == len(batch)
        for result, ok in zip(results, is_good):
            assert isinstance(result, (dict, RequestError)), result
            if ok:
                assert isinstance(result, dict), f"good update failed: {result}"
                assert result["fresh_row"].shape == (1, 1)
            if isinstance(result, RequestError):
                assert str(result).strip()
        answered = any(isinstance(r, dict) for r in results)
        # one commit group per batch with any accepted request, none otherwise
        assert runner.store.updates == before + int(answered)

    check()


def test_item_updates_check_dtype_and_shape(updates):
    runner, good = updates
    cases = [
        ({**good[0], "embedding": good[0]["embedding"].astype(np.float64)},
         "embedding: expected FP32 data, got float64"),
        ({**good[0], "item_id": np.array([[1.5]])}, "item_id: expected INT64 data"),
        ({**good[0], "item_id": np.array([[1, 2]], np.int64)}, "item_id: expected shape"),
        ({**good[2], "retire": np.array([[1]], np.int64)}, "retire: expected BOOL data"),
        ({**good[0], "item_id": np.array([[1], [2]], np.int64)},
         "every input of a request has the same number of rows"),
    ]
    results = runner.run([c for c, _ in cases])
    for result, (_, words) in zip(results, cases):
        assert isinstance(result, RequestError) and words in str(result), (words, result)

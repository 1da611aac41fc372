"""Filter expression parser: syntax, precedence, round trips, errors, limits."""

import csv

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from builder.build import write_items_csv
from client.catalog import load_items, spell_item_features
from filtering.expression import (
    MAX_NESTING,
    OP_AND,
    OP_NOT,
    OP_OR,
    OP_TERM,
    All,
    And,
    FilterError,
    Not,
    Or,
    Term,
    compile_plan,
    decode_filter,
    join_values,
    parse,
    spell_value,
    split_values,
    to_string,
    unspell_value,
)
from fresh.items import parse_features
from world.schema import FeatureSpec, Schema
from world.synthetic import Catalog, WorldConfig, make_schema

SCHEMA = make_schema(WorldConfig())
COMEDY = Term(0, SCHEMA.features[0].value_id("comedy"))
EN = Term(1, SCHEMA.features[1].value_id("en"))
C42 = Term(2, 42)


def test_precedence_not_over_and_over_or():
    node = parse("category:comedy OR creator:42 AND NOT language:en", SCHEMA)
    assert node == Or((COMEDY, And((C42, Not(EN)))))


def test_parentheses_override_precedence():
    node = parse("(category:comedy OR creator:42) AND NOT language:en", SCHEMA)
    assert node == And((Or((COMEDY, C42)), Not(EN)))


def test_anchor_symbols_and_numeric_ids_are_the_same_query():
    named = parse("category:comedy & !language:en | creator:42", SCHEMA)
    numeric = parse(f"0:{COMEDY.value_id} AND NOT 1:{EN.value_id}:2.5 OR 2:42", SCHEMA)
    assert named == numeric


def test_keywords_case_insensitive_and_empty_means_all():
    assert parse("category:comedy and not language:en", SCHEMA) == And((COMEDY, Not(EN)))
    assert parse("", SCHEMA) == All() and parse("   ", SCHEMA) == All()


@pytest.mark.parametrize("text", [
    "category:comedy", "NOT NOT category:comedy", "(tags:funny OR tags:live) AND creator:7",
    "category:comedy OR language:en AND NOT (creator:1 OR creator:2)",
    "NOT (category:comedy AND language:en)", "",
])
def test_round_trip(text):
    node = parse(text, SCHEMA)
    assert parse(to_string(node, SCHEMA), SCHEMA) == node


def test_plan_is_postfix():
    plan = compile_plan(parse("category:comedy AND NOT language:en", SCHEMA)).tolist()
    assert plan == [[OP_TERM, 0, COMEDY.value_id], [OP_TERM, 1, EN.value_id], [OP_NOT, 0, 0],
                    [OP_AND, 0, 0]]
    assert compile_plan(parse("creator:1 OR creator:2", SCHEMA)).tolist()[-1][0] == OP_OR


@pytest.mark.parametrize("text, position, words", [
    ("category:", 0, "feature:value"),
    ("colour:red", 0, "unknown feature 'colour'"),
    ("creator:abc", 8, "integer values"),
    ("category:nosuch", 9, "has no value nosuch (values: action, "),
    ("(category:comedy", 16, "expected ')'"),
    ("category:comedy)", 15, "')' without a matching '('"),
    ("category:comedy AND", 19, "found the end"),
    ("AND category:comedy", 0, "found 'AND'"),
    ("category:comedy language:en", 16, "after a complete expression"),
    ("9:1", 0, "unknown feature id 9"),
    ("0:999", 2, "no value id 999"),
    ("category:comedy:x", 16, "weight must be a number"),
    ("category:comedy $ x", 16, "unexpected"),
])
def test_errors_name_position_and_problem(text, position, words):
    with pytest.raises(FilterError) as e:
        parse(text, SCHEMA)
    assert e.value.position == position, str(e.value)
    assert words in str(e.value)


def test_limits():
    deep = "(" * (MAX_NESTING + 1) + "category:comedy" + ")" * (MAX_NESTING + 1)
    with pytest.raises(FilterError, match="nested deeper than 64"):
        parse(deep, SCHEMA)
    ok = "(" * MAX_NESTING + "category:comedy" + ")" * MAX_NESTING
    assert parse(ok, SCHEMA) == COMEDY
    with pytest.raises(FilterError, match="nested deeper"):
        parse("NOT " * 70 + "category:comedy", SCHEMA)
    with pytest.raises(FilterError, match="over the 4096-byte limit"):
        parse(" OR ".join(["category:comedy"] * 300), SCHEMA)


def test_decode_rejects_binary_garbage():
    with pytest.raises(FilterError, match="not valid UTF-8"):
        decode_filter(b"\xff\xfe\x00garbage")
    with pytest.raises(FilterError, match="control character"):
        decode_filter(b"category:comedy\x00")
    assert decode_filter(b"category:comedy") == "category:comedy"


# --- quoted values ---------------------------------------------------------------------------
AWKWARD = ["(no genres listed)", "Science Fiction", "Procter & Gamble", 'say "hi"', "back\\slash",
           "a|b", "x:y", "!", "AND", "not", "Or", "", " ", "comedy", "é😀", '"', "a,b", "tab\there"]
AWKWARD_SCHEMA = Schema([FeatureSpec("genres", "str", True, AWKWARD),
                         FeatureSpec("creator", "int")])


def _awkward(value: str) -> Term:
    return Term(0, AWKWARD.index(value))


@pytest.mark.parametrize("text, value", [
    ('genres:"(no genres listed)"', "(no genres listed)"),
    ('genres:"Science Fiction"', "Science Fiction"),
    ('genres:"Procter & Gamble"', "Procter & Gamble"),
    ('genres:"a|b"', "a|b"),
    ('genres:"x:y"', "x:y"),
    (r'genres:"say \"hi\""', 'say "hi"'),
    (r'genres:"back\\slash"', "back\\slash"),
    (r"genres:back\slash", "back\\slash"),  # a bare backslash is text
    ('genres:"AND"', "AND"), ('genres:"not"', "not"), ("genres:AND", "AND"),
    ('genres:""', ""), ('genres:" "', " "), ('genres:"comedy"', "comedy"),
    ('genres:"tab\there"', "tab\there"), ('genres:"\\""', '"'),
])
def test_quoted_values(text, value):
    assert parse(text, AWKWARD_SCHEMA) == _awkward(value)


def test_quoted_values_in_expressions_keywords_inside_are_text():
    node = parse('(genres:"Procter & Gamble" OR NOT genres:"AND") AND genres:"OR NOT ("',
                 Schema([FeatureSpec("genres", "str", True, AWKWARD + ["OR NOT ("])]))
    assert node == And((Or((_awkward("Procter & Gamble"), Not(_awkward("AND")))),
                        Term(0, len(AWKWARD))))
    assert parse('genres:"Science Fiction"&!genres:"a|b"', AWKWARD_SCHEMA) == And(
        (_awkward("Science Fiction"), Not(_awkward("a|b"))))


def test_quoted_value_with_weight_and_numeric_syntax_unchanged():
    assert parse('genres:"Science Fiction":0.5', AWKWARD_SCHEMA) == _awkward("Science Fiction")
    assert parse("tags:funny:0.5", SCHEMA) == parse("tags:funny", SCHEMA)
    assert parse("0:9 & !1:0", SCHEMA) == And((Term(0, 9), Not(Term(1, 0))))
    assert parse('creator:"42"', SCHEMA) == C42


@pytest.mark.parametrize("text, position, words", [
    ('genres:"Science Fiction', 7, "quoted value opened at position 7 is not closed"),
    ('genres:comedy OR genres:"x\\"', 24, "quoted value opened at position 24 is not closed"),
    ('genres:"x\\', 7, "quoted value opened at position 7 is not closed"),
    ('genres:"a\\nb"', 9, "bad escape '\\n' in the quoted value opened at position 7"),
    ('genres:"a"b', 10, "unexpected 'b' after the quoted value at position 7"),
    ('genres:"comedy":"1"', 16, "weight must be a number"),
    ('"genres":comedy', 0, "feature names are written bare"),
    ('genres:"nosuch" AND creator:1', 7, 'has no value nosuch (values: "(no genres listed)", '
                                         '"Science Fiction", "Procter & Gamble"'),
    ('genres:"no such"', 7, 'has no value "no such"'),
    ('creator:"4 2"', 8, 'takes integer values, got "4 2"'),
])
def test_quoting_errors_name_position_and_problem(text, position, words):
    with pytest.raises(FilterError) as e:
        parse(text, AWKWARD_SCHEMA)
    assert e.value.position == position, str(e.value)
    assert words in str(e.value)


def test_spell_value_is_bare_only_when_it_reads_back_bare():
    assert [spell_value(v) for v in ["comedy", "42", "-3", "back\\slash", "é😀"]] == [
        "comedy", "42", "-3", "back\\slash", "é😀"]
    assert spell_value("Procter & Gamble") == '"Procter & Gamble"'
    assert spell_value('say "hi"') == r'"say \"hi\""'
    assert spell_value("AND") == '"AND"' and spell_value("") == '""'
    for value in AWKWARD:
        assert unspell_value(spell_value(value)) == value
        assert parse(f"genres:{spell_value(value)}", AWKWARD_SCHEMA) == _awkward(value)


def _canonical_trees(num_values: int):
    """Trees to_string prints without flattening: no And directly under And, no Or under Or."""
    terms = st.one_of(st.builds(Term, st.just(0), st.integers(0, num_values - 1)),
                      st.builds(Term, st.just(1), st.integers(-(2**63), 2**63 - 1)))

    def combine(children):
        return st.one_of(
            st.builds(Not, children),
            st.lists(children.filter(lambda c: not isinstance(c, And)), min_size=2,
                     max_size=3).map(lambda cs: And(tuple(cs))),
            st.lists(children.filter(lambda c: not isinstance(c, Or)), min_size=2,
                     max_size=3).map(lambda cs: Or(tuple(cs))))

    return st.recursive(terms, combine, max_leaves=8)


VOCABULARY_TEXT = st.one_of(
    st.lists(st.sampled_from(list('ab ()&|!:,"\\\t\n') + ["AND", "or", "Not", "é", "😀"]),
             max_size=5).map("".join),
    st.sampled_from(["AND", "or", "not", "", '"', "\\"]), st.text(max_size=6))


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.lists(VOCABULARY_TEXT, min_size=1, max_size=8, unique=True), st.data())
def test_to_string_round_trips_for_any_vocabulary(vocabulary, data):
    schema = Schema([FeatureSpec("f", "str", True, vocabulary), FeatureSpec("n", "int")])
    node = data.draw(_canonical_trees(len(vocabulary)))
    assert parse(to_string(node, schema), schema) == node


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.lists(VOCABULARY_TEXT, max_size=5))
def test_split_values_inverts_join_values(values):
    assert split_values(join_values(values)) == values


def test_split_values_quote_aware():
    assert split_values("") == []
    assert split_values('funny|"a|b"|"say \\"hi\\""|""') == ["funny", "a|b", 'say "hi"', ""]
    with pytest.raises(ValueError, match="at position 3: quoted value opened at position 3 is"):
        split_values('ok|"a|b')
    with pytest.raises(ValueError) as e:
        split_values("two words")
    assert "at position 4: expected '|' after the value at position 0, found 'w'" in str(e.value)


def test_items_csv_round_trips_awkward_values(tmp_path):
    """write_items_csv spells values as filters do; client.catalog reads the same values."""
    rows = [[0, 3, -1], [5, 4, 15], [-1, -1, -1], [16, 17, 11]]  # -1 pads
    schema = Schema([FeatureSpec("genres", "str", True, AWKWARD),
                     FeatureSpec("brand", "str", False, AWKWARD),
                     FeatureSpec("creator", "int")])
    catalog = Catalog(np.array([10, 20, 30, 40], dtype=np.int64),
                      np.ones((4, 2), np.float32), schema,
                      [np.array(rows, dtype=np.int64), np.array([[2], [7], [11], [1]]),
                       np.array([[7], [0], [42], [3]])])
    path = tmp_path / "items.csv"
    write_items_csv(catalog, path)
    items = load_items(path)
    for r, item_id in enumerate([10, 20, 30, 40]):
        assert items[item_id]["genres"] == [AWKWARD[v] for v in rows[r] if v >= 0]
        assert items[item_id]["brand"] == [AWKWARD[catalog.features[1][r, 0]]]
        assert items[item_id]["creator"] == [str(catalog.features[2][r, 0])]
    with open(path, newline="") as fh:
        cells = {int(row["item_id"]): row for row in csv.DictReader(fh)}
    assert cells[20]["genres"] == '"a|b"|back\\slash|"\\""'
    assert cells[30]["genres"] == "" and cells[30]["brand"] == '""'
    # what a cell holds between its '|'s is what a user types after `feature:`
    node = parse('genres:"a|b" AND genres:back\\slash AND genres:"\\""', schema)
    assert node == And((Term(0, 5), Term(0, 4), Term(0, 15)))
    # and an update copying an item's features (client update --features-from-item) reads back
    update = spell_item_features(20, path)
    assert update == 'genres="a|b"|back\\slash|"\\"",brand="!",creator=0'
    assert parse_features(update, schema) == {"genres": [5, 4, 15], "brand": [7], "creator": [0]}

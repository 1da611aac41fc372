"""Filter expression parser: syntax, precedence, round trips, errors, limits."""

import pytest

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
    parse,
    to_string,
)
from world.synthetic import WorldConfig, make_schema

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
    ("category:nosuch", 9, "no value 'nosuch'"),
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

"""Reference evaluation of parsed filter expressions for the tests: over items.csv strings
(the spelling a user sees), independent of every index the project builds (`satisfies`,
client/catalog.py, which the benchmarks check served answers with too); and the anchor
system's numeric spelling of an expression; and `iam::bloom_search` over the index's bit
rows, item by item."""

import torch

from client.catalog import satisfies  # noqa: F401  (re-exported for the tests)
from filtering.bits import pack_bits
from filtering.bloom_index import TERM_BLOOM, TERM_EMPTY, TERM_EXACT
from filtering.expression import (
    OP_ALL,
    OP_AND,
    OP_NOT,
    OP_OR,
    OP_PAD,
    OP_TERM,
    All,
    And,
    Not,
    Term,
)


def anchor_syntax(node) -> str:
    """The anchor system's numeric form: feature id : value id, & | ! (fully parenthesised)."""
    if isinstance(node, All):
        return ""
    if isinstance(node, Term):
        return f"{node.feature_id}:{node.value_id}"
    if isinstance(node, Not):
        return f"!({anchor_syntax(node.child)})"
    joiner = " & " if isinstance(node, And) else " | "
    return joiner.join(f"({anchor_syntax(c)})" for c in node.children)


def bloom_search_reference(plans, words, num_items: int):
    """`iam::bloom_search` written for clarity: for every plan and every item, run the postfix
    plan on one (definite, possible) pair of booleans, reading the item's bit of each index row.

    An exact term is (has, has), a Bloom term (False, has), an empty term (False, False), ALL
    (True, True); AND / OR combine the pairs component-wise; NOT (d, p) = (not p, not d).
    Returns int64 [B, W] bitmaps (definite, uncertain = possible and not definite)."""
    rows_of_bits = words.tolist()

    def item_bit(row: int, item: int) -> bool:
        return (rows_of_bits[row][item // 64] >> (item % 64)) & 1 == 1

    definite = torch.zeros((plans.shape[0], num_items), dtype=torch.bool)
    uncertain = torch.zeros_like(definite)
    for b, plan in enumerate(plans.tolist()):
        for item in range(num_items):
            stack = []
            for op, kind, *rows in plan:
                if op == OP_PAD:
                    continue
                if op == OP_ALL:
                    stack.append((True, True))
                elif op == OP_TERM and kind == TERM_EMPTY:
                    stack.append((False, False))
                elif op == OP_TERM:
                    has = all(item_bit(row, item) for row in rows if row >= 0)
                    assert kind in (TERM_EXACT, TERM_BLOOM)
                    stack.append((has, has) if kind == TERM_EXACT else (False, has))
                elif op == OP_NOT:
                    d, p = stack.pop()
                    stack.append((not p, not d))
                else:
                    d2, p2 = stack.pop()
                    d1, p1 = stack.pop()
                    if op == OP_AND:
                        stack.append((d1 and d2, p1 and p2))
                    else:
                        assert op == OP_OR
                        stack.append((d1 or d2, p1 or p2))
            (d, p), = stack
            definite[b, item] = d
            uncertain[b, item] = p and not d
    return pack_bits(definite), pack_bits(uncertain)

"""Seeded random filter expressions over a catalog, for the server test and the benchmark.

Terms take their value from a random item (so popular values are drawn more often, as real
traffic would) or, one time in eight, any value of the feature's domain (often matching no
item). Trees mix AND, OR and NOT up to `max_depth` levels.
"""

from __future__ import annotations

import random
from typing import Sequence

import numpy as np

from filtering.expression import And, Node, Not, Or, Term
from world.schema import Schema


def random_term(rng: random.Random, schema: Schema, features: Sequence[np.ndarray]) -> Term:
    f = rng.randrange(len(schema.features))
    spec, values = schema.features[f], features[f]
    if rng.random() < 0.125 or values.shape[0] == 0:
        if spec.kind == "str":
            return Term(f, rng.randrange(len(spec.vocabulary)))
        return Term(f, rng.randrange(0, int(values.max(initial=0)) + 100))
    present = values[rng.randrange(values.shape[0])]
    present = present[present >= 0]
    if present.size == 0:  # an item without a value for this (multi-valued) feature
        return Term(f, 0)
    return Term(f, int(present[rng.randrange(present.size)]))


def random_expression(rng: random.Random, schema: Schema, features: Sequence[np.ndarray],
                      max_depth: int = 3) -> Node:
    """A random syntax tree (print it with `filtering.expression.to_string`)."""
    roll = rng.random()
    if max_depth == 0 or roll < 0.4:
        return random_term(rng, schema, features)
    if roll < 0.55:
        return Not(random_expression(rng, schema, features, max_depth - 1))
    children = tuple(random_expression(rng, schema, features, max_depth - 1)
                     for _ in range(rng.randint(2, 3)))
    return And(children) if roll < 0.8 else Or(children)

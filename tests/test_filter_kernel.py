"""`iam::bloom_search`: the torch path and the Triton-language kernel under TRITON_INTERPRET=1
both equal a naive per-item reference (tests/filter_reference.py) bit for bit (ragged tails,
every term kind, NOT of Bloom terms, padding, empty batches, deep stacks), the kernel compiles
for a CUDA target without a GPU, and compiled plans keep the stack the kernel holds in
registers shallow.

`triton.jit` decides between compiling and interpreting when `kernels` is imported, so the
interpreter check runs in a child pytest that sets TRITON_INTERPRET=1 first (in-process when
it is already set): nothing leaks into the other tests.
"""

import os
import random
import subprocess
import sys

import pytest
import torch
from filter_reference import bloom_search_reference

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
    Or,
    Term,
    batch_plans,
    compile_plan,
    parse,
    stack_need,
)
from kernels._library import triton_available
from world.synthetic import WorldConfig, make_schema

needs_triton = pytest.mark.skipif(not triton_available(), reason="needs the triton package")


def plan_depth(plan: torch.Tensor) -> int:
    """Deepest stack of a postfix plan [L, 3+]: +1 per term / ALL, -1 per AND / OR."""
    ops = plan[:, 0]
    delta = ((ops == 1) | (ops == 5)).long() - ((ops == 2) | (ops == 3)).long()
    return int(torch.cumsum(delta, 0).max())


def random_tree(rng: random.Random, depth: int):
    roll = rng.random()
    if depth == 0 or roll < 0.3:
        return All() if rng.random() < 0.05 else Term(0, 0)
    if roll < 0.45:
        return Not(random_tree(rng, depth - 1))
    children = tuple(random_tree(rng, depth - 1) for _ in range(rng.randint(2, 3)))
    return And(children) if roll < 0.75 else Or(children)


def resolved_plans(rng: random.Random, count: int, num_rows: int, rows_per_term: int,
                   depth: int) -> torch.Tensor:
    """Random resolved plans: random trees, every term a random kind with random rows."""
    plans = []
    for _ in range(count):
        plan = compile_plan(random_tree(rng, depth))
        out = torch.full((plan.shape[0], 2 + rows_per_term), -1, dtype=torch.int64)
        out[:, 0] = plan[:, 0]
        out[:, 1] = 0
        for i in torch.nonzero(plan[:, 0] == OP_TERM).flatten().tolist():
            kind = rng.choice([TERM_EMPTY, TERM_EXACT, TERM_BLOOM])
            out[i, 1] = kind
            used = 1 if kind == TERM_EXACT else rng.randint(1, rows_per_term)
            for j in range(used):
                out[i, 2 + j] = rng.randrange(num_rows)
        plans.append(out)
    return batch_plans(plans)


def checked_cases():
    """(label, plans, words, num_items) on small awkward shapes: item counts that are not
    multiples of 64 (and 0), padding rows, NOT of Bloom and empty terms, an empty batch, a deep
    stack, and random plans of every term kind."""
    gen = torch.Generator().manual_seed(4)
    rng = random.Random(4)

    def random_words(rows: int, num_items: int) -> torch.Tensor:
        return torch.randint(-(2**63), 2**63 - 1, (rows, (num_items + 63) // 64), generator=gen)

    def step(op: int, kind: int = 0, *rows: int) -> list:
        return [op, kind, *rows] + [-1] * (3 - len(rows))

    bloom, exact, empty = TERM_BLOOM, TERM_EXACT, TERM_EMPTY
    hand_written = [
        [step(OP_ALL)],  # the empty expression (padded below, as every shorter plan)
        [step(OP_TERM, bloom, 0, 1), step(OP_NOT)],  # Bloom positives become uncertain
        [step(OP_TERM, bloom, 2), step(OP_NOT), step(OP_NOT)],
        [step(OP_TERM, exact, 3), step(OP_PAD), step(OP_NOT), step(OP_TERM, bloom, 1, 4),
         step(OP_AND)],  # a padding row inside a plan does nothing
        [step(OP_TERM, bloom, 0, 2, 5), step(OP_NOT), step(OP_TERM, exact, 6), step(OP_OR)],
        [step(OP_TERM, empty, 0), step(OP_NOT)],  # NOT of an empty term: every item
        [step(OP_TERM, bloom, 5, 6), step(OP_TERM, bloom, 0), step(OP_OR), step(OP_NOT),
         step(OP_ALL), step(OP_AND)],
    ]
    plans = batch_plans([torch.tensor(plan) for plan in hand_written])
    cases = [(f"hand-written plans, {n} items", plans, random_words(7, n), n)
             for n in (0, 1, 63, 65, 130, 200)]
    # random plans: one word, a ragged word, exactly 2 words, ragged tails over 2 blocks
    for n, depth in ((1, 2), (63, 3), (128, 3), (300, 3), (8256 + 70, 2)):
        cases.append((f"random plans, {n} items", resolved_plans(rng, 4, 7, 3, depth),
                      random_words(7, n), n))
    cases.append(("an empty batch", torch.zeros((0, 1, 5), dtype=torch.int64),
                  random_words(7, 100), 100))
    # a deep stack (right-nested ORs in parse order, as an older plan compiler emitted)
    deep = torch.tensor([[OP_TERM, TERM_BLOOM, 0, 1]] * 9 + [[OP_OR, 0, -1, -1]] * 8)
    deep[0:9:2, 1] = TERM_EXACT
    deep[0:9:2, 3] = -1
    cases.append(("a deep stack", deep[None], random_words(2, 100), 100))
    return cases


def assert_equals_reference(search) -> None:
    for label, plans, words, num_items in checked_cases():
        expected = bloom_search_reference(plans, words, num_items)
        got = search(plans, words, num_items)
        for name, want, have in zip(("definite", "uncertain"), expected, got):
            assert have.shape == want.shape, f"{label}: {name} shape"
            assert torch.equal(have, want), f"{label}: {name} differs from the reference"


def test_torch_path_equals_naive_reference():
    from kernels.bloom_search import bloom_search_torch

    assert_equals_reference(bloom_search_torch)


def interpret_checks() -> None:
    from kernels.bloom_search import bloom_search_triton

    assert_equals_reference(bloom_search_triton)


@pytest.mark.interpret
@needs_triton
def test_kernel_under_interpreter_equals_naive_reference():
    if os.environ.get("TRITON_INTERPRET") == "1":
        interpret_checks()
        return
    node = f"{__file__}::test_kernel_under_interpreter_equals_naive_reference"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", node],
        env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True,
        timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


@needs_triton
@pytest.mark.parametrize("scalar", ["i32", "i64"])
def test_kernel_compiles_for_cuda(scalar):
    """The interpreter accepts code the compiler rejects; ptxas (shipped with triton) does not."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels.bloom_search import BLOCK_WORDS, _bloom_search_kernel

    signature = {"plans_ptr": "*i64", "words_ptr": "*i64", "definite_ptr": "*i64",
                 "uncertain_ptr": "*i64", "plan_len": "i32", "num_words": "i32",
                 "last_word_mask": scalar, "stride_plans_b": "i32", "stride_plans_l": "i32",
                 "stride_words_r": scalar, "stride_out_b": "i32"}
    for depth in (2, 16):
        constexprs = {"NUM_TERM_ROWS": 5, "STACK_DEPTH": depth, "BLOCK_W": BLOCK_WORDS}
        source = ASTSource(fn=_bloom_search_kernel, constexprs=constexprs,
                           signature={**signature, **{k: "constexpr" for k in constexprs}})
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
        assert len(compiled.asm["cubin"]) > 0
        assert "ld.local" not in compiled.asm["ptx"], "the register stack spilled"


def test_compiled_plans_keep_the_stack_shallow():
    schema = make_schema(WorldConfig())
    # nested 60 levels deep on the right: parse order would need a slot per level
    text = "category:comedy"
    for i in range(30):
        text = f"creator:{i} OR (language:en AND ({text}))"
    plan = compile_plan(parse(text, schema))
    assert plan_depth(plan) == stack_need(parse(text, schema)) <= 3
    # a balanced tree of 1024 terms (about what 4 KB holds) needs log2(1024) + 1 slots
    def balanced(n: int, level: int):
        if n == 1:
            return Term(2, level)
        halves = (balanced(n // 2, level + 1), balanced(n - n // 2, level + 1))
        return And(halves) if level % 2 else Or(halves)

    assert plan_depth(compile_plan(balanced(1024, 0))) == 11
    # random trees: the need is what the plan uses
    rng = random.Random(1)
    for _ in range(200):
        tree = random_tree(rng, 5)
        assert plan_depth(compile_plan(tree)) == stack_need(tree)

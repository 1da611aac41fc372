"""`iam::bloom_search`: the Triton-language kernel under TRITON_INTERPRET=1 equals the torch path
bit for bit (ragged tails, every term kind, padding, deep stacks), the kernel compiles for a
CUDA target without a GPU, and compiled plans keep the stack the kernel holds in registers
shallow.

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

from filtering.bloom_index import TERM_BLOOM, TERM_EMPTY, TERM_EXACT
from filtering.expression import (
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


def interpret_checks() -> None:
    from kernels.bloom_search import bloom_search_torch, bloom_search_triton

    rng = random.Random(4)
    gen = torch.Generator().manual_seed(4)
    # item counts: one word, a ragged word, exactly 2 words, ragged tails over 2 blocks
    for num_items, depth in ((1, 2), (63, 3), (128, 3), (300, 3), (8256 + 70, 2)):
        num_words = (num_items + 63) // 64
        words = torch.randint(-(2**63), 2**63 - 1, (7, num_words), generator=gen)
        plans = resolved_plans(rng, 4, 7, 3, depth)
        expected = bloom_search_torch(plans, words, num_items)
        got = bloom_search_triton(plans, words, num_items)
        for name, a, b in zip(("definite", "uncertain"), expected, got):
            assert torch.equal(a, b), f"{num_items} items: {name} differs"
        assert not bool((expected[0] & expected[1]).any())
    # a deep stack (right-nested ORs in parse order, as an older plan compiler emitted)
    deep = torch.tensor([[OP_TERM, TERM_BLOOM, 0, 1]] * 9 + [[3, 0, -1, -1]] * 8)
    deep[0:9:2, 1] = TERM_EXACT
    deep[0:9:2, 3] = -1
    words = torch.randint(-(2**63), 2**63 - 1, (2, 2), generator=gen)
    expected = bloom_search_torch(deep[None], words, 100)
    got = bloom_search_triton(deep[None], words, 100)
    assert all(torch.equal(a, b) for a, b in zip(expected, got)), "deep stack differs"


@pytest.mark.interpret
@needs_triton
def test_kernel_under_interpreter_equals_torch_path():
    if os.environ.get("TRITON_INTERPRET") == "1":
        interpret_checks()
        return
    node = f"{__file__}::test_kernel_under_interpreter_equals_torch_path"
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

"""`iam::bloom_search`: evaluate a batch of resolved filter plans over the bit-sliced index.

    bloom_search(Tensor plans, Tensor words, int num_items) -> (Tensor definite, Tensor uncertain)

Args:
    plans: int64 [B, L, 2 + R], one postfix plan per query (filtering/expression.py), each row
        (opcode, term kind, row_0 .. row_{R-1}). A TERM row's words are the AND of the rows
        `row_i >= 0` of `words` (at least one); its kind (filtering/bloom_index.py) says what
        they mean: TERM_EXACT exactly the items having the value (an exact bitmap),
        TERM_BLOOM a superset of them (the K Bloom positions), TERM_EMPTY no item (rows
        ignored). OP_PAD rows do nothing; other rows ignore columns 1...
    words: int64 [rows, W] with W = ceil(num_items / 64): the index table of
        filtering/bloom_index.py; bit j of words[r, w] is about item row w*64 + j.
    num_items: N.

Returns:
    definite, uncertain: int64 [B, W] packed bitmaps (filtering/bits.py), disjoint, bits >= N
    zero. `definite` holds items that satisfy the expression for sure; every item that
    satisfies it is in `definite | uncertain`. Without Bloom terms `uncertain` is empty and
    `definite` is the exact answer.

Every stack value is a pair (definite, possible) of word vectors with definite <= truth <=
possible: an exact term is (t, t), a Bloom term (0, t), ALL (~0, ~0); AND and OR combine the
pairs component-wise, and NOT (d, p) = (~p, ~d). So a term under NOT can never drop a true
match (a Bloom false positive only makes the item uncertain), and `uncertain = possible &
~definite` is what the caller checks exactly (stages/filter.py).

CPU: `bloom_search_torch`, query by query and step by step over whole word vectors (one torch
op per step, 125 KB per vector at 1M items, which stays in the L2 cache), folding the constant
values (empty, all, exact pairs whose two sides are one tensor) so that an exact term costs no
second operation. CUDA: `_bloom_search_kernel`, one program per (query, block of BLOCK_W
words), the stack held in registers.
"""

from typing import Optional, Tuple

import torch

from filtering.bloom_index import TERM_BLOOM, TERM_EMPTY, TERM_EXACT
from filtering.expression import OP_ALL, OP_AND, OP_NOT, OP_OR, OP_PAD, OP_TERM
from kernels._library import LIB, contiguous, require_triton_device, triton_available

# ---- launch settings (the only place) --------------------------------------------------------
# Words per program and warps, from benchmarks/gpu_bloom.py on an H200 (1M items, 256 random
# plans, kernel ms): BLOCK_W 32 / 4 warps 0.79, 64/4 0.49, 128/2 0.37, 128/4 0.36, 128/8 0.53,
# 256/4 0.39, 256/8 0.39 (2 and 4 warps at 128 words tie). The register stack takes
# 2 * STACK_DEPTH * BLOCK_WORDS int64 per program; the sm_90 build of depth 16 does not spill
# (tests/test_filter_kernel.py).
BLOCK_WORDS = 128
NUM_WARPS = 2


# ---- argument checks (both paths) ------------------------------------------------------------
def _check_bloom_search(plans: torch.Tensor, words: torch.Tensor, num_items: int) -> int:
    """Raise ValueError naming the problem; returns the deepest stack any plan needs."""
    if plans.dtype != torch.int64 or plans.dim() != 3 or plans.shape[2] < 3:
        raise ValueError(f"bloom_search: plans must be int64 [B, L, 2 + R] with R >= 1, got "
                         f"{plans.dtype} {tuple(plans.shape)}")
    if words.dtype != torch.int64 or words.dim() != 2:
        raise ValueError(f"bloom_search: words must be a 2-D int64 tensor, got {words.dtype} "
                         f"{tuple(words.shape)}")
    if plans.device != words.device:
        raise ValueError(f"bloom_search: plans are on {plans.device} but words on "
                         f"{words.device}")
    if num_items < 0 or words.shape[1] != (num_items + 63) // 64:
        raise ValueError(f"bloom_search: words has {words.shape[1]} columns, {num_items} items "
                         f"need {(num_items + 63) // 64}")
    if plans.shape[0] == 0:
        return 0
    if plans.shape[1] == 0:
        raise ValueError("bloom_search: plans have no rows (an empty expression is one OP_ALL)")
    # On a CPU copy: the plans are a few KB, and one transfer costs less on a GPU than the
    # ~25 small kernels (and the sync) of checking them there.
    ops, kinds, rows = (plans[..., 0].cpu(), plans[..., 1].cpu(), plans[..., 2:].cpu())
    term = ops == OP_TERM
    push = term | (ops == OP_ALL)
    pop = (ops == OP_AND) | (ops == OP_OR)
    depth = torch.cumsum(push.to(torch.int64) - pop.to(torch.int64), dim=1)
    needs_rows = term & ((kinds == TERM_EXACT) | (kinds == TERM_BLOOM))
    problems = torch.stack([
        ((ops < OP_PAD) | (ops > OP_ALL)).any(),
        ((ops != OP_PAD) & (depth < 1)).any() | (depth[:, -1] != 1).any(),
        (term & (kinds != TERM_EMPTY) & (kinds != TERM_EXACT) & (kinds != TERM_BLOOM)).any(),
        (needs_rows & (rows.max(dim=2).values < 0)).any(),
        (needs_rows.unsqueeze(2) & ((rows < -1) | (rows >= words.shape[0]))).any(),
        depth.max(),
    ]).tolist()
    messages = [f"opcodes must be in {OP_PAD}..{OP_ALL}",
                "a plan is not a well-formed postfix expression (stack underflow, or it does "
                "not leave exactly one value)",
                f"term kinds must be {TERM_EMPTY}, {TERM_EXACT} or {TERM_BLOOM}",
                "an exact or Bloom term lists no rows",
                f"term rows must be -1 or in 0..{words.shape[0] - 1}"]
    for bad, message in zip(problems[:-1], messages):
        if bad:
            raise ValueError(f"bloom_search: {message}")
    return int(problems[-1])


# ---- Triton kernel and its launch (CUDA; CPU tensors under TRITON_INTERPRET=1) ---------------
if triton_available():
    import triton
    import triton.language as tl

    # plan codes as compile-time constants (kernels may only read constexpr globals)
    _TL_OP_TERM = tl.constexpr(OP_TERM)
    _TL_OP_AND = tl.constexpr(OP_AND)
    _TL_OP_OR = tl.constexpr(OP_OR)
    _TL_OP_NOT = tl.constexpr(OP_NOT)
    _TL_OP_ALL = tl.constexpr(OP_ALL)
    _TL_TERM_EMPTY = tl.constexpr(TERM_EMPTY)
    _TL_TERM_EXACT = tl.constexpr(TERM_EXACT)

    @triton.jit
    def _bloom_search_kernel(
        plans_ptr,  # int64 [B, L, 2 + R]
        words_ptr,  # int64 [rows, W]
        definite_ptr,  # int64 [B, W], output
        uncertain_ptr,  # int64 [B, W], output
        plan_len,
        num_words,
        last_word_mask,  # bits of the last word that are items
        stride_plans_b,
        stride_plans_l,
        stride_words_r,
        stride_out_b,
        NUM_TERM_ROWS: tl.constexpr,  # R
        STACK_DEPTH: tl.constexpr,  # power of two >= the deepest stack of any plan
        BLOCK_W: tl.constexpr,
    ):
        # Program -> tile: query `pid_b`, words pid_w*BLOCK_W .. +BLOCK_W (64 items each).
        pid_w = tl.program_id(0)
        pid_b = tl.program_id(1)
        offs_w = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
        w_mask = offs_w < num_words
        # The evaluation stack of (definite, possible) word vectors, in registers: the top
        # value in `top_d` / `top_p`, the ones below it in rows 0..sp-2 of `stack_d` /
        # `stack_p`. A row is read by summing the rows selected by a one-hot mask (the others
        # contribute 0) and written with a select, so only a push (spill the top) and AND / OR
        # (read the second) touch the arrays; NOT works on the top alone. Every program of a
        # query runs the same plan, so the branches on `op` never diverge.
        slots = tl.arange(0, STACK_DEPTH)[:, None]
        stack_d = tl.zeros([STACK_DEPTH, BLOCK_W], dtype=tl.int64)
        stack_p = tl.zeros([STACK_DEPTH, BLOCK_W], dtype=tl.int64)
        top_d = tl.zeros([BLOCK_W], dtype=tl.int64)
        top_p = tl.zeros([BLOCK_W], dtype=tl.int64)
        sp = 0  # stack size
        plan_ptr = plans_ptr + pid_b * stride_plans_b
        for s in range(0, plan_len):
            step_ptr = plan_ptr + s * stride_plans_l
            op = tl.load(step_ptr)
            if (op == _TL_OP_TERM) | (op == _TL_OP_ALL):
                kind = tl.load(step_ptr + 1)
                # Term words: the AND of its rows, one coalesced load of BLOCK_W words per
                # row; unused rows (-1) and ALL load nothing (masked, read as ~0).
                term = tl.full([BLOCK_W], -1, dtype=tl.int64)
                for i in tl.static_range(NUM_TERM_ROWS):
                    row = tl.load(step_ptr + 2 + i)
                    use = (op == _TL_OP_TERM) & (row >= 0)
                    # (where, not `w_mask & use`: the interpreter makes that broadcast ints)
                    term &= tl.load(words_ptr + tl.maximum(row, 0) * stride_words_r + offs_w,
                                    mask=tl.where(use, w_mask, False), other=-1)
                # spill the old top to row sp-1 (no row matches while the stack is empty)
                stack_d = tl.where(slots == sp - 1, top_d[None, :], stack_d)
                stack_p = tl.where(slots == sp - 1, top_p[None, :], stack_p)
                top_p = tl.where((op == _TL_OP_TERM) & (kind == _TL_TERM_EMPTY), 0, term)
                top_d = tl.where((op == _TL_OP_ALL) | (kind == _TL_TERM_EXACT), top_p, 0)
                sp += 1
            elif op == _TL_OP_NOT:  # NOT (d, p) = (~p, ~d)
                top_d, top_p = ~top_p, ~top_d
            elif (op == _TL_OP_AND) | (op == _TL_OP_OR):  # component-wise with row sp-2
                second_d = tl.sum(tl.where(slots == sp - 2, stack_d, 0), axis=0)
                second_p = tl.sum(tl.where(slots == sp - 2, stack_p, 0), axis=0)
                if op == _TL_OP_AND:
                    top_d &= second_d
                    top_p &= second_p
                else:
                    top_d |= second_d
                    top_p |= second_p
                sp -= 1
        # The answer is the top; clear bits past the last item, store both bitmaps.
        result_d = top_d
        result_p = top_p
        tail = tl.where(offs_w == num_words - 1, last_word_mask, -1)
        result_d &= tail
        result_p &= tail
        out_offs = pid_b * stride_out_b + offs_w
        tl.store(definite_ptr + out_offs, result_d, mask=w_mask)
        tl.store(uncertain_ptr + out_offs, result_p & ~result_d, mask=w_mask)


def _launch_bloom_search(plans: torch.Tensor, words: torch.Tensor, num_items: int, depth: int,
                         block_words: int = BLOCK_WORDS, num_warps: int = NUM_WARPS
                         ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Run `_bloom_search_kernel` on checked arguments (`depth` from `_check_bloom_search`); the
    launch settings are parameters for benchmarks/gpu_bloom.py's sweep."""
    plans, words = contiguous(plans, words)
    num_words = words.shape[1]
    definite = torch.empty((plans.shape[0], num_words), dtype=torch.int64, device=words.device)
    uncertain = torch.empty_like(definite)
    if definite.numel() == 0:
        return definite, uncertain
    last_word_mask = (1 << (num_items % 64)) - 1 if num_items % 64 else -1
    grid = (triton.cdiv(num_words, block_words), plans.shape[0])
    _bloom_search_kernel[grid](
        plans, words, definite, uncertain, plans.shape[1], num_words, last_word_mask,
        plans.stride(0), plans.stride(1), words.stride(0), definite.stride(0),
        NUM_TERM_ROWS=plans.shape[2] - 2, STACK_DEPTH=max(2, triton.next_power_of_2(depth)),
        BLOCK_W=block_words, num_warps=num_warps)
    return definite, uncertain


def bloom_search_triton(plans: torch.Tensor, words: torch.Tensor,
                        num_items: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """CUDA implementation of `iam::bloom_search` (CPU tensors too under TRITON_INTERPRET=1)."""
    depth = _check_bloom_search(plans, words, num_items)
    require_triton_device("bloom_search", words.device)
    return _launch_bloom_search(plans, words, num_items, depth)


# ---- torch path (CPU implementation and reference) -------------------------------------------
_ZERO = 0  # constant word vectors of the torch path: no item / every item
_ONES = -1


class _Words:
    """One word vector of the torch path: `bits` is the constant 0 or ~0 (an int) or a [W]
    tensor; `owned` tensors were made by this evaluation and may be overwritten once nothing
    else reads them (index rows are views and never are). A stack entry is a pair
    (definite, possible); an exact value is one `_Words` object in both places."""

    __slots__ = ("bits", "owned")

    def __init__(self, bits, owned: bool = False):
        self.bits = bits
        self.owned = owned


def _combine(op: int, x: _Words, y: _Words, x_free: bool, y_free: bool,
             out: Optional[torch.Tensor] = None) -> _Words:
    """x AND y or x OR y, folding constants; writes into `out` (the query's output row, at
    its last step) if given, else overwrites a free owned operand instead of allocating (each
    op then streams 2 vectors instead of 3 through the cache)."""
    absorbing = _ZERO if op == OP_AND else _ONES
    for const, other in ((x, y), (y, x)):
        if isinstance(const.bits, int):
            return _Words(absorbing) if const.bits == absorbing else other
    if out is not None:
        (torch.bitwise_and if op == OP_AND else torch.bitwise_or)(x.bits, y.bits, out=out)
        return _Words(out)
    if x_free and x.owned:
        target, operand = x, y
    elif y_free and y.owned:
        target, operand = y, x
    else:
        fn = torch.bitwise_and if op == OP_AND else torch.bitwise_or
        return _Words(fn(x.bits, y.bits), owned=True)
    if op == OP_AND:
        target.bits.bitwise_and_(operand.bits)
    else:
        target.bits.bitwise_or_(operand.bits)
    return target


def _negate(x: _Words, free: bool, out: Optional[torch.Tensor] = None) -> _Words:
    if isinstance(x.bits, int):
        return _Words(~x.bits)
    if out is not None:
        torch.bitwise_not(x.bits, out=out)
        return _Words(out)
    if free and x.owned:
        x.bits.bitwise_not_()
        return x
    return _Words(torch.bitwise_not(x.bits), owned=True)


def _term(step, words: torch.Tensor) -> Tuple[_Words, _Words]:
    kind = step[1]
    if kind == TERM_EMPTY:
        zero = _Words(_ZERO)
        return zero, zero
    rows = [r for r in step[2:] if r >= 0]
    value = _Words(words[rows[0]])  # a view of the index
    if len(rows) > 1:
        value = _Words(torch.bitwise_and(value.bits, words[rows[1]]), owned=True)
        for r in rows[2:]:
            value.bits.bitwise_and_(words[r])
    return (value, value) if kind == TERM_EXACT else (_Words(_ZERO), value)


def _evaluate(plan, words: torch.Tensor, out: torch.Tensor) -> Tuple[_Words, _Words]:
    """One query's (definite, possible) pair. When the last step combines exact values, its
    result goes straight into `out` (the query's row of `definite`), saving a copy."""
    stack = []
    last = max(i for i, step in enumerate(plan) if step[0] != OP_PAD)
    for i, step in enumerate(plan):
        op = step[0]
        dest = out if i == last else None
        if op == OP_TERM:
            stack.append(_term(step, words))
        elif op == OP_ALL:
            ones = _Words(_ONES)
            stack.append((ones, ones))
        elif op == OP_NOT:
            d, p = stack.pop()
            if d is p:
                nd = _negate(d, free=True, out=dest)
                stack.append((nd, nd))
            else:  # NOT (d, p) = (~p, ~d): a possible match stays possible
                stack.append((_negate(p, free=True), _negate(d, free=True)))
        elif op == OP_AND or op == OP_OR:
            d2, p2 = stack.pop()
            d1, p1 = stack.pop()
            if d1 is p1 and d2 is p2:
                value = _combine(op, d1, d2, True, True, out=dest)
                stack.append((value, value))
            else:  # an exact side is read twice: free only for the second combine
                d = _combine(op, d1, d2, d1 is not p1, d2 is not p2)
                p = _combine(op, p1, p2, p1 is not d, p2 is not d)
                stack.append((d, p))
    return stack[0]


def _is_const(x: _Words, value: int) -> bool:
    return isinstance(x.bits, int) and x.bits == value


def _store(out: torch.Tensor, x: _Words) -> None:
    if isinstance(x.bits, int):
        out.fill_(x.bits)
    else:
        out.copy_(x.bits)


def bloom_search_torch(plans: torch.Tensor, words: torch.Tensor,
                       num_items: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference and CPU implementation of `iam::bloom_search` (see the module docstring)."""
    _check_bloom_search(plans, words, num_items)
    num_words = words.shape[1]
    definite = torch.empty((plans.shape[0], num_words), dtype=torch.int64, device=words.device)
    uncertain = torch.zeros_like(definite)  # one memset; most queries have no Bloom term
    for b, plan in enumerate(plans.tolist()):
        row = definite[b]
        d, p = _evaluate(plan, words, row)
        if d.bits is not row:
            _store(row, d)
        # uncertain = possible & ~definite (already 0 where the two are equal)
        if d is p or _is_const(p, _ZERO) or _is_const(d, _ONES):
            continue
        if _is_const(d, _ZERO):
            _store(uncertain[b], p)
        else:
            torch.bitwise_not(d.bits, out=uncertain[b])
            if not _is_const(p, _ONES):
                uncertain[b].bitwise_and_(p.bits)
    if num_items % 64 and num_words:  # NOT and ALL set bits past the last item
        tail = (1 << (num_items % 64)) - 1
        definite[:, -1].bitwise_and_(tail)
        uncertain[:, -1].bitwise_and_(tail)
    return definite, uncertain


def _bloom_search_fake(plans: torch.Tensor, words: torch.Tensor, num_items: int):
    shape = (plans.shape[0], words.shape[1])
    return words.new_empty(shape), words.new_empty(shape)


# ---- registration ----------------------------------------------------------------------------
LIB.define("bloom_search(Tensor plans, Tensor words, int num_items) "
           "-> (Tensor definite, Tensor uncertain)")
LIB.impl("bloom_search", bloom_search_torch, "CPU")
LIB.impl("bloom_search", bloom_search_triton, "CUDA")
torch.library.register_fake("iam::bloom_search", _bloom_search_fake, lib=LIB)

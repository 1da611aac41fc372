"""Filter expressions: parsing, limits, canonical printing and the compiled plan.

Grammar (the anchor system's, so its queries work unchanged, plus named features/values):

    expression = or_expr ;
    or_expr    = and_expr { ("OR" | "|") and_expr } ;
    and_expr   = unary    { ("AND" | "&") unary } ;
    unary      = ("NOT" | "!") unary | primary ;
    primary    = "(" expression ")" | term ;
    term       = feature ":" value [ ":" weight ] ;
    value      = bare | '"' { character | '\\"' | '\\\\' } '"' ;

Precedence NOT > AND > OR; keywords are case-insensitive; an empty (or blank) expression
matches every item. `feature` is a schema name (`category`), always written bare, or a numeric
feature id (`0`); `value` is spelled as in items.csv (`comedy`, `42`), or a numeric value id
when the feature is given by id. A bare value runs up to whitespace, `( ) & | !` or `:`; any
value can be written in double quotes, where `\\"` and `\\\\` are the only escapes and
keywords are plain text: `genres:"(no genres listed)"`, `brand:"Procter & Gamble"`,
`tags:"NOT"`. `spell_value` (filtering/spelling.py) writes a value the canonical way. The
optional `:weight` of the anchor syntax (also after a quoted value) is accepted and ignored
(filtering is boolean).

Parsing happens once per request, on the CPU, into a postfix *plan*: int64 [L, 3] rows of
(opcode, feature_id, value_id). The model layer evaluates plans, never strings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from filtering.spelling import (  # noqa: F401  (re-exported: the parser's value spelling)
    TERM_STOPS,
    SpellingError,
    join_values,
    read_value,
    spell_value,
    split_values,
    unspell_value,
)
from world.schema import Schema

MAX_EXPRESSION_BYTES = 4096
MAX_NESTING = 64

# plan opcodes (shared with the model layer: stages/filter.py, kernels/bloom_search.py)
OP_PAD = 0  # padding row of a batched plan; no effect
OP_TERM = 1  # push: items having value `value_id` for feature `feature_id`
OP_AND = 2
OP_OR = 3
OP_NOT = 4
OP_ALL = 5  # push: every item (the empty expression)
PLAN_WIDTH = 3


class FilterError(ValueError):
    """A bad filter expression; `position` is the 0-based character offset of the problem."""

    def __init__(self, position: int, problem: str):
        super().__init__(f"filter error at position {position}: {problem}")
        self.position = position
        self.problem = problem


# --- syntax tree ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Term:
    feature_id: int
    value_id: int


@dataclass(frozen=True)
class Not:
    child: Node


@dataclass(frozen=True)
class And:
    children: tuple


@dataclass(frozen=True)
class Or:
    children: tuple


@dataclass(frozen=True)
class All:
    pass


Node = Union[Term, Not, And, Or, All]

_OPERATOR = re.compile(
    r"(?P<lp>\()|(?P<rp>\))|(?P<and>&|AND\b)|(?P<or>\||OR\b)|(?P<not>!|NOT\b)",
    re.IGNORECASE,
)


class _Part(NamedTuple):
    """One ':'-separated part of a term: feature, value or weight."""

    text: str  # quotes and escapes removed
    pos: int  # its first character (the opening quote of a quoted part)
    quoted: bool


@dataclass
class _Tok:
    kind: str
    text: str  # as written
    pos: int
    parts: Tuple[_Part, ...] = ()  # terms only


def _tokenize(text: str) -> List[_Tok]:
    toks, pos, n = [], 0, len(text)
    while True:
        while pos < n and text[pos].isspace():
            pos += 1
        if pos >= n:
            break
        m = _OPERATOR.match(text, pos)
        if m is not None:
            toks.append(_Tok(m.lastgroup, m.group(), pos))
            pos = m.end()
        else:
            toks.append(_read_term(text, pos))
            pos = toks[-1].pos + len(toks[-1].text)
    toks.append(_Tok("end", "", n))
    return toks


def _read_term(text: str, start: int) -> _Tok:
    """The term starting at `text[start]` (not whitespace, not an operator): ':'-separated
    parts, each bare or quoted, up to whitespace, an operator or the end."""
    parts, pos, n = [], start, len(text)
    while True:
        try:
            value = read_value(text, pos, TERM_STOPS)
        except SpellingError as e:
            raise FilterError(e.position, e.problem) from None
        parts.append(_Part(value.text, pos, value.quoted))
        pos = value.end
        if pos < n and text[pos] == ":":
            pos += 1
            continue
        if value.quoted and pos < n and not (text[pos].isspace() or text[pos] in TERM_STOPS):
            raise FilterError(pos, f"unexpected {text[pos]!r} after the quoted value at "
                                   f"position {parts[-1].pos} (only ':weight' may follow it)")
        return _Tok("term", text[start:pos], start, tuple(parts))


class _Parser:
    def __init__(self, text: str, schema: Schema):
        self.toks = _tokenize(text)
        self.i = 0
        self.schema = schema

    def peek(self) -> _Tok:
        return self.toks[self.i]

    def take(self) -> _Tok:
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def parse(self) -> Node:
        node = self.or_expr(0)
        tok = self.peek()
        if tok.kind != "end":
            what = "')' without a matching '('" if tok.kind == "rp" else repr(tok.text)
            raise FilterError(tok.pos, f"unexpected {what} after a complete expression")
        return node

    def or_expr(self, depth: int) -> Node:
        parts = [self.and_expr(depth)]
        while self.peek().kind == "or":
            self.take()
            parts.append(self.and_expr(depth))
        return parts[0] if len(parts) == 1 else Or(tuple(parts))

    def and_expr(self, depth: int) -> Node:
        parts = [self.unary(depth)]
        while self.peek().kind == "and":
            self.take()
            parts.append(self.unary(depth))
        return parts[0] if len(parts) == 1 else And(tuple(parts))

    def unary(self, depth: int) -> Node:
        tok = self.peek()
        if tok.kind == "not":
            self._check_depth(tok, depth + 1)
            self.take()
            return Not(self.unary(depth + 1))
        return self.primary(depth)

    def primary(self, depth: int) -> Node:
        tok = self.take()
        if tok.kind == "lp":
            self._check_depth(tok, depth + 1)
            node = self.or_expr(depth + 1)
            close = self.take()
            if close.kind != "rp":
                raise FilterError(close.pos, f"expected ')' to close the '(' at position {tok.pos}"
                                  + (" but the expression ended" if close.kind == "end"
                                     else f" but found {close.text!r}"))
            return node
        if tok.kind == "term":
            return self.term(tok)
        found = "the end of the expression" if tok.kind == "end" else repr(tok.text)
        raise FilterError(tok.pos, f"expected a term like 'feature:value' or '(' but found {found}")

    def _check_depth(self, tok: _Tok, depth: int) -> None:
        if depth > MAX_NESTING:
            raise FilterError(tok.pos, f"expression nested deeper than {MAX_NESTING} levels")

    def term(self, tok: _Tok) -> Term:
        parts = tok.parts
        if parts[0].quoted:
            raise FilterError(tok.pos, "feature names are written bare, without quotes "
                                       f"(got {tok.text!r})")
        if (len(parts) not in (2, 3) or not parts[0].text
                or not (parts[1].text or parts[1].quoted)):
            raise FilterError(tok.pos, f"expected a term like 'feature:value', got {tok.text!r}")
        fname, value, value_pos = parts[0].text, parts[1].text, parts[1].pos
        if len(parts) == 3:
            weight = parts[2]
            try:
                if weight.quoted:
                    raise ValueError
                float(weight.text)
            except ValueError:
                written = tok.text[weight.pos - tok.pos:]
                raise FilterError(weight.pos,
                                  f"term weight must be a number, got {written!r}") from None
        feats = self.schema.features
        if fname.lstrip("-").isdigit():  # anchor syntax: numeric feature id and value id
            fid = int(fname)
            if not 0 <= fid < len(feats):
                raise FilterError(tok.pos, f"unknown feature id {fid} (ids 0..{len(feats) - 1})")
            try:
                vid = int(value)
            except ValueError:
                raise FilterError(value_pos, f"feature id {fid} needs a numeric value id, got "
                                  f"{spell_value(value)}") from None
            spec = feats[fid]
            if spec.kind == "str" and not 0 <= vid < len(spec.vocabulary):
                raise FilterError(value_pos,
                                  f"feature {spec.name!r} has no value id {vid} "
                                  f"(ids 0..{len(spec.vocabulary) - 1})")
            return Term(fid, vid)
        try:
            fid = self.schema.feature_id(fname)
        except KeyError:
            names = ", ".join(f.name for f in feats)
            raise FilterError(tok.pos, f"unknown feature {fname!r} (features: {names})") from None
        try:
            vid = feats[fid].value_id(value, spell=spell_value)
        except ValueError as e:
            raise FilterError(value_pos, str(e)) from None
        return Term(fid, vid)


def parse(text: str, schema: Schema) -> Node:
    """Parse `text` into a syntax tree; raises FilterError naming the position and problem."""
    if len(text.encode("utf-8")) > MAX_EXPRESSION_BYTES:
        raise FilterError(MAX_EXPRESSION_BYTES,
                          f"expression is {len(text.encode('utf-8'))} bytes, over the "
                          f"{MAX_EXPRESSION_BYTES}-byte limit")
    if not text.strip():
        return All()
    return _Parser(text, schema).parse()


def decode_filter(raw: Union[bytes, str]) -> str:
    """The request's BYTES value as text; raises FilterError for binary garbage."""
    if isinstance(raw, str):
        return raw
    if len(raw) > MAX_EXPRESSION_BYTES:
        raise FilterError(MAX_EXPRESSION_BYTES, f"expression is {len(raw)} bytes, over the "
                          f"{MAX_EXPRESSION_BYTES}-byte limit")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FilterError(e.start, "expression is not valid UTF-8 text") from None
    bad = next((i for i, c in enumerate(text) if not c.isprintable() and c not in " \t\n"), None)
    if bad is not None:
        raise FilterError(bad, f"control character {text[bad]!r} in expression")
    return text


# --- printing and evaluation (reference semantics) ------------------------------------------
def to_string(node: Node, schema: Schema) -> str:
    """Canonical text with named features and values; parse(to_string(n)) == n."""
    if isinstance(node, All):
        return ""
    if isinstance(node, Term):
        spec = schema.features[node.feature_id]
        return f"{spec.name}:{spell_value(spec.spell(node.value_id))}"
    if isinstance(node, Not):
        inner = to_string(node.child, schema)
        return f"NOT {inner}" if isinstance(node.child, (Term, Not)) else f"NOT ({inner})"
    if isinstance(node, And):
        return " AND ".join(
            f"({to_string(c, schema)})" if isinstance(c, Or) else to_string(c, schema)
            for c in node.children)
    return " OR ".join(to_string(c, schema) for c in node.children)


def evaluate(node: Node, item_values: Sequence[Sequence[int]]) -> bool:
    """Plain-Python truth of `node` for one item; `item_values[f]` = the item's value ids."""
    if isinstance(node, All):
        return True
    if isinstance(node, Term):
        return node.value_id in item_values[node.feature_id]
    if isinstance(node, Not):
        return not evaluate(node.child, item_values)
    if isinstance(node, And):
        return all(evaluate(c, item_values) for c in node.children)
    return any(evaluate(c, item_values) for c in node.children)


# --- compiled plan ------------------------------------------------------------------------
def stack_need(node: Node, memo: Optional[dict] = None) -> int:
    """Stack slots the postfix evaluation of `node` needs, children in `compile_plan`'s order
    (`memo`: id(node) -> need, filled on the way)."""
    memo = {} if memo is None else memo
    key = id(node)
    if key not in memo:
        if isinstance(node, (All, Term)):
            memo[key] = 1
        elif isinstance(node, Not):
            memo[key] = stack_need(node.child, memo)
        else:
            # the first child runs on an empty stack, each later one above a single value
            needs = sorted((stack_need(c, memo) for c in node.children), reverse=True)
            memo[key] = max(needs[0], needs[1] + 1) if len(needs) > 1 else needs[0]
    return memo[key]


def compile_plan(node: Node) -> torch.Tensor:
    """Postfix plan int64 [L, 3] of (opcode, feature_id, value_id).

    The children of AND / OR are emitted deepest first (stable for equal depths; both
    operators commute), so the evaluation stack stays shallow: at most log2(terms) + 1 slots
    (11 for the ~1000 terms a 4 KB expression can hold) instead of one per nesting level. The
    GPU kernel keeps that stack in registers (kernels/bloom_search.py).
    """
    rows: List[List[int]] = []
    memo: dict = {}
    stack_need(node, memo)

    def emit(n: Node) -> None:
        if isinstance(n, All):
            rows.append([OP_ALL, 0, 0])
        elif isinstance(n, Term):
            rows.append([OP_TERM, n.feature_id, n.value_id])
        elif isinstance(n, Not):
            emit(n.child)
            rows.append([OP_NOT, 0, 0])
        else:
            op = OP_AND if isinstance(n, And) else OP_OR
            children = sorted(n.children, key=lambda c: memo[id(c)], reverse=True)
            emit(children[0])
            for c in children[1:]:
                emit(c)
                rows.append([op, 0, 0])

    emit(node)
    return torch.tensor(rows, dtype=torch.int64)


def parse_plan(text: Union[str, bytes], schema: Schema) -> torch.Tensor:
    """decode + parse + compile: the per-request CPU step of the filter stage."""
    return compile_plan(parse(decode_filter(text), schema))


def batch_plans(plans: Sequence[torch.Tensor], length: Optional[int] = None) -> torch.Tensor:
    """Stack plans into int64 [B, L, 3] (or as wide as the plans), padded with OP_PAD rows."""
    length = length or max(int(p.shape[0]) for p in plans)
    width = int(plans[0].shape[1]) if len(plans) else PLAN_WIDTH
    out = torch.zeros((len(plans), length, width), dtype=torch.int64)
    for i, p in enumerate(plans):
        out[i, : p.shape[0]] = p
    return out

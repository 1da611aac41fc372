"""How one feature value is written: after `feature:` in a filter expression, in an items.csv
cell and in an item update (`name=value|value,...`). One spelling serves all three.

A value is written bare (`comedy`, `42`, `back\\slash`) when it is not empty, is not a keyword
(`AND`, `OR`, `NOT`, any case), does not start with `"` and has no whitespace and none of
`( ) & | ! : , "`. Any other value is written in double quotes, where `\\"` stands for `"` and
`\\\\` for a backslash, and no other backslash sequence is allowed:

    "(no genres listed)"   "Procter & Gamble"   "say \\"hi\\""   "back\\\\slash"   "AND"   ""

A quote opens a quoted value only as the value's first character. (The parser reads a bare
value up to whitespace, `( ) & | !` or `:`, so a bare `a,b` or `say"hi"` still parses; writing
such values quoted keeps the update format's `,` unambiguous and the text easy to read.)

Torch-free on purpose: the client and the load test read items.csv with it.
"""

from __future__ import annotations

from typing import List, NamedTuple, Sequence, Tuple

KEYWORDS = ("AND", "OR", "NOT")
QUOTE = '"'
ESCAPE = "\\"
# characters that make spell_value quote: the filter grammar's operators and separators, and
# ',' (the update format's separator between features)
_QUOTED_CHARS = frozenset('()&|!:,"')
LIST_SEPARATOR = "|"  # between the values of a multi-valued feature
# where a bare value ends in a filter expression (besides whitespace): operators and the
# separator before a term's optional weight
TERM_STOPS = "()&|!:"


class SpellingError(ValueError):
    """A badly written value; `position` is the 0-based offset of the problem in the text."""

    def __init__(self, position: int, problem: str):
        super().__init__(f"at position {position}: {problem}")
        self.position = position
        self.problem = problem


class ReadValue(NamedTuple):
    text: str  # the value itself (quotes and escapes removed)
    end: int  # offset just past what was read
    quoted: bool


def spell_value(text: str) -> str:
    """`text` as it is written after `feature:` (and in items.csv): bare when that reads back
    as `text`, else quoted with `\\"` and `\\\\` escapes."""
    bare = (text and text.upper() not in KEYWORDS
            and not any(c.isspace() or c in _QUOTED_CHARS for c in text))
    return text if bare else quote_value(text)


def quote_value(text: str) -> str:
    """`text` in double quotes, with `"` and `\\` escaped."""
    return QUOTE + text.replace(ESCAPE, ESCAPE * 2).replace(QUOTE, ESCAPE + QUOTE) + QUOTE


def read_value(text: str, pos: int, stops: str) -> ReadValue:
    """Read one written value starting at `text[pos]`: a quoted value up to its closing quote,
    or a bare one up to whitespace, a character of `stops` or the end (possibly empty).

    Raises SpellingError for a quote that is not closed (at the opening quote) or a backslash
    sequence other than `\\"` and `\\\\` (at the backslash)."""
    n = len(text)
    if pos < n and text[pos] == QUOTE:
        chars, i = [], pos + 1
        while i < n:
            c = text[i]
            if c == QUOTE:
                return ReadValue("".join(chars), i + 1, True)
            if c == ESCAPE:
                if i + 1 >= n:
                    break
                if text[i + 1] not in (QUOTE, ESCAPE):
                    pair = text[i:i + 2]
                    shown = f"'{pair}'" if pair.isprintable() else repr(pair)
                    raise SpellingError(i, f"bad escape {shown} in the quoted value opened at "
                                           f"position {pos}: only \\\" and \\\\ are escapes")
                i += 1
                c = text[i]
            chars.append(c)
            i += 1
        raise SpellingError(pos, f"quoted value opened at position {pos} is not closed")
    end = pos
    while end < n and not text[end].isspace() and text[end] not in stops:
        end += 1
    return ReadValue(text[pos:end], end, False)


def read_values(text: str, pos: int = 0, stop: str = "") -> Tuple[List[str], int]:
    """Read `value|value|...` from `text[pos]` up to the first `stop` character outside quotes
    (or the end): (the values, the offset of that stop character or len(text)).

    Whitespace around a value and empty entries (`a||b`) are skipped; a character after a
    value other than `|`, `stop` or whitespace is a SpellingError."""
    values, n = [], len(text)
    stops = LIST_SEPARATOR + stop
    while True:
        while pos < n and text[pos].isspace():
            pos += 1
        if pos >= n or text[pos] in stops:
            pass  # an empty entry
        else:
            start = pos
            value = read_value(text, pos, stops)
            values.append(value.text)
            pos = value.end
            while pos < n and text[pos].isspace():
                pos += 1
            if pos < n and text[pos] not in stops:
                raise SpellingError(pos, f"expected {LIST_SEPARATOR!r} after the value at "
                                         f"position {start}, found {text[pos]!r}")
        if pos >= n or text[pos] in stop:
            return values, pos
        pos += 1  # past '|'


def split_values(cell: str) -> List[str]:
    """The values of one items.csv cell (`join_values`' inverse); `|` inside quotes is text.
    Raises SpellingError naming the position of a badly written value."""
    return read_values(cell)[0]


def join_values(values: Sequence[str]) -> str:
    """One items.csv cell: every value spelled as a filter expression spells it, joined by
    `|` (an empty cell is no value, `""` is the empty text)."""
    return LIST_SEPARATOR.join(spell_value(v) for v in values)


def unspell_value(spelled: str) -> str:
    """The value that `spelled` (one bare or quoted value, as `spell_value` writes it) names."""
    value = read_value(spelled, 0, TERM_STOPS)
    if value.end != len(spelled) or not (value.quoted or spelled):
        raise SpellingError(value.end, f"expected one value, got {spelled!r}")
    return value.text

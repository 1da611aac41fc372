"""The catalog's filterable features: names, ids, kinds and vocabularies.

Filter expressions name a feature either by name (`category:comedy`) or, in the anchor
system's numeric syntax, by its id (`0:3` = feature 0, value id 3). Every value has an integer
value id: for `int` features the integer itself, for `str` features its index in the
vocabulary. `items.csv` spells each value exactly as an expression spells it
(filtering/spelling.py: bare `comedy`, or quoted `"Science Fiction"`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional


@dataclass
class FeatureSpec:
    name: str
    kind: str  # "str" (values from `vocabulary`) or "int" (any int64 value)
    multi_valued: bool = False
    vocabulary: List[str] = field(default_factory=list)  # kind == "str" only

    def __post_init__(self) -> None:
        if self.kind not in ("str", "int"):
            raise ValueError(
                f"feature {self.name!r}: kind must be 'str' or 'int', not {self.kind!r}")
        self._index: Optional[Dict[str, int]] = None

    def value_id(self, value: str, spell: Callable[[str], str] = repr) -> int:
        """Value id of `value` (the text itself, quotes and escapes removed); raises ValueError
        naming the problem, with values written by `spell` (the parser passes
        filtering.spelling.spell_value, so that messages write values as expressions do)."""
        if self.kind == "int":
            try:
                return int(value)
            except ValueError:
                raise ValueError(
                    f"feature {self.name!r} takes integer values, got {spell(value)}"
                ) from None
        if self._index is None:
            self._index = {v: i for i, v in enumerate(self.vocabulary)}
        if value not in self._index:
            known = ", ".join(spell(v) for v in self.vocabulary[:8])
            known += ", ..." if len(self.vocabulary) > 8 else ""
            raise ValueError(f"feature {self.name!r} has no value {spell(value)} "
                             f"(values: {known})")
        return self._index[value]

    def spell(self, value_id: int) -> str:
        """The value's text (an expression or items.csv writes it with spell_value)."""
        return str(value_id) if self.kind == "int" else self.vocabulary[value_id]


@dataclass
class Schema:
    features: List[FeatureSpec]

    def feature_id(self, name: str) -> int:
        for i, f in enumerate(self.features):
            if f.name == name:
                return i
        raise KeyError(name)

    def to_json(self) -> str:
        return json.dumps({"features": [asdict(f) for f in self.features]}, indent=1)

    @staticmethod
    def from_json(text: str) -> Schema:
        return Schema([FeatureSpec(**f) for f in json.loads(text)["features"]])

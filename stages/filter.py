"""The `filter` stage: evaluates compiled filter plans over the catalog's item features.

Input is a batch of postfix plans (filtering/expression.py) and output one packed bitmap per
query (stages/bits.py) of exactly the items that satisfy the expression.
"""

from dataclasses import dataclass
from typing import List, Tuple

import numpy as np
import torch
from torch import nn

from filtering.expression import OP_ALL, OP_AND, OP_NOT, OP_OR, OP_TERM
from stages.bits import pack_bits
from world.synthetic import Catalog


@dataclass
class FilterConfig:
    """Build knobs of the filter layer (none yet for the exact reference filter)."""


def feature_matrix(catalog: Catalog) -> Tuple[torch.Tensor, torch.Tensor]:
    """int64 [N, S] value ids of all features side by side and column_start [F + 1]."""
    start = np.cumsum([0] + [f.shape[1] for f in catalog.features])
    return torch.from_numpy(np.concatenate(catalog.features, axis=1)), torch.from_numpy(start)


def build_filter_stage(catalog: Catalog, config: FilterConfig) -> nn.Module:
    """The filter layer over `catalog` (in index row order)."""
    return ExactFeatureFilter(*feature_matrix(catalog))


class ExactFeatureFilter(nn.Module):
    """Exact evaluation over a dense feature matrix: a term is `(column == value).any()` over
    the feature's columns. It is the reference the indexed filter is checked against.

    Args:
        feature_matrix: int64 [N, S], value ids of every feature side by side, padded with -1
            (a multi-valued feature takes as many columns as its longest item).
        column_start: int64 [F + 1], feature f owns columns column_start[f]:column_start[f+1].
    """

    def __init__(self, feature_matrix: torch.Tensor, column_start: torch.Tensor):
        super().__init__()
        self.register_buffer("feature_matrix", feature_matrix.to(torch.int64).contiguous())
        self.register_buffer("column_start", column_start.to(torch.int64))
        self.num_items = int(feature_matrix.shape[0])
        # opcodes as attributes: TorchScript cannot read module-level globals
        self.op_term, self.op_all, self.op_not = OP_TERM, OP_ALL, OP_NOT
        self.op_and, self.op_or = OP_AND, OP_OR

    def term(self, feature_id: int, value_id: int) -> torch.Tensor:
        lo = int(self.column_start[feature_id])
        hi = int(self.column_start[feature_id + 1])
        return (self.feature_matrix[:, lo:hi] == value_id).any(dim=1)

    def evaluate(self, plan: torch.Tensor) -> torch.Tensor:
        """plan int64 [L, 3] -> bool [N]."""
        stack: List[torch.Tensor] = []
        steps: List[List[int]] = plan.tolist()
        for row in steps:
            op = row[0]
            if op == self.op_term:
                stack.append(self.term(row[1], row[2]))
            elif op == self.op_all:
                stack.append(torch.ones(self.num_items, dtype=torch.bool))
            elif op == self.op_not:
                stack.append(~stack.pop())
            elif op == self.op_and:
                b = stack.pop()
                stack.append(stack.pop() & b)
            elif op == self.op_or:
                b = stack.pop()
                stack.append(stack.pop() | b)
        if len(stack) != 1:
            raise RuntimeError("malformed filter plan: stack holds " + str(len(stack)))
        return stack[0]

    def forward(self, plans: torch.Tensor) -> torch.Tensor:
        """plans int64 [B, L, 3] -> filter bits int64 [B, W]."""
        masks = [self.evaluate(plans[b]) for b in range(plans.shape[0])]
        return pack_bits(torch.stack(masks))

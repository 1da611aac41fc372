"""The one evaluation of a postfix filter plan (filtering/expression.py compile_plan), shared by
every filter layer: the Bloom layer's exact check, its reference, the posting-list filter of the
baseline and the fresh rows.

A layer computes the truth of each TERM step its own way (a bitmap row, a column compare, a
posting list) and hands them over in step order; `PostfixPlan` combines them. The truths are
bool masks or packed int64 words alike: NOT complements within `everything` (all items' bits,
so bits past N stay 0), ALL pushes it.
"""

from typing import List

import torch
from torch import nn

from filtering.expression import OP_ALL, OP_AND, OP_NOT, OP_OR, OP_TERM


class PostfixPlan(nn.Module):
    """Evaluates plans given their terms' truths; holds the opcodes (TorchScript reads no
    module-level globals, so they live here as attributes, from filtering/expression.py)."""

    def __init__(self):
        super().__init__()
        self.op_term, self.op_all, self.op_not = OP_TERM, OP_ALL, OP_NOT
        self.op_and, self.op_or = OP_AND, OP_OR

    @torch.jit.export
    def terms(self, steps: List[List[int]]) -> List[List[int]]:
        """The TERM steps of a plan, in order: (opcode, feature id, value id) each."""
        out: List[List[int]] = []
        for row in steps:  # (TorchScript has no comprehension ifs)
            if row[0] == self.op_term:
                out.append(row)
        return out

    def forward(self, steps: List[List[int]], truths: List[torch.Tensor],
                everything: torch.Tensor) -> torch.Tensor:
        """steps: the plan's rows (opcode first; other columns ignored; padding rows skipped);
        truths: one tensor per TERM step, in order, shaped like `everything`."""
        stack: List[torch.Tensor] = []
        next_term = 0
        for row in steps:
            op = row[0]
            if op == self.op_term:
                stack.append(truths[next_term])
                next_term += 1
            elif op == self.op_all:
                stack.append(everything)
            elif op == self.op_not:
                stack.append(~stack.pop() & everything)
            elif op == self.op_and:
                b = stack.pop()
                stack.append(stack.pop() & b)
            elif op == self.op_or:
                b = stack.pop()
                stack.append(stack.pop() | b)
        if len(stack) != 1 or next_term != len(truths):
            raise RuntimeError("malformed filter plan: stack holds " + str(len(stack))
                               + " values, " + str(len(truths) - next_term) + " terms unused")
        return stack[0]

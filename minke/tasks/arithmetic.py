"""Integer arithmetic with +, -, * and the usual precedence.

Difficulty d (clamped to 1..5): d + 1 operands (at most 5), each of 1 to D = 2 + (d - 1) // 2 digits,
except that a factor right of "*" has at most D - 1 digits (a product chain grows fast).
"""

from __future__ import annotations

import random
import re

from .base import Problem, Task


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def _show(terms: list[int], ops: list[str]) -> str:
    return " ".join([str(terms[0])] + [f"{o} {t}" for o, t in zip(ops, terms[1:])])


class Arithmetic(Task):
    name = "arithmetic"

    def sample(self, rng: random.Random, difficulty: int) -> Problem:
        d = max(1, min(difficulty, 5))
        digits = 2 + (d - 1) // 2
        ops = [rng.choice("+-*") for _ in range(min(d, 4))]
        nums = [rng.randint(0, 10 ** rng.randint(1, digits - (op == "*")) - 1) for op in [""] + ops]
        expr = _show(nums, ops)
        steps = []
        # Products first: collapse each run of "*" into one term, writing every partial product.
        terms, rest = [nums[0]], []
        for op, n in zip(ops, nums[1:]):
            if op == "*":
                steps.append(f"{terms[-1]} * {n} = {terms[-1] * n}")
                terms[-1] *= n
            else:
                terms.append(n)
                rest.append(op)
        if steps and rest:
            steps.append(f"So {expr} = {_show(terms, rest)}")
        # Then + and - from left to right.
        acc = terms[0]
        for op, t in zip(rest, terms[1:]):
            steps.append(f"{acc} {op} {t} = {_apply(acc, op, t)}")
            acc = _apply(acc, op, t)
        solution = "\n".join(steps + [f"\\boxed{{{acc}}}"])
        return Problem(self.name, f"What is {expr}?", str(acc), solution, {"expression": expr})

    def verify(self, problem: Problem, boxed: str) -> bool:
        s = re.sub(r"[\s,]", "", boxed).replace("\u2212", "-")  # "1,234", "- 5", unicode minus
        return re.fullmatch(r"[+-]?\d+", s) is not None and int(s) == int(problem.answer)

"""Integer arithmetic with +, -, * and the usual precedence.

Difficulty d (clamped to 1..5): d + 1 operands (at most 5), each of 1 to D digits (D = 2 up to d = 3,
then 3), except that a factor right of "*" has at most D - 1 digits (a product chain grows fast).

The worked solution splits every operation on a multi-digit operand by place value, so each line is
an easy one for a small model: 81 - 57 as 81 - 50 = 31, 31 - 7 = 24; 57 * 8 as 50 * 8 = 400,
7 * 8 = 56, 400 + 56 = 456.
"""

from __future__ import annotations

import random
import re

from .base import Problem, Task

MAX_DIGITS = 100  # answers have at most 15 digits (5 operands of 3 digits)


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def _split(a: int, op: str, b: int) -> list[str]:
    """Lines computing a op b by place value: for "+" and "-", the tens (and above) of b first, then
    its units; for "*", the tens (and above) of a times b, its units times b, then their sum. One line
    when b (for "+" and "-") or a (for "*") has a single nonzero part."""
    if op == "*":
        if a < 10 or a % 10 == 0 or b < 2:
            return [f"{a} * {b} = {a * b}"]
        hi, lo = a - a % 10, a % 10
        return [f"{hi} * {b} = {hi * b}", f"{lo} * {b} = {lo * b}", f"{hi * b} + {lo * b} = {a * b}"]
    if b < 10 or b % 10 == 0:
        return [f"{a} {op} {b} = {_apply(a, op, b)}"]
    hi, lo = b - b % 10, b % 10
    mid = _apply(a, op, hi)
    return [f"{a} {op} {hi} = {mid}", f"{mid} {op} {lo} = {_apply(mid, op, lo)}"]


def _show(terms: list[int], ops: list[str]) -> str:
    return " ".join([str(terms[0])] + [f"{o} {t}" for o, t in zip(ops, terms[1:])])


class Arithmetic(Task):
    name = "arithmetic"

    def sample(self, rng: random.Random, difficulty: int) -> Problem:
        d = max(1, min(difficulty, 5))
        digits = 2 + (d > 3)
        ops = [rng.choice("+-*") for _ in range(min(d, 4))]
        nums = [rng.randint(0, 10 ** rng.randint(1, digits - (op == "*")) - 1) for op in [""] + ops]
        expr = _show(nums, ops)
        steps = []
        # Products first: collapse each run of "*" into one term, writing every partial product.
        terms, rest = [nums[0]], []
        for op, n in zip(ops, nums[1:]):
            if op == "*":
                steps += _split(terms[-1], "*", n)
                terms[-1] *= n
            else:
                terms.append(n)
                rest.append(op)
        if steps and rest:
            steps.append(f"So {expr} = {_show(terms, rest)}")
        # Then + and - from left to right.
        acc = terms[0]
        for op, t in zip(rest, terms[1:]):
            steps += _split(acc, op, t)
            acc = _apply(acc, op, t)
        solution = "\n".join(steps + [f"\\boxed{{{acc}}}"])
        return Problem(self.name, f"What is {expr}?", str(acc), solution, {"expression": expr})

    def verify(self, problem: Problem, boxed: str) -> bool:
        """An integer in ASCII digits, optionally signed, spaces and thousands commas allowed ("1,234",
        "- 5", U+2212 minus). Other scripts' digits ("١٢٣", fullwidth "１２"), which int() would accept,
        are wrong: the answer format is ASCII. At most MAX_DIGITS digits, checked before int(), whose
        cost grows quadratically and which refuses more than 4300 digits."""
        if len(boxed) > 4 * MAX_DIGITS:  # bounds the re.sub below too
            return False
        s = re.sub(r"[\s,]", "", boxed).replace("\u2212", "-")
        return re.fullmatch(rf"[+-]?[0-9]{{1,{MAX_DIGITS}}}", s) is not None and int(s) == int(problem.answer)

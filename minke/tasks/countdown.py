"""Countdown (the TinyZero task): reach a target with + - * / using each given number exactly once.

Division must be exact: `check` rejects an answer with any non-integer intermediate value (as in
the game; negatives are allowed). Generated solutions keep every intermediate a positive integer.
Difficulty d: 3 numbers in 1..10 / 1..20 / 1..50 (d = 1 / 2 / 3), 4 numbers in 1..25 / 1..50 (d = 4 / 5+).
The problem is built by combining the numbers at random, so a solution always exists.
"""

from __future__ import annotations

import ast
import random
import re
from collections import Counter
from fractions import Fraction

from .base import Problem, Task

PREC = {"+": 1, "-": 1, "*": 2, "/": 2}
AST_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}
_ALLOWED = re.compile(r"[0-9+\-*/() \t\r\n]*")


def _apply(a: Fraction, op: str, b: Fraction) -> Fraction:
    return a + b if op == "+" else a - b if op == "-" else a * b if op == "*" else a / b


def _join(a: tuple[str, int], op: str, b: tuple[str, int]) -> str:
    """Infix with the fewest parentheses; items are (text, precedence), 3 for a bare number."""
    left = a[0] if a[1] >= PREC[op] else f"({a[0]})"
    tight = b[1] > PREC[op] or (b[1] == PREC[op] and op in "+*")
    return f"{left} {op} {b[0] if tight else f'({b[0]})'}"


def evaluate(text: str, max_len: int = 200) -> tuple[Fraction, list[int]] | None:
    """Exact value and the integer literals of an expression of + - * / and parentheses,
    or None if it is anything else, divides by zero, or has a non-integer intermediate.
    Parsed with `ast` against a whitelist: never eval()."""
    if len(text) > max_len:  # bounds parsing, ast recursion and the size of every intermediate
        return None
    text = text.replace("\u00d7", "*").replace("\u00f7", "/").replace("\u2212", "-")
    if not _ALLOWED.fullmatch(text):  # ASCII decimal only: no 0x10, 1_0, other scripts' digits, NUL, ...
        return None
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None
    literals: list[int] = []

    def walk(node) -> Fraction | None:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            literals.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in AST_OPS:
            a, b = walk(node.left), walk(node.right)
            if a is None or b is None or (type(node.op) is ast.Div and b == 0):
                return None
            v = _apply(a, AST_OPS[type(node.op)], b)
            return v if v.denominator == 1 else None
        return None  # names, calls, unary minus, floats, **, ...

    value = walk(tree)
    return None if value is None else (value, literals)


class Countdown(Task):
    name = "countdown"

    def sample(self, rng: random.Random, difficulty: int) -> Problem:
        count, hi = [(3, 10), (3, 20), (3, 50), (4, 25), (4, 50)][max(1, min(difficulty, 5)) - 1]
        while True:
            nums = [rng.randint(1, hi) for _ in range(count)]
            pool = [(Fraction(n), (str(n), 3)) for n in nums]
            steps = []
            while len(pool) > 1:
                (a, ea), (b, eb) = pool.pop(rng.randrange(len(pool))), pool.pop(rng.randrange(len(pool)))
                if a < b:
                    (a, ea), (b, eb) = (b, eb), (a, ea)  # larger first keeps "-" and "/" positive
                ops = ["+", "*"] + ["-"] * (a > b) + ["/"] * (b > 1 and a % b == 0)
                op = rng.choice(ops)
                v = _apply(a, op, b)
                steps.append(f"{a} {op} {b} = {v}")
                pool.append((v, (_join(ea, op, eb), PREC[op])))
            target, (expr, _) = pool[0]
            if 10 <= target <= 999 and target not in nums:
                break
        numbers = ", ".join(map(str, nums))
        prompt = f"Using the numbers {numbers}, make {target}. Use each number exactly once with + - * /."
        solution = "\n".join(steps + [f"\\boxed{{{expr}}}"])
        meta = {"numbers": nums, "target": int(target)}
        return Problem(self.name, prompt, expr, solution, meta)

    def search_solution(self, problem: Problem, rng: random.Random, failures: int) -> str:
        """The worked solution preceded by up to ``failures`` attempts that miss the target, each one
        computed step by step, checked against the target and rejected ("… Wait, try again."): a trace of
        search with self-verification, as R1's long chains of thought backtrack. Attempts combine the
        numbers at random, as ``sample`` does; one that happens to hit the target ends the search."""
        target, lines = problem.meta["target"], []
        for _ in range(failures):
            pool, steps = [Fraction(n) for n in problem.meta["numbers"]], []
            while len(pool) > 1:
                a, b = sorted((pool.pop(rng.randrange(len(pool))), pool.pop(rng.randrange(len(pool)))), reverse=True)
                op = rng.choice(["+", "*"] + ["-"] * (a > b) + ["/"] * (b > 1 and a % b == 0))
                steps.append(f"{a} {op} {b} = {_apply(a, op, b)}")
                pool.append(_apply(a, op, b))
            if pool[0] == target:
                break
            lines += steps + [f"{pool[0]} is not {target}. Wait, try again."]
        *steps, answer = problem.solution.split("\n")
        return "\n".join(lines + steps + [f"{target} is the target.", answer])

    def verify(self, problem: Problem, boxed: str) -> bool:
        result = evaluate(boxed.partition("=")[0])  # tolerate "expr = target"
        if result is None:
            return False
        value, literals = result
        return value == problem.meta["target"] and Counter(literals) == Counter(problem.meta["numbers"])

"""Rule-based rewards for GRPO (DeepSeek-R1 §2.2.2): accuracy by the task's checker, R1's output format,
DAPO's soft overlong penalty, and any Python callable `module:function` as an extra term.

`Rewards.score` returns the weighted total per response and every component unweighted, so a trainer
logs accuracy and format even where their weight is 0.
"""

from __future__ import annotations

import importlib
import math
import re
from typing import Callable, Sequence

import torch

from ..tasks import TASKS, Problem, check, extract_boxed

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_REFLECTION = re.compile(r"\b(?:wait|check|verify)\b", re.IGNORECASE)


class RewardError(Exception):
    """A reward that cannot be loaded, or that raised or returned a non-number; names the callable."""


def accuracy(problem: Problem, response: str) -> float:
    """1.0 when the response's last \\boxed{} answer is right, else 0.0. Built-in tasks use their own
    checker; any other task name (e.g. "math" from a JSONL set) is a free-form answer compared with
    math-verify (minke.tasks.mathcheck.math_equal); a gold answer it cannot parse scores 0."""
    if problem.task in TASKS:
        return float(check(problem, response))
    from ..tasks.mathcheck import math_equal  # math-verify is only needed for free-form answers

    return 1.0 if math_equal(problem.answer, response) is True else 0.0


def _answer_ok(answer: str) -> bool:
    boxed = extract_boxed(answer)
    return boxed is not None and boxed.strip() != ""


def format_ok(response: str, think_opened: bool = True) -> bool:
    """R1's output form: reasoning inside <think>…</think>, then an answer with a \\boxed{…}.

    think_opened=True (the prompt already ends with "<think>\\n", as R1's chat template does): the response
    is `reasoning </think> answer` with exactly one "</think>" and no "<think>".
    think_opened=False (e.g. the R1-Zero template): the response is `<think> reasoning </think> answer`,
    the "<think>" first (only whitespace before it), exactly one of each tag.
    Either way the reasoning is not blank, and the answer (everything after "</think>") holds a \\boxed{}
    whose braces balance and whose content is not blank.
    """
    if think_opened:
        body = response
    else:
        body = response.lstrip()
        if not body.startswith(THINK_OPEN):
            return False
        body = body[len(THINK_OPEN):]
    if THINK_OPEN in body or body.count(THINK_CLOSE) != 1:
        return False
    reasoning, answer = body.split(THINK_CLOSE)
    return reasoning.strip() != "" and _answer_ok(answer)


def overlong_penalty(length: int, max_len: int, buffer: int) -> float:
    """DAPO's soft overlong punishment (eq. 13): 0 up to max_len - buffer tokens, then linear down to -1 at
    max_len, and -1 beyond (a response cut off at max_len gets the full -1)."""
    if not 0 < buffer <= max_len:
        raise ValueError(f"overlong buffer must satisfy 0 < buffer <= max_len, got buffer={buffer}, "
                         f"max_len={max_len}")
    free = max_len - buffer
    if length <= free:
        return 0.0
    if length > max_len:
        return -1.0
    return (free - length) / buffer


def load_callable(spec: str) -> Callable:
    """"package.module:function" (or "module:Class.method") → the callable, with an error naming spec."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise RewardError(f"reward {spec!r}: expected 'module:function', e.g. 'my_rewards:length_bonus'")
    try:
        obj = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or anything the module raises while importing
        raise RewardError(f"reward {spec!r}: cannot import module {module_name!r}: "
                          f"{type(e).__name__}: {e}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RewardError(f"reward {spec!r}: {getattr(obj, '__name__', module_name)!r} has no "
                              f"attribute {part!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise RewardError(f"reward {spec!r}: {attr!r} is a {type(obj).__name__}, not callable")
    return obj


def reflection_rate(responses: Sequence[str]) -> float:
    """Share of responses containing the word "wait", "check" or "verify" (any case): R1's "aha" signal."""
    if not responses:
        return 0.0
    return sum(1 for r in responses if _REFLECTION.search(r)) / len(responses)


class Rewards:
    """total_i = Σ_name weight[name] · component[name]_i over accuracy, format, overlong (when configured)
    and the custom callables, each called as fn(problem, response) -> float.

    weights: {"accuracy": w, "format": w, "overlong": w}; a missing name weighs 0 (overlong defaults to 1,
    as DAPO adds it to the reward). overlong: (max_len, buffer) in tokens, or None. custom: [(spec, weight)].
    """

    BUILTIN = ("accuracy", "format", "overlong")

    def __init__(self, weights: dict[str, float] | None = None, overlong: tuple[int, int] | None = None,
                 custom: Sequence[tuple[str, float]] = (), think_opened: bool = True):
        weights = {"accuracy": 1.0, "format": 1.0} if weights is None else dict(weights)
        unknown = set(weights) - set(self.BUILTIN)
        if unknown:
            raise ValueError(f"unknown reward weight(s) {sorted(unknown)}; built-in rewards are "
                             f"{list(self.BUILTIN)} (custom ones go in custom=[('module:function', weight)])")
        if overlong is not None:
            max_len, buffer = overlong
            overlong_penalty(0, max_len, buffer)  # validates (max_len, buffer) now, not mid-run
            weights.setdefault("overlong", 1.0)
        elif weights.get("overlong"):
            raise ValueError("a weight for 'overlong' needs overlong=(max_len, buffer)")
        self.weights = weights
        self.overlong = overlong
        self.think_opened = think_opened
        self.custom = [(spec, load_callable(spec), float(w)) for spec, w in custom]
        names = [spec for spec, _, _ in self.custom]
        if len(set(names)) != len(names) or set(names) & set(self.BUILTIN):
            raise ValueError(f"custom reward names must be distinct and not built-in names, got {names}")

    def score(self, problems: Sequence[Problem], responses: Sequence[str],
              lengths: Sequence[int] | None = None) -> tuple[torch.Tensor, dict[str, list[float]]]:
        """→ (total (N,) float32, {component: N unweighted values}). lengths: response tokens, needed
        with overlong."""
        n = len(problems)
        if len(responses) != n or (lengths is not None and len(lengths) != n):
            got = None if lengths is None else len(lengths)
            raise ValueError(f"score needs as many responses and lengths as problems: {n} problems, "
                             f"{len(responses)} responses, {got} lengths")
        comps: dict[str, list[float]] = {
            "accuracy": [accuracy(p, r) for p, r in zip(problems, responses)],
            "format": [float(format_ok(r, self.think_opened)) for r in responses],
        }
        if self.overlong is not None:
            if lengths is None:
                raise ValueError("the overlong penalty needs the responses' token lengths")
            comps["overlong"] = [overlong_penalty(int(l), *self.overlong) for l in lengths]
        for spec, fn, _ in self.custom:
            comps[spec] = [self._call(spec, fn, i, p, r) for i, (p, r) in enumerate(zip(problems, responses))]
        total = torch.zeros(n, dtype=torch.float64)
        for name, values in comps.items():
            w = self.weights.get(name, 0.0) if name in self.BUILTIN else self._custom_weight(name)
            if w:
                total += w * torch.tensor(values, dtype=torch.float64)
        return total.float(), comps

    def _custom_weight(self, spec: str) -> float:
        return next(w for s, _, w in self.custom if s == spec)

    @staticmethod
    def _call(spec: str, fn: Callable, i: int, problem: Problem, response: str) -> float:
        try:
            value = fn(problem, response)
        except Exception as e:
            raise RewardError(f"reward {spec!r} raised on sample {i}: {type(e).__name__}: {e}") from e
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise RewardError(f"reward {spec!r} returned {value!r} on sample {i}, not a number") from None
        if not math.isfinite(value):
            raise RewardError(f"reward {spec!r} returned {value} on sample {i}; rewards must be finite")
        return value

"""The evaluation metrics R1 reports, as small pure functions over per-sample correctness.

- pass@1 over k (R1 §3): sample k responses per problem (temperature 0.6, top-p 0.95) and average
  their correctness, per problem and then over problems; lower variance than one sample.
- pass@k: Chen et al. 2021's unbiased estimator from n ≥ k samples with c correct,
  1 − C(n−c, k)/C(n, k), in the product form 1 − ∏_{i=n−c+1..n} (1 − k/i) (no huge binomials).
- cons@k: majority vote over the k extracted answers (normalised strings); a problem scores 1 when
  the most frequent answer is correct. Tie rule: when several answers share the top count, the
  problem scores the FRACTION of them that are correct — the expected score of breaking the tie
  uniformly at random, so the metric does not depend on sample order. Samples without an
  answer do not vote; a problem where no sample gave an answer scores 0.
- greedy accuracy: one temperature-0 sample per problem, the plain mean of its correctness.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Callable, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n (c correct) is
    correct."""
    if not (isinstance(n, int) and isinstance(c, int) and isinstance(k, int)):
        raise TypeError(f"pass_at_k: n, c, k must be integers, got {n!r}, {c!r}, {k!r}")
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):  # C(n-c, k)/C(n, k) = ∏ (1 - k/i)
        miss *= 1.0 - k / i
    return 1.0 - miss


def pass1(correct_lists: Sequence[Sequence[bool]]) -> float:
    """Mean over problems of the mean correctness of each problem's samples (0 for no problems)."""
    per_problem = [sum(map(bool, cs)) / len(cs) for cs in correct_lists if len(cs)]
    return sum(per_problem) / len(per_problem) if per_problem else 0.0


def mean_pass_at_k(correct_lists: Sequence[Sequence[bool]], k: int) -> float:
    """pass@k averaged over problems (each problem's n = its number of samples)."""
    vals = [pass_at_k(len(cs), sum(map(bool, cs)), k) for cs in correct_lists]
    return sum(vals) / len(vals) if vals else 0.0


def greedy_accuracy(correct: Sequence[bool]) -> float:
    return sum(map(bool, correct)) / len(correct) if len(correct) else 0.0


_TEXT = re.compile(r"\\(?:text|mathrm|textbf|mbox)\{([^{}]*)\}")


def normalize_answer(answer: str) -> str:
    """The key answers are voted by: LaTeX spacing, $…$, \\text{…} wrappers, \\left/\\right, a
    trailing period and all whitespace removed; dfrac/tfrac read as frac. Equal keys are one vote
    bucket; equivalence beyond this (1/2 vs 0.5) is not attempted."""
    s = _TEXT.sub(r"\1", answer.strip())
    for a, b in (("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\left", ""), ("\\right", ""),
                 ("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\:", ""), ("$", "")):
        s = s.replace(a, b)
    s = re.sub(r"\s+", "", s)
    return s.rstrip(".")


def cons_at_k(answers: Sequence[str | None], correct_fn: Callable[[str], bool]) -> float:
    """Majority-vote score of one problem's extracted answers (None = no answer); see the module's
    tie rule. ``correct_fn`` grades one answer string (called once per distinct top answer)."""
    votes: Counter[str] = Counter()
    first: dict[str, str] = {}  # key -> the first raw form seen, which is what gets graded
    for a in answers:
        if a is None:
            continue
        key = normalize_answer(a)
        if not key:
            continue
        votes[key] += 1
        first.setdefault(key, a)
    if not votes:
        return 0.0
    top = max(votes.values())
    tied = [key for key, v in votes.items() if v == top]
    return sum(bool(correct_fn(first[key])) for key in tied) / len(tied)

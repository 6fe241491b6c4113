"""Evaluation sets: built-in tasks by difficulty (held-out test split) and JSONL files, all as
``minke.tasks.Problem`` so one prompt format and one grader serve both.

JSONL layouts (one JSON object per line; blank lines skipped):
- MATH-500 / AIME: ``{"problem": …, "answer": …}`` (a number answer is read as its text; an
  integer ``level`` field, as MATH-500 has, becomes the row's difficulty);
- GSM8K: ``{"question": …, "answer": "…worked solution…#### 42"}``; the gold answer is the text after
  the last ``####`` with thousands separators removed.
A broken line or a missing field is a ValueError naming the file and line.

Built-in problems are graded by their task's checker, JSONL ones by math-verify on the last
``\\boxed{}`` (``minke.tasks.mathcheck.math_equal``), which returns None when the gold answer cannot
be parsed: ``grade`` passes that on and the evaluation counts it as unparseable (and wrong).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..data.loader import jsonl_records
from ..tasks import Problem, extract_boxed, get_task, problems

MATH = "math"  # Problem.meta["checker"] for free-form answers graded by math-verify


def builtin(tasks: Sequence[str], difficulties: Sequence[int], n: int, split: str = "test") -> list[Problem]:
    """n distinct problems per (task, difficulty), in that order; meta["difficulty"] records the level."""
    out = []
    for task in tasks:
        get_task(task)  # unknown names fail here, naming the known ones
        for d in difficulties:
            for p in problems(task, split, n, d):
                p.meta["difficulty"] = d
                out.append(p)
    return out


def read_jsonl(path: str | Path, name: str | None = None) -> list[Problem]:
    """Problems of a MATH-500/AIME or GSM8K JSONL file; ``name`` (default: the file's stem) is their
    task name in the report."""
    path = Path(path)
    name = name or path.stem
    out = []
    for where, row in jsonl_records(path):
        if "problem" in row:
            question, layout = row["problem"], "math"
        elif "question" in row:
            question, layout = row["question"], "gsm8k"
        else:
            raise ValueError(f"{where}: missing field 'problem' (MATH-500/AIME layout) or 'question' "
                             f"(GSM8K layout); fields present: {sorted(row)}")
        if "answer" not in row:
            raise ValueError(f"{where}: missing field 'answer'")
        answer = row["answer"]
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise ValueError(f"{where}: field 'answer' must be a string or a number, got {type(answer).__name__}")
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"{where}: the question field must be a non-empty string")
        answer, solution = str(answer), row.get("solution") or ""
        if layout == "gsm8k":
            if "####" not in answer:
                raise ValueError(f"{where}: GSM8K field 'answer' must end with '#### <answer>'")
            solution, _, gold = answer.rpartition("####")
            answer = gold.strip().replace(",", "")
        if not answer.strip():
            raise ValueError(f"{where}: field 'answer' is empty")
        level = row.get("level")
        meta = {"checker": MATH, "source": where,
                "difficulty": level if isinstance(level, int) and not isinstance(level, bool) else None}
        out.append(Problem(name, question.strip(), answer.strip(), str(solution).strip(), meta))
    if not out:
        raise ValueError(f"{path}: no problems (the file is empty)")
    return out


def _math_equal(gold: str, response: str) -> bool | None:
    from ..tasks.mathcheck import math_equal

    return math_equal(gold, response)


def grade(problem: Problem, response: str) -> bool | None:
    """True/False, or None when the grader could not judge (unparseable gold, or a checker that
    failed): counted as unparseable and wrong, never raised."""
    try:
        if problem.meta.get("checker") == MATH:
            return _math_equal(problem.answer, response)
        return get_task(problem.task).check(problem, response)
    except ImportError:
        raise
    except Exception:  # a grader bug must not end a long evaluation; it is counted instead
        return None


def grade_answer(problem: Problem, answer: str) -> bool:
    """Grade one extracted answer (the majority vote's winner) as if it were boxed."""
    return bool(grade(problem, f"\\boxed{{{answer}}}"))


def answer_of(response: str) -> str | None:
    return extract_boxed(response)

"""Procedurally generated problems with verifiable answers; one definition serves pretraining text,
SFT traces, RL rewards and evaluation.

Answer format (DeepSeek-R1): the final answer goes in \\boxed{...}. `check` takes the LAST \\boxed{}
whose braces balance and verifies only that; a response without one is wrong. Users are prompted with
`Problem.message()`: the question plus "Please reason step by step, and put your final answer within
\\boxed{}.".
Checking never raises and is linear in the response, milliseconds for any realistic one (`Task.check`
turns any error into False). Free-form answers (MATH-500, GSM8K, JSONL sets) go through
`mathcheck.math_equal`: math-verify in a bounded worker process.

Train/test: a prompt belongs to the test split iff crc32(prompt) % 10 == 0 (`split_of`), and
`generate(seed, difficulty, split)` resamples until the prompt falls in the requested split, so held-out
prompts never appear in training whatever the seeds. `split_seed` also gives the splits disjoint seeds.
"""

from __future__ import annotations

import random
from typing import Sequence

from .arithmetic import Arithmetic
from .base import INSTRUCTION, Problem, Task, extract_boxed, split_of, split_seed
from .countdown import Countdown

TASKS: dict[str, Task] = {"arithmetic": Arithmetic(), "countdown": Countdown()}

__all__ = ["TASKS", "INSTRUCTION", "Problem", "Task", "extract_boxed", "split_of", "split_seed",
           "get_task", "problems", "check", "corpus"]


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known: {sorted(TASKS)}")
    return TASKS[name]


def problems(task: str | Task, split: str, n: int, difficulty: int = 1) -> list[Problem]:
    """The first n distinct problems of a split (distinct, so an evaluation set has no repeats)."""
    task = get_task(task) if isinstance(task, str) else task
    seen: dict[str, Problem] = {}
    for i in range(20 * n):
        p = task.generate(split_seed(split, i), difficulty, split)
        seen.setdefault(p.prompt, p)
        if len(seen) == n:
            return list(seen.values())
    raise ValueError(f"{task.name} has too few distinct {split} problems at difficulty {difficulty}")


def check(problem: Problem, response: str) -> bool:
    return get_task(problem.task).check(problem, response)


def corpus(n: int, seed: int, split: str = "train", tasks: Sequence[str] = ("arithmetic", "countdown"),
           difficulty: int | Sequence[int] = (1, 2, 3)) -> list[str]:
    """n pretraining documents "Question: <prompt>\\nAnswer: <worked solution>", tasks and
    difficulties drawn at random (deterministic in seed)."""
    rng = random.Random(seed)
    levels = [difficulty] if isinstance(difficulty, int) else list(difficulty)
    docs = []
    for _ in range(n):
        p = get_task(rng.choice(tasks)).generate(rng.getrandbits(40), rng.choice(levels), split)
        docs.append(f"Question: {p.prompt}\nAnswer: {p.solution}")
    return docs

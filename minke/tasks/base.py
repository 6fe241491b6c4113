"""Problem, answer extraction, and the train/test partition shared by every task."""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass, field

# DeepSeek-R1's evaluation prompt; tasks' prompts are the bare question, callers append this.
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
SPLIT_OFFSET = {"train": 0, "test": 1 << 40}


@dataclass
class Problem:
    task: str
    prompt: str  # the question only
    answer: str  # canonical final answer
    solution: str  # worked steps ending in \boxed{answer}
    meta: dict = field(default_factory=dict)

    def message(self) -> dict:
        """The user turn as R1 was prompted: question, then the boxed-answer instruction."""
        return {"role": "user", "content": f"{self.prompt}\n{INSTRUCTION}"}


def extract_boxed(text: str) -> str | None:
    """Contents of the last \\boxed{...} whose braces balance, or None."""
    start = text.rfind("\\boxed{")
    while start != -1:
        depth, i = 1, start + len("\\boxed{")
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return text[start + len("\\boxed{") : i - 1]
        start = text.rfind("\\boxed{", 0, start)  # truncated box: fall back to an earlier one
    return None


def split_of(prompt: str) -> str:
    """The split a prompt belongs to, by a stable hash: about 10% of all prompts are test-only."""
    return "test" if zlib.crc32(prompt.encode()) % 10 == 0 else "train"


def split_seed(split: str, index: int) -> int:
    return SPLIT_OFFSET[split] + index


class Task:
    name = "task"

    def generate(self, seed: int, difficulty: int = 1, split: str | None = "train") -> Problem:
        """Deterministic in (seed, difficulty, split). Resamples until the prompt lies in `split`,
        so a test prompt can never be generated as a train prompt (split=None: no filter)."""
        rng = random.Random(f"{self.name}/{difficulty}/{seed}")  # str seeds are hashed stably
        while True:
            p = self.sample(rng, difficulty)
            if split is None or split_of(p.prompt) == split:
                return p

    def sample(self, rng: random.Random, difficulty: int) -> Problem:
        raise NotImplementedError

    def verify(self, problem: Problem, boxed: str) -> bool:
        raise NotImplementedError

    def check(self, problem: Problem, response: str) -> bool:
        boxed = extract_boxed(response)
        return boxed is not None and self.verify(problem, boxed)

    def reward(self, problem: Problem, response: str) -> float:
        return float(self.check(problem, response))

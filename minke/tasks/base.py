"""Problem, answer extraction, and the train/test partition shared by every task."""

from __future__ import annotations

import logging
import random
import re
import zlib
from dataclasses import dataclass, field

# DeepSeek-R1's evaluation prompt; tasks' prompts are the bare question, callers append this.
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
SPLIT_OFFSET = {"train": 0, "test": 1 << 40}
log = logging.getLogger(__name__)


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


# extract_boxed works on the braces only: box openings become "\x01" (an existing "\x01" becomes "\x02",
# so lengths and positions are unchanged) and everything else is dropped in C.
_NON_BRACE = re.compile(r"[^{}\x01]+")
_BRACE = re.compile(r"[{}\x01]")
_CHUNK = 4096


def _brace_position(t: str, k: int) -> int:
    """Index in t of its k-th (from 0) character among "{", "}" and "\x01": whole chunks are counted in
    C and skipped, then at most one chunk is searched."""
    pos = 0
    while True:
        end = min(pos + _CHUNK, len(t))
        n = t.count("{", pos, end) + t.count("}", pos, end) + t.count("\x01", pos, end)
        if n > k:
            break
        k, pos = k - n, end
    for m in _BRACE.finditer(t, pos, end):
        if k == 0:
            return m.start()
        k -= 1
    raise AssertionError("unreachable: the chunk holds more than k braces")


def extract_boxed(text: str) -> str | None:
    """Contents of the last \\boxed{...} whose braces balance, or None: the rightmost opening whose brace
    is closed, so a truncated last box falls back to an earlier complete one, and in nested boxes the
    inner one counts. Only the exact spelling "\\boxed{" opens a box (R1's and the tasks' format; not
    "\\boxed {" or "\\fbox{").

    Linear time whatever the input: two passes in C (replace, strip to braces), then one Python-level
    scan from the right over the braces only, which stops at the answer's opening (about 0.1 s for a
    megabyte of nothing but braces, a few ms for 20,000 unclosed boxes). Scanning right to left, an
    opening closes iff an unmatched "}" lies to its right; it matches the nearest such one."""
    if "\\boxed{" not in text:
        return None
    t = text.replace("\x01", "\x02").replace("\\boxed{", "\\boxed\x01")
    braces = _NON_BRACE.sub("", t)
    closers = []  # indices in `braces` of the "}" right of i not yet matched, nearest last
    for i in range(len(braces) - 1, -1, -1):
        if braces[i] == "}":
            closers.append(i)
        elif closers:
            j = closers.pop()
            if braces[i] == "\x01":
                return text[_brace_position(t, i) + 1 : _brace_position(t, j)]
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
        """True iff the last balanced box of `response` verifies. The safety net for rewards and graders:
        anything a verifier cannot interpret (or a response that is not a str) counts as wrong, never
        raises; each verifier also bounds its own work, so a check takes milliseconds."""
        try:
            boxed = extract_boxed(response)
            return boxed is not None and self.verify(problem, boxed) is True
        except Exception:  # noqa: BLE001 — a reward must not crash a training step
            log.debug("%s: verify raised on %.80r", self.name, response, exc_info=True)
            return False

    def reward(self, problem: Problem, response: str) -> float:
        return float(self.check(problem, response))

"""`minke sample`: rejection sampling (R1 §2.3.3) — k completions per TRAIN-split problem, keep the
verified-correct ones, deduplicated, as SFT JSONL in OpenAI ``messages`` form.

    minke sample --model out/speedrun/grpo/final --out traces.jsonl --problems 200 --k 8

A response is kept when it (1) ended by itself (finish_reason "stop": a truncated text would teach
the student never to stop), (2) has R1's form — with a format that opens ``<think>`` (chat, r1-zero)
it closes the block with ``</think>`` and puts the boxed answer after it — (3) is graded correct, and
(4) differs in text from the problem's earlier kept responses. Each kept line is
``{"messages": [{"role": "user", "content": problem.message()["content"]},
{"role": "assistant", "content": "<think>\\n" + response}]}``, the assistant turn in R1's full form
"<think>\\n…</think>\\n\\n…\\boxed{…}", which is what ``minke sft`` trains a student on (distillation).
Responses come from the same sampler as ``minke eval`` (minke/eval/sampling.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

from ..data.prompts import think_opened
from ..eval import data
from ..eval.sampling import backend_for, sample_responses
from ..tasks import Problem, extract_boxed

END_THINK = "</think>"


def _form_ok(text: str, fmt: str) -> bool:
    if not think_opened(fmt):
        return extract_boxed(text) is not None
    _, sep, after = text.partition(END_THINK)
    return bool(sep) and extract_boxed(after) is not None


def rejection_sample(model, tok, problems: Sequence[Problem], k: int = 8, temperature: float = 0.6,
                     top_p: float = 0.95, max_tokens: int = 512, fmt: str = "chat", seed: int = 0,
                     max_batch: int = 32, progress=None) -> tuple[list[dict], dict]:
    """(kept SFT examples in messages form, counts {"total", "kept", "unfinished", "bad_format",
    "wrong", "duplicate"}); ``model`` is a Transformer, an Engine or a sampling backend."""
    backend = backend_for(model, tok, max_batch)
    sampled = sample_responses(backend, tok, problems, k, temperature, top_p, max_tokens, fmt, seed,
                               chunk=max(1, 4 * max_batch // k), progress=progress)
    opened = "<think>\n" if think_opened(fmt) else ""
    counts = dict(total=0, kept=0, unfinished=0, bad_format=0, wrong=0, duplicate=0)
    kept = []
    for p, rs in zip(problems, sampled):
        seen: set[str] = set()
        for r in rs:
            counts["total"] += 1
            if r.finish_reason != "stop":
                counts["unfinished"] += 1
            elif not _form_ok(r.text, fmt):
                counts["bad_format"] += 1
            elif not data.grade(p, r.text):
                counts["wrong"] += 1
            elif r.text in seen:
                counts["duplicate"] += 1
            else:
                seen.add(r.text)
                counts["kept"] += 1
                kept.append({"messages": [{"role": "user", "content": p.message()["content"]},
                                          {"role": "assistant", "content": opened + r.text}]})
    return kept, counts


def _parser() -> argparse.ArgumentParser:
    from ..eval.run import add_backend_args, add_problem_args

    p = argparse.ArgumentParser(prog="minke sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_backend_args(p)
    add_problem_args(p, problems_default=100)
    p.add_argument("--k", type=int, default=8, help="completions drawn per problem")
    # ---- output
    p.add_argument("--out", required=True, help="SFT JSONL of the kept traces (messages form)")
    return p


def main(argv: list[str] | None = None) -> int:
    from ..eval.run import open_backend, select_problems

    a = _parser().parse_args(argv)
    if a.k < 1:
        raise SystemExit(f"minke: --k must be >= 1, got {a.k}")
    problems = select_problems(a, "train")
    backend, tok = open_backend(a)
    t0 = time.perf_counter()

    def progress(done, total):
        print(f"sample: {done}/{total} problems ({time.perf_counter() - t0:.1f}s)", file=sys.stderr)

    try:
        kept, c = rejection_sample(backend, tok, problems, k=a.k, temperature=a.temperature, top_p=a.top_p,
                                   max_tokens=a.max_tokens, fmt=a.format, seed=a.seed, max_batch=a.batch,
                                   progress=progress)
    except RuntimeError as e:  # a server that failed a request
        raise SystemExit(f"minke: {e}") from None
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for ex in kept:
            f.write(json.dumps(ex, ensure_ascii=False) + "\n")
    print(f"kept {c['kept']}/{c['total']} completions of {len(problems)} problems "
          f"(wrong {c['wrong']}, unfinished {c['unfinished']}, bad format {c['bad_format']}, "
          f"duplicate {c['duplicate']}) -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

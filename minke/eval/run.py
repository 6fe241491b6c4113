"""`minke eval`: pass@1 over k samples, unbiased pass@k, cons@k and greedy accuracy of a checkpoint (or
of any OpenAI-compatible server) on held-out built-in problems by difficulty and on JSONL sets.

    minke eval --model out/speedrun/grpo/final --problems 50 --k 4 --greedy --out eval.json
    minke eval --model ckpt --data math500.jsonl gsm8k_test.jsonl --max-tokens 2048
    minke serve --model ckpt --port 8000 &  minke eval --model ckpt --base-url http://127.0.0.1:8000
    minke eval --task passkey --model ckpt --context 2048 --depths 0 25 50 75 100   (see passkey.py)

Defaults follow R1's protocol: temperature 0.6, top-p 0.95, k samples per problem, pass@1 = mean
correctness. Built-in problems come from the test split (never seen in training). Responses are
graded by the task's checker (built-in) or by math-verify on the last \\boxed{} (JSONL); a gold answer
math-verify cannot parse is counted in "unparsed" and scored wrong. With --base-url the model is the
server's and --model names the directory whose tokenizer renders the prompts (see sampling.py).
Output: one table row per (task, difficulty) and an overall row; --out writes the same as JSON.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from ..data.prompts import FORMATS
from ..tasks import TASKS, Problem
from . import data, metrics
from .sampling import OpenAIBackend, backend_for, sample_responses
from .report import save_json

def evaluate(model, tok, problems: Sequence[Problem], k: int = 4, temperature: float = 0.6, top_p: float = 0.95,
             max_tokens: int = 512, fmt: str = "chat", seed: int = 0, greedy: bool = False,
             max_batch: int = 32, progress=None, keep_samples: bool = False) -> dict:
    """Evaluate ``model`` (a Transformer, an Engine, or a backend such as OpenAIBackend) on problems.

    Returns {"config": …, "rows": [{"task", "difficulty", "n", "pass@1", "pass@k", "cons@k", "greedy",
    "unparsed", "no_answer", "truncated", "mean_tokens", "samples"}…], "overall": {…same…}}; rates
    are fractions in [0, 1]; "greedy" is None without ``greedy``. Rows are keyed by (problem.task,
    problem.meta["difficulty"]), in first-seen order. ``keep_samples`` adds every response."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown prompt format {fmt!r}; known: {', '.join(FORMATS)}")
    if not problems:
        raise ValueError("no problems to evaluate")
    backend = backend_for(model, tok, max_batch)
    chunk = max(1, 4 * max_batch // k)  # a few batches' worth per progress line
    t0 = time.perf_counter()
    sampled = sample_responses(backend, tok, problems, k, temperature, top_p, max_tokens, fmt, seed,
                               chunk=chunk, progress=progress)
    greedy_out = (sample_responses(backend, tok, problems, 1, 0.0, 1.0, max_tokens, fmt, seed, chunk=4 * max_batch)
                  if greedy else None)
    elapsed = time.perf_counter() - t0

    per = []  # per problem: dict of its figures
    for i, (p, rs) in enumerate(zip(problems, sampled)):
        grades = [data.grade(p, r.text) for r in rs]
        answers = [data.answer_of(r.text) for r in rs]
        g = data.grade(p, greedy_out[i][0].text) if greedy_out else None
        rec = {"correct": [bool(x) for x in grades],
               "cons": metrics.cons_at_k(answers, lambda a, p=p: data.grade_answer(p, a)),
               "greedy": bool(g) if greedy_out else None,
               "unparsed": sum(x is None for x in grades) + (greedy_out is not None and g is None),
               "no_answer": sum(a is None for a in answers),
               "truncated": sum(r.finish_reason == "length" for r in rs),
               "tokens": [r.tokens for r in rs if r.tokens is not None]}
        if keep_samples:
            rec["samples"] = [{"text": r.text, "finish_reason": r.finish_reason, "correct": x}
                              for r, x in zip(rs, grades)]
            if greedy_out:
                rec["greedy_text"] = greedy_out[i][0].text
        per.append(rec)

    def row(idx: list[int]) -> dict:
        toks = [t for i in idx for t in per[i]["tokens"]]
        return {"n": len(idx), "samples": sum(len(per[i]["correct"]) for i in idx),
                "pass@1": metrics.pass1([per[i]["correct"] for i in idx]),
                "pass@k": metrics.mean_pass_at_k([per[i]["correct"] for i in idx], k),
                "cons@k": sum(per[i]["cons"] for i in idx) / len(idx),
                "greedy": metrics.greedy_accuracy([per[i]["greedy"] for i in idx]) if greedy else None,
                "unparsed": sum(per[i]["unparsed"] for i in idx),
                "no_answer": sum(per[i]["no_answer"] for i in idx),
                "truncated": sum(per[i]["truncated"] for i in idx),
                "mean_tokens": sum(toks) / len(toks) if toks else None}

    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, p in enumerate(problems):
        groups[(p.task, p.meta.get("difficulty"))].append(i)
    rows = [{"task": t, "difficulty": d, **row(idx)} for (t, d), idx in groups.items()]
    out = {"config": {"k": k, "temperature": temperature, "top_p": top_p, "max_tokens": max_tokens,
                      "format": fmt, "seed": seed, "greedy": greedy, "problems": len(problems),
                      "seconds": round(elapsed, 2)},
           "rows": rows, "overall": {"task": "overall", "difficulty": None, **row(list(range(len(problems))))}}
    if keep_samples:
        out["samples"] = [{"task": p.task, "difficulty": p.meta.get("difficulty"), "prompt": p.prompt,
                           "answer": p.answer, **{k_: v for k_, v in rec.items() if k_ in ("samples", "greedy_text")}}
                          for p, rec in zip(problems, per)]
    return out


def format_table(result: dict) -> str:
    """The readable table: one line per (task, difficulty), then overall; rates in percent."""
    k = result["config"]["k"]
    head = ["task", "diff", "n", "pass@1", f"pass@{k}", f"cons@{k}", "greedy", "unparsed", "no-box", "trunc", "tokens"]

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}"

    def fmt(cells):  # task and difficulty left-aligned, numbers right-aligned
        return "  ".join(c.ljust(w) if j < 2 else c.rjust(w) for j, (c, w) in enumerate(zip(cells, widths)))

    lines = [[str(r["task"]), "-" if r["difficulty"] is None else str(r["difficulty"]), str(r["n"]),
              pct(r["pass@1"]), pct(r["pass@k"]), pct(r["cons@k"]), pct(r["greedy"]),
              str(r["unparsed"]), str(r["no_answer"]), str(r["truncated"]),
              "-" if r["mean_tokens"] is None else f"{r['mean_tokens']:.0f}"]
             for r in result["rows"] + [result["overall"]]]
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    c = result["config"]
    title = (f"k={k} temperature={c['temperature']} top_p={c['top_p']} max_tokens={c['max_tokens']} "
             f"format={c['format']} seed={c['seed']} ({c['problems']} problems, {c['seconds']:.1f}s)")
    return "\n".join([title, fmt(head), *map(fmt, lines[:-1]), "-" * len(fmt(head)), fmt(lines[-1])])


# ---- CLI ------------------------------------------------------------------------------------------
def add_backend_args(p: argparse.ArgumentParser) -> None:
    from ..inference.generate import add_model_args

    add_model_args(p)
    # ---- server (instead of loading the weights)
    p.add_argument("--base-url", default=None,
                   help="evaluate an OpenAI-compatible server (its /v1/completions); --model then only "
                        "supplies the tokenizer that renders the prompts")
    p.add_argument("--api-model", default=None, help="model name sent to the server (default: its first model)")
    p.add_argument("--api-key", default=None, help="bearer token for the server")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight to the server")
    p.add_argument("--batch", type=int, default=64,
                   help="engine batch rows (in-process; more rows, fewer decode steps)")


def add_problem_args(p: argparse.ArgumentParser, problems_default: int) -> None:
    # ---- problems
    p.add_argument("--tasks", nargs="*", default=None, choices=sorted(TASKS),
                   help="built-in tasks (default: all of them, or none when --data is given)")
    p.add_argument("--difficulties", nargs="+", type=int, default=[1, 2, 3], help="built-in difficulty levels")
    p.add_argument("--problems", type=int, default=problems_default, help="problems per task and difficulty")
    p.add_argument("--data", nargs="*", default=[], metavar="FILE.jsonl",
                   help="JSONL sets: MATH-500/AIME layout (problem, answer) or GSM8K (question, answer '#### N')")
    # ---- sampling
    p.add_argument("--temperature", type=float, default=0.6, help="sampling temperature (R1 reports 0.6)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus mass (R1 reports 0.95)")
    p.add_argument("--max-tokens", type=int, default=512, help="new tokens per response at most")
    p.add_argument("--format", default="chat", choices=FORMATS,
                   help="prompt format: chat template, R1-Zero's template, or the pretraining corpus's")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (problem i, sample j: seed + i*k + j)")


def open_backend(a: argparse.Namespace):
    """(backend, tokenizer) for the flags: a server when --base-url, else the checkpoint in-process."""
    if a.base_url:
        from ..data.tokenizer import Tokenizer

        path = Path(a.model)
        if not (path / "tokenizer.json").exists():
            raise SystemExit(f"minke: {path}/tokenizer.json not found (--model must hold the tokenizer "
                             f"that renders the server's prompts)")
        tok = Tokenizer.load(path)
        try:
            return OpenAIBackend(a.base_url, tok, a.api_model, a.api_key, a.concurrency), tok
        except RuntimeError as e:
            raise SystemExit(f"minke: {e}") from None
    from ..inference.generate import open_model

    engine, tok, _ = open_model(a, max_batch=a.batch)
    return backend_for(engine, tok), tok


def select_problems(a: argparse.Namespace, split: str) -> list[Problem]:
    """Built-in problems of ``split`` and the --data sets; errors exit naming the file and line."""
    if a.problems < 1:
        raise SystemExit(f"minke: --problems must be >= 1, got {a.problems}")
    tasks = a.tasks if a.tasks is not None else ([] if a.data else sorted(TASKS))
    try:
        probs = data.builtin(tasks, a.difficulties, a.problems, split)
        for f in a.data:
            probs += data.read_jsonl(f)
    except ValueError as e:
        raise SystemExit(f"minke: {e}") from None
    if not probs:
        raise SystemExit("minke: no problems: give --tasks and/or --data")
    return probs


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minke eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=["passkey"],
                   help="passkey retrieval at --context N instead (minke eval --task passkey --help)")
    add_backend_args(p)
    add_problem_args(p, problems_default=20)
    # ---- metrics
    p.add_argument("--k", type=int, default=4, help="samples per problem (pass@1 over k, pass@k, cons@k)")
    p.add_argument("--greedy", action="store_true", help="also one greedy response per problem")
    # ---- output
    p.add_argument("--out", default=None, help="write the JSON summary here")
    p.add_argument("--samples", action="store_true", help="include every response in the JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--task")
    known, rest = pre.parse_known_args(argv)
    if known.task == "passkey":
        from . import passkey

        return passkey.main(rest)
    a = _parser().parse_args(argv)
    if a.k < 1:
        raise SystemExit(f"minke: --k must be >= 1, got {a.k}")
    if a.max_tokens < 1:
        raise SystemExit(f"minke: --max-tokens must be >= 1, got {a.max_tokens}")
    problems = select_problems(a, "test")
    backend, tok = open_backend(a)
    t0 = time.perf_counter()

    def progress(done, total):
        print(f"eval: {done}/{total} problems sampled ({time.perf_counter() - t0:.1f}s)", file=sys.stderr)

    try:
        result = evaluate(backend, tok, problems, k=a.k, temperature=a.temperature, top_p=a.top_p,
                          max_tokens=a.max_tokens, fmt=a.format, seed=a.seed, greedy=a.greedy, max_batch=a.batch,
                          progress=progress, keep_samples=a.samples)
    except RuntimeError as e:  # a server that failed a request: its URL, status and message
        raise SystemExit(f"minke: {e}") from None
    result["config"]["model"] = backend.model if a.base_url else str(a.model)
    print(format_table(result))
    if a.out:
        print(f"wrote {save_json(result, a.out)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

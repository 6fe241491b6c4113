"""Prompt formats and R1-style responses: how a task problem becomes model input and a training target.

One place for the three formats every stage shares (SFT data, GRPO rollouts, rejection sampling,
evaluation), so a model is always prompted the way it was trained:

- ``chat``: the tokenizer's chat template (DeepSeek-R1's) over the user turn ``Problem.message()``
  (question + R1's boxed-answer instruction), with the generation prompt ``<｜Assistant｜><think>\\n``.
  The model continues inside the reasoning block: "…steps…\\n</think>\\n\\n…\\boxed{answer}" + eos.
- ``r1-zero``: DeepSeek-R1-Zero's plain-text template (R1 report, Table 1) over a base model, no chat
  tokens; the reasoning block is opened for the model as in ``chat`` (final answer boxed, as our
  checkers read it, instead of R1-Zero's <answer> tags).
- ``base``: the pretraining corpus's own format, "Question: …\\nAnswer:", for evaluating a pretrained
  checkpoint on the same problems.

``think_opened(fmt)`` says whether the prompt already opened ``<think>`` (so the response's format
is "reasoning </think> answer").
"""

from __future__ import annotations

from ..tasks import Problem

FORMATS = ("chat", "r1-zero", "base")

R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The User asks a question, and the Assistant solves it. "
    "The Assistant first thinks about the reasoning process in the mind and then provides the User with "
    "the answer. The reasoning process is enclosed within <think> </think> tags and the final answer is "
    "written within \\boxed{{}} after it, i.e., <think> reasoning process here </think> answer here "
    "\\boxed{{answer}}.\nUser: {prompt}\nAssistant: <think>\n"
)


def think_opened(fmt: str) -> bool:
    return fmt in ("chat", "r1-zero")


def prompt_text(tok, problem: Problem | str, fmt: str = "chat") -> str:
    """The prompt as text (bos included: the chat template writes it; the others get it as an id)."""
    prompt = problem.prompt if isinstance(problem, Problem) else problem
    if fmt == "chat":
        message = problem.message() if isinstance(problem, Problem) else {"role": "user", "content": prompt}
        return tok.apply_chat_template([message], add_generation_prompt=True)
    if fmt == "r1-zero":
        return R1_ZERO_TEMPLATE.format(prompt=prompt)
    if fmt == "base":
        return f"Question: {prompt}\nAnswer:"
    raise ValueError(f"unknown prompt format {fmt!r}; known: {', '.join(FORMATS)}")


def prompt_ids(tok, problem: Problem | str, fmt: str = "chat") -> list[int]:
    ids = tok.encode(prompt_text(tok, problem, fmt))
    if fmt != "chat" and tok.bos_id is not None:
        ids = [tok.bos_id] + ids
    return ids


def r1_response(problem: Problem, solution: str | None = None) -> str:
    """A cold-start target in R1's output form (what follows the generation prompt's "<think>\\n"): the
    worked steps of ``solution`` (default: the task's) as the reasoning, then its last line, the boxed
    answer, after ``</think>``. A solution of one line (no steps) reasons "The answer is …."."""
    *lines, last = (problem.solution if solution is None else solution).split("\n")
    reasoning = "\n".join(lines) if lines else f"The answer is {problem.answer}."
    return f"{reasoning}\n</think>\n\n{last}"


def completion_text(tok, token_ids: list[int], finish_reason: str | None = None) -> str:
    """A completion's text without its final stop token (special tokens other than the stop kept out)."""
    ids = token_ids[:-1] if finish_reason == "stop" and token_ids else token_ids
    return tok.decode(ids, skip_special_tokens=True)

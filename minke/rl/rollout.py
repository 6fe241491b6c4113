"""Rollouts: G sampled responses per prompt through the one engine, and the tensors GRPO trains on.

The engine prefills each prompt once and forks it into the G samples (its ``generate(..., n=G)``: the
group shares the prompt's cache blocks copy-on-write), so a group costs one prefill.

``batch_tensors`` lays a rollout out for the training forward: row i = prompt + completion i, inputs
``seq[:-1]``, targets ``seq[1:]``, right-padded; ``mask`` marks the targets that are completion tokens
(the stop token included: the policy chose to stop), the only ones the loss sees.

Shape legend: N prompts, G samples per prompt, B = N·G rows (row n·G + g is sample g of prompt n),
T the longest prompt + completion − 1.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Sequence

import torch

from ..data.prompts import completion_text, prompt_ids
from ..inference.sampling import SamplingParams
from ..tasks import Problem


@dataclass
class Rollout:
    problems: list[Problem]  # N
    prompts: list[list[int]]  # N prompt token ids
    completions: list[list[int]]  # B generated ids (a stop token, when one ended it, is the last)
    finish: list[str]  # B finish reasons ("stop" | "length")
    texts: list[str]  # B completion texts (stop token left out)
    seconds: float  # wall time of the generation

    @property
    def group_size(self) -> int:
        return len(self.completions) // max(1, len(self.prompts))

    @property
    def tokens(self) -> int:
        return sum(map(len, self.completions))


def rollout(engine, tok, problems: Sequence[Problem], group_size: int, params: SamplingParams,
            fmt: str = "chat", index: Sequence[int] | None = None) -> Rollout:
    """``group_size`` samples per problem; ``params.seed`` seeds the batch: problem i (``index[i]``,
    default i: its place in the whole batch, so a rank's share samples what one process would) gets
    seed + index·G, its sample j seed + index·G + j (the engine's n-sampling contract)."""
    prompts = [prompt_ids(tok, p, fmt) for p in problems]
    seed = params.seed
    index = range(len(prompts)) if index is None else index
    per = [replace(params, seed=None if seed is None else (seed + i * group_size) % 2**63) for i in index]
    t0 = time.perf_counter()
    done = engine.generate(prompts, per, n=group_size)
    seconds = time.perf_counter() - t0
    return Rollout(list(problems), prompts, [c.token_ids for c in done], [c.finish_reason for c in done],
                   [completion_text(tok, c.token_ids, c.finish_reason) for c in done], seconds)


def batch_tensors(r: Rollout, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """→ inputs (B, T), targets (B, T), mask (B, T) bool (completion targets)."""
    G = r.group_size
    seqs = [r.prompts[i // G] + c for i, c in enumerate(r.completions)]
    T = max(map(len, seqs)) - 1
    B = len(seqs)
    inputs = torch.full((B, T), pad_id, dtype=torch.long)
    targets = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for i, s in enumerate(seqs):
        P, L = len(r.prompts[i // G]), len(s)
        inputs[i, :L - 1] = torch.tensor(s[:-1])
        targets[i, :L - 1] = torch.tensor(s[1:])
        mask[i, P - 1:L - 1] = True  # targets P..L-1 are the completion's tokens
    return inputs, targets, mask

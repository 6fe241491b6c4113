"""AdamW and the learning-rate schedule of DeepSeek-V3's pretraining (V3 §4.2).

V3: AdamW β = (0.9, 0.95), weight decay 0.1, gradient clipping at 1.0; the LR rises linearly over the
first 2K steps, stays constant (to 10T of 14.8T tokens, ≈ 68% of training), then follows a cosine
down to 10% of the peak (2.2e-4 → 2.2e-5). Weight decay applies to matrices (linear weights, the
stacked experts, the embedding), not to vectors (norm weights, biases); the routing bias is a buffer
moved by its own rule and never reaches the optimizer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():  # shared (tied) parameters are yielded once
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1,
                    betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW with torch's fused kernel (one pass over each parameter instead of a chain of foreach
    ops: 4x faster on CPU) where every parameter is a plain CPU/CUDA tensor; FSDP2's DTensors get the
    foreach implementation."""
    from torch.distributed.tensor import DTensor

    params = list(model.parameters())
    fused = all(not isinstance(p, DTensor) and p.device.type in ("cpu", "cuda") for p in params)
    opt = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, fused=fused)
    if fused:  # torch's fused kernel writes the parameters without bumping their version counters, which
        # the caches of weight-derived tensors read to see a change (MLA's absorbed halves, packed decode
        # weights, the engine's prefix cache; GRPO decodes with the model it trains): bump them per step
        opt.register_step_post_hook(lambda o, args, kwargs: torch.autograd.graph.increment_version(
            [p for g in o.param_groups for p in g["params"]]))
    return opt


@dataclass
class Schedule:
    """LR multiplier of step s (0-based): linear warmup, constant, cosine to ``min_ratio`` at the end.

    A callable object rather than a closure, so LambdaLR's state_dict carries it into checkpoints."""

    total: int
    warmup: int
    decay_start: int  # first step of the cosine; == total means no decay
    min_ratio: float = 0.1

    def __call__(self, s: int) -> float:
        if s < self.warmup:
            return (s + 1) / self.warmup
        if s < self.decay_start:
            return 1.0
        t = min(1.0, (s - self.decay_start) / max(1, self.total - 1 - self.decay_start))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def build_scheduler(opt: torch.optim.Optimizer, total: int, warmup: int, decay_from: float,
                    min_ratio: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """``decay_from``: the fraction of training after which the cosine starts (V3 ≈ 0.68)."""
    warmup = max(1, min(warmup, total))
    decay_start = max(warmup, int(decay_from * total))
    return torch.optim.lr_scheduler.LambdaLR(opt, Schedule(total, warmup, decay_start, min_ratio))

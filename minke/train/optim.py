"""AdamW and the learning-rate schedule of DeepSeek-V3's pretraining (V3 §4.2).

V3: AdamW β = (0.9, 0.95), weight decay 0.1, gradient clipping at 1.0; the LR rises linearly over the
first 2K steps, stays constant (to 10T of 14.8T tokens, ≈ 68% of training), then follows a cosine
down to 10% of the peak (2.2e-4 → 2.2e-5). Weight decay applies to matrices (linear weights, the
stacked experts, the embedding), not to vectors (norm weights, biases); the routing bias is a buffer
moved by its own rule and never reaches the optimizer.

V3 §3.3 keeps AdamW's moments in BF16 (master weights and gradients FP32): ``bf16_moments=True``
(``AdamWBF16Moments``) halves the optimizer state, 4 bytes per parameter instead of 8.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.adam import adam


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():  # shared (tied) parameters are yielded once
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class AdamWBF16Moments(torch.optim.AdamW):
    """AdamW whose exp_avg and exp_avg_sq are stored in BF16 (DeepSeek-V3 §3.3); the parameters (the FP32
    master weights) and their gradients stay as they are.

    A step widens the moments of a chunk of parameters (≤ ``chunk`` elements) to FP32, runs torch's own
    AdamW on them (its fused kernel, or foreach for FSDP2's DTensors: the arithmetic of the default
    optimizer) and rounds them back to BF16, to nearest: deterministic, so a resumed run repeats the
    uninterrupted one. The state dict holds the BF16 moments; ``load_state_dict`` (which casts state to the
    parameters' dtype) puts them back in BF16, exactly.

    BF16 keeps 8 significant bits, so a relative change below half an ulp (2⁻⁹…2⁻⁸) of a moment is lost.
    A moment's decay by β must stay visible: 1 − β ≥ 2⁻⁸ (V3's β = (0.9, 0.95) are; the common β₂ = 0.999
    is not, and with it v could stop shrinking), else ValueError."""

    # elements whose FP32 moments exist at once (2 × 4 MiB; a larger tensor alone): small enough that the
    # allocator reuses that memory from chunk to chunk instead of faulting in fresh pages for every moment
    chunk = 1 << 20

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, amsgrad: bool = False, **kw):
        for i, b in enumerate(betas, start=1):
            if 1 - b < 2 ** -8:
                raise ValueError(f"BF16 AdamW moments with beta{i} {b}: a moment's decay by 1 - beta{i} = {1 - b:.2g} "
                                 "is below half a BF16 ulp (2^-9 to 2^-8 of the value) for some values, which would "
                                 f"then never shrink; use beta{i} <= 0.996 or FP32 moments")
        if amsgrad:
            raise ValueError("BF16 AdamW moments: amsgrad is not supported")
        super().__init__(params, lr, betas, eps, weight_decay, **kw)
        self.register_load_state_dict_post_hook(_moments_to_bf16)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for chunk in _chunks(params, self.chunk):
                m, v, steps = [], [], []
                for p in chunk:
                    state = self.state[p]
                    if not state:  # torch's step placement: on the device for the fused kernel, else CPU
                        on_device = group["fused"] or group["capturable"]
                        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu")
                        state["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16)
                        state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.bfloat16)
                    m.append(state["exp_avg"].float())
                    v.append(state["exp_avg_sq"].float())
                    steps.append(state["step"])
                beta1, beta2 = group["betas"]
                adam(
                    chunk, [p.grad for p in chunk], m, v, [], steps, foreach=group["foreach"],
                    capturable=group["capturable"], differentiable=False, fused=group["fused"],
                    decoupled_weight_decay=True, amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
                    weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"])
                for p, m32, v32 in zip(chunk, m, v):
                    self.state[p]["exp_avg"].copy_(m32)
                    self.state[p]["exp_avg_sq"].copy_(v32)
        return loss


def _chunks(params: list[torch.Tensor], limit: int):
    """Consecutive runs of ``params`` of at most ``limit`` (local) elements; a larger tensor alone."""
    run, n = [], 0
    for p in params:
        k = (p.to_local() if hasattr(p, "to_local") else p).numel()
        if run and n + k > limit:
            yield run
            run, n = [], 0
        run.append(p)
        n += k
    if run:
        yield run


def _moments_to_bf16(opt: torch.optim.Optimizer) -> None:
    for state in opt.state.values():
        for k in ("exp_avg", "exp_avg_sq"):
            if k in state:
                state[k] = state[k].to(torch.bfloat16)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's state tensors (this rank's shards of DTensors)."""
    return sum((t.to_local() if hasattr(t, "to_local") else t).nbytes
               for state in opt.state.values() for t in state.values() if isinstance(t, torch.Tensor))


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1,
                    betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                    bf16_moments: bool = False) -> torch.optim.AdamW:
    """AdamW with torch's fused kernel (one pass over each parameter instead of a chain of foreach
    ops: 4x faster on CPU) where every parameter is a plain CPU/CUDA tensor; FSDP2's DTensors get the
    foreach implementation. ``bf16_moments``: ``AdamWBF16Moments``, the same kernels on BF16-stored moments."""
    from torch.distributed.tensor import DTensor

    params = list(model.parameters())
    fused = all(not isinstance(p, DTensor) and p.device.type in ("cpu", "cuda") for p in params)
    cls = AdamWBF16Moments if bf16_moments else torch.optim.AdamW
    opt = cls(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, fused=fused)
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

"""GRPO's math as small pure functions (DeepSeekMath §4.1, DeepSeek-R1; DAPO; Dr. GRPO).

The choices, with the names TRL and verl use for them:

- Advantage: group-relative. For each prompt, G sampled responses with rewards r (N, G);
  A = (r - mean(r)) / (std(r) + eps), std UNBIASED (torch.std, as TRL), eps = 1e-4 (TRL's). With
  `scale_by_std=False`, A = r - mean(r) (Dr. GRPO: the std division up-weights nearly-solved and
  nearly-failed groups). A group whose rewards are all equal carries no signal: its advantage is exactly
  0 (forced, not left to floating point), and `informative_groups` finds the others for DAPO's dynamic
  sampling. Every token of response i gets A_i (outcome supervision).
- Policy term per token: -min(ρ·A, clip(ρ, 1-ε_low, 1+ε_high)·A), ρ = π_θ/π_old = exp(logp - old_logp).
  ε_low = ε_high = 0.2 is PPO/GRPO; ε_high = 0.28 is DAPO's clip-higher (room for unlikely tokens to
  grow). old_logp must come from the training model's forward, as logp does (not from the sampler),
  so ρ = 1 exactly on the first inner step; `old_logp=None` means "this is that step".
- KL to a frozen reference, weight β, with the k3 estimator (Schulman): exp(ref - logp) - (ref - logp) - 1,
  unbiased for KL(π_θ‖π_ref) on tokens sampled from π_θ, and ≥ 0 token by token. Added to the per-token
  loss (not to the reward). β = 0 (TRL's default, and DAPO/Dr. GRPO's) needs no reference model.
- Aggregation of the per-token loss L (B, T) under the completion mask M:
    "grpo"    Σ_i (Σ_t L·M / Σ_t M)_i / B        mean over each sequence's tokens, then over sequences
    "dapo"    Σ L·M / Σ M                         token-level mean over the batch
    "dr_grpo" Σ L·M / (B · max_len)               a constant normaliser: no length bias
  A trainer splitting one batch into micro-batches passes the whole batch's `total_seqs` (B) and
  `total_tokens` (Σ M); the micro-batch losses then sum to the whole batch's loss, and so do the gradients.

Shapes: N prompts, G samples per prompt, B = N·G sequences (row n·G + g is sample g of prompt n, so
`group_advantages(r).flatten()` lines up with the batch), T completion positions, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

AGGREGATIONS = ("grpo", "dapo", "dr_grpo")

# Rows of (rows, V) logits upcast to fp32 at a time: bounds the extra memory to ~256 MB whatever B·T is.
_CHUNK_ELEMENTS = 1 << 26


def _rewards(rewards) -> torch.Tensor:
    r = torch.as_tensor(rewards)
    if not r.is_floating_point():
        r = r.float()
    if r.dim() != 2:
        raise ValueError(f"rewards must be (N prompts, G samples), got shape {tuple(r.shape)}")
    return r


def informative_groups(rewards) -> torch.Tensor:
    """(N, G) → bool (N,): groups whose rewards are not all equal (the only ones with a gradient)."""
    r = _rewards(rewards)
    return (r != r[:, :1]).any(dim=1)


def group_advantages(rewards, scale_by_std: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """(N, G) rewards → (N, G) advantages, (r - mean) / (std + eps) within each group (std unbiased,
    as TRL), or r - mean with scale_by_std=False (Dr. GRPO). All-equal groups get exactly 0."""
    r = _rewards(rewards)
    if r.shape[1] < 2:
        raise ValueError(f"group size must be at least 2 to compare samples, got G={r.shape[1]}")
    adv = r - r.mean(dim=1, keepdim=True)
    if scale_by_std:
        adv = adv / (r.std(dim=1, keepdim=True) + eps)
    return torch.where(informative_groups(r)[:, None], adv, torch.zeros_like(adv))


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(π_θ‖π_ref): π_ref/π_θ - log(π_ref/π_θ) - 1 (≥ 0, 0 if equal)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def _row_chunks(logits: torch.Tensor):
    flat = logits.reshape(-1, logits.shape[-1])  # (B·T, V)
    step = max(1, _CHUNK_ELEMENTS // max(1, flat.shape[1]))
    return flat.split(step)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log π(target) per position, fp32: logits (B, T, V), targets (B, T) → (B, T). logits[:, t] must be
    the prediction of targets[:, t] (shift before calling). `temperature` is the sampler's, so the
    log-probs are those of the distribution the samples came from. Target -100 (ignore) gives 0.
    The fp32 upcast goes a chunk of rows at a time: under no_grad (old-policy and reference log-probs)
    the extra memory is one chunk, not a whole fp32 copy of (B, T, V); with grad, autograd still keeps
    each chunk's fp32 softmax for the backward."""
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} "
                         "disagree on (B, T)")
    if targets.numel() == 0:
        return torch.zeros(targets.shape, device=logits.device)
    chunks = _row_chunks(logits)
    out = [-F.cross_entropy(c.float() / temperature, t, reduction="none", ignore_index=-100)
           for c, t in zip(chunks, targets.reshape(-1).split(chunks[0].shape[0]))]
    return torch.cat(out).view(targets.shape)


def entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of each position's distribution (nats, fp32): logits (B, T, V) → (B, T), chunked like
    token_logprobs."""
    out = []
    for c in _row_chunks(logits):
        logp = torch.log_softmax(c.float() / temperature, dim=-1)
        out.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(out).view(logits.shape[:-1])


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    beta: float = 0.0,
    ref_logp: torch.Tensor | None = None,
    agg: str = "grpo",
    max_len: int | None = None,
    total_tokens: int | float | torch.Tensor | None = None,
    total_seqs: int | None = None,
    entropies: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped GRPO objective (module docstring) as a loss to minimise.

    logp (B, T) with grad; old_logp (B, T) or None (= logp.detach(): ratio 1); advantages (B,) (or
    (B, T) per token); mask (B, T), True/1 on completion tokens; ref_logp (B, T), needed when β ≠ 0;
    entropies (B, T) only for the stats. total_tokens / total_seqs: the whole batch's normalisers when this
    is one micro-batch of it (default: this batch's own).

    Stats (floats, means over masked tokens of this batch): clip_low (ρ < 1-ε_low where A < 0),
    clip_high (ρ > 1+ε_high where A > 0), clip (either; TRL's "region" fraction: the tokens whose gradient
    the clip removes), ratio, kl (when ref_logp is given), entropy (when given), and tokens (the count,
    for weighting stats across micro-batches).
    """
    if agg not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {agg!r}; choose one of {AGGREGATIONS}")
    if beta != 0.0 and ref_logp is None:
        raise ValueError(f"beta={beta} needs ref_logp (the frozen reference's log-probs); "
                         "beta=0 needs none")
    if agg == "dr_grpo" and not max_len:
        raise ValueError("agg='dr_grpo' needs max_len, its constant normaliser (the max completion length)")
    if eps_low < 0 or eps_high < 0 or eps_low >= 1:
        raise ValueError(f"need 0 <= eps_low < 1 and eps_high >= 0, got eps_low={eps_low}, "
                         f"eps_high={eps_high}")
    B, T = logp.shape
    for name, t in (("old_logp", old_logp), ("mask", mask), ("ref_logp", ref_logp), ("entropies", entropies)):
        if t is not None and t.shape != logp.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, logp has {tuple(logp.shape)}")
    adv = torch.as_tensor(advantages, device=logp.device, dtype=torch.float32)
    if adv.shape in ((B,), (B, 1)):
        adv = adv.reshape(B, 1)
    elif adv.shape != (B, T):
        raise ValueError(f"advantages must be (B,) or (B, T) = ({B},) or ({B}, {T}), got {tuple(adv.shape)}")

    m = mask.bool()
    zero = torch.zeros((), device=logp.device)
    # Zero the padding BEFORE any exp: garbage there (inf, NaN) would otherwise leak NaN into the gradient
    # through the masked multiply (0 · inf).
    logp = torch.where(m, logp.float(), zero)
    old = logp.detach() if old_logp is None else torch.where(m, old_logp.detach().float(), zero)
    ratio = torch.exp(logp - old)  # (B, T)
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high)
    per_token = -torch.minimum(ratio * adv, clipped * adv)
    kl = None
    if ref_logp is not None:
        kl = kl_k3(logp, torch.where(m, ref_logp.detach().float(), zero))
        if beta != 0.0:
            per_token = per_token + beta * kl
    per_token = torch.where(m, per_token, zero)

    n_tok = m.sum()
    seqs = B if total_seqs is None else total_seqs
    if agg == "grpo":
        loss = (per_token.sum(-1) / m.sum(-1).clamp(min=1)).sum() / seqs
    elif agg == "dapo":
        denom = n_tok if total_tokens is None else torch.as_tensor(total_tokens, device=logp.device)
        loss = per_token.sum() / denom.clamp(min=1)
    else:
        loss = per_token.sum() / (seqs * max_len)

    with torch.no_grad():
        low = (ratio < 1 - eps_low) & (adv < 0) & m
        high = (ratio > 1 + eps_high) & (adv > 0) & m
        names = ["clip_low", "clip_high", "clip", "ratio"]
        sums = [low.sum(), high.sum(), (low | high).sum(), torch.where(m, ratio, zero).sum()]
        if kl is not None:
            names.append("kl")
            sums.append(torch.where(m, kl, zero).sum())
        if entropies is not None:
            names.append("entropy")
            sums.append(torch.where(m, entropies.float(), zero).sum())
        values = torch.stack([s.float() for s in sums]) / n_tok.clamp(min=1)
        values = torch.cat([values, n_tok.float()[None]]).tolist()  # one device sync for all stats
    stats = dict(zip(names + ["tokens"], values))
    stats["tokens"] = int(stats["tokens"])
    return loss, stats

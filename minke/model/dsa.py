"""DeepSeek Sparse Attention (DeepSeek-V3.2 §2.1): the lightning indexer and its top-k token selection.

The indexer scores every (query t, key s) pair cheaply, then MLA attends only to the index_topk keys
with the highest score among those t may see (mla.py; the gather-attend itself is in kernels/attention.py):

    I(t, s) = Σ_j w_{t,j} · ReLU(q_{t,j} · k_s)

- q_{t,j}: index_n_heads small heads of index_head_dim from MLA's query latent (q_a_layernorm's output);
- k_s: one key per token shared by all heads, wk on the hidden state, then LayerNorm;
- both carry RoPE on their first qk_rope_head_dim dims, in the half-split layout (x[:R/2], x[R/2:]), not
  MLA's interleaved pairs (DeepSeek's 2025-11 fix of its V3.2 demo code; transformers does the same);
- w_{t,j} = weights_proj(x_t), scaled by index_n_heads^-0.5 and the dot products by index_head_dim^-0.5.

DeepSeek computes I in FP8 after a Hadamard rotation of q and k; the rotation is orthogonal (it leaves
q·k unchanged) and FP8 only a precision choice, so both are left out here, as transformers does.
The selection is not differentiable: the language-model loss never reaches the indexer. V3.2 trains
it by a KL term against the main attention (§2.1.1), which ``set_training`` switches on:
- "warmup": attention stays dense, every parameter but the indexers' is frozen, and each indexer
  learns L = Σ_t KL(p_t ‖ softmax(I_t)) with p_t the main attention of query t summed over heads and
  L1-normalised;
- "sparse": attention runs over the selected tokens, the model trains on its language-model loss
  and each indexer on the same KL restricted to its selected tokens S_t; the indexer reads detached
  inputs, so the KL trains only the indexer and the LM loss only the rest.
``indexer_loss(model)`` collects the layers' KL terms after a forward, for the trainer to add.

Shape legend: B batch, T queries, S keys, J index heads, E index_head_dim, K index_topk, Q q_lora_rank,
D hidden, R rope dims.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from ..kernels.attention import index_scores, top_k

# Index scores are (B, T, J, S) before the head sum: the selection takes queries in blocks holding at
# most this many (kernels/attention.py index_scores then makes them a tile of keys at a time).
SCORE_BLOCK_ELEMENTS = 1 << 25


def apply_rope_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split RoPE on the first R dims of x (B, T, [J,] E), cos/sin (B, T, R/2); the other dims pass."""
    r2 = cos.shape[-1]
    if x.dim() == 4:
        cos, sin = cos[:, :, None], sin[:, :, None]
    xf = x.float()
    x1, x2, rest = xf[..., :r2], xf[..., r2:2 * r2], xf[..., 2 * r2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1).to(x.dtype)


class Indexer(nn.Module):
    """The lightning indexer of one layer (module names as DeepSeek-V3.2's checkpoints: self_attn.indexer.*)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim, self.topk = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
        D = cfg.hidden_size
        self.wq_b = nn.Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(D, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(D, self.n_heads, bias=False)
        self.stage = None  # training: None, "warmup" or "sparse" (set_training)
        self.loss = None  # the KL term of the last training forward (indexer_loss collects it)

    def key(self, x, cos, sin):
        """x (B, T, D) → the indexer keys (B, T, E) the cache holds beside the latents."""
        return apply_rope_half(self.k_norm(self.wk(x)), cos, sin)

    def queries(self, x, q_lat, cos, sin):
        """x (B, T, D), q_lat (B, T, Q) → the roped queries q (B, T, J, E) and head weights w (B, T, J)
        (both scales in, fp32; fp64 for an fp64 model)."""
        J, E = self.n_heads, self.head_dim
        dt = torch.promote_types(x.dtype, torch.float32)
        q = apply_rope_half(self.wq_b(q_lat).unflatten(-1, (J, E)), cos, sin)  # (B, T, J, E)
        return q, self.weights_proj(x).to(dt) * (J ** -0.5 * E ** -0.5)

    def scores(self, x, q_lat, cos, sin, keys):
        """x (B, T, D), q_lat (B, T, Q), keys (B, S, E) → I (B, T, S) in fp32 (fp64 for an fp64 model)."""
        return index_scores(*self.queries(x, q_lat, cos, sin), keys)  # (B, T, S)

    @torch.no_grad()
    def forward(self, x, q_lat, cos, sin, keys, mask, queries=None):
        """The top-k keys of each query: → idx (B, T, K') long and valid (B, T, K') bool, K' = min(K, S).

        ``mask``: None (causal, the T queries being the last T of the S keys) or bool (B, 1, T, S).
        A query that may see fewer than K keys gets all of them, the rest of its K' slots marked invalid.
        Queries go in blocks so their (B, T, J, S) dot products stay under SCORE_BLOCK_ELEMENTS.
        ``queries``: the T queries' ``queries(x, q_lat, cos, sin)`` when already made (a prefill made in
        blocks makes them once: with wq_b held in FP8, each call dequantizes it)."""
        B, T, _ = x.shape
        S = keys.shape[1]
        K = min(self.topk, S)
        block = max(1, SCORE_BLOCK_ELEMENTS // max(1, B * self.n_heads * S))
        idx, valid = [], []
        for i in range(0, T, block):
            j = min(T, i + block)
            if queries is None:
                s = self.scores(x[:, i:j], q_lat[:, i:j], cos[:, i:j], sin[:, i:j], keys)  # (B, Tb, S)
            else:
                s = index_scores(queries[0][:, i:j], queries[1][:, i:j], keys)
            if mask is None:
                seen = torch.arange(S, device=s.device)[None, :] <= torch.arange(S - T + i, S - T + j,
                                                                                  device=s.device)[:, None]
            else:
                seen = mask[:, 0, i:j]
            s = s.masked_fill(~seen, float("-inf"))
            i_top = top_k(s, K)
            idx.append(i_top)
            valid.append(s.gather(-1, i_top) > float("-inf"))
        return torch.cat(idx, dim=1), torch.cat(valid, dim=1)


def selection_mask(idx: torch.Tensor, valid: torch.Tensor, S: int) -> torch.Tensor:
    """idx, valid (B, T, K) → bool (B, 1, T, S), True at each query's valid selected keys (MHA mode)."""
    B, T, _ = idx.shape
    out = torch.zeros(B, T, S, dtype=torch.bool, device=idx.device)
    return out.scatter_(-1, idx, valid)[:, None]


def indexer_kl(p: torch.Tensor, scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Σ_s p log(p / softmax(I)_s) over the kept keys, averaged over queries: p (B, T, S) the target
    attention (rows sum to 1 over ``keep``), scores (B, T, S) the index scores I, keep (B, T, S) bool."""
    logq = scores.float().masked_fill(~keep, float("-inf")).log_softmax(-1)
    kl = torch.xlogy(p, p) - p * logq.masked_fill(~keep, 0.0)
    rows = keep.any(-1)
    return kl.sum(-1)[rows].mean()


def set_training(model, stage: str | None) -> None:
    """Train the indexers of a DSA model: "warmup" (dense attention, indexers only), "sparse" (sparse
    attention, everything; the indexers by their KL) or None (off). See the module docstring."""
    if stage not in (None, "warmup", "sparse"):
        raise ValueError(f"DSA training stage {stage!r}: expected 'warmup' or 'sparse'")
    indexers = [m for m in model.modules() if isinstance(m, Indexer)]
    if stage and not indexers:
        raise ValueError(f"DSA training stage {stage!r}: the model has no indexers (its config has no index_topk)")
    for m in indexers:
        m.stage, m.loss = stage, None
    for name, p in model.named_parameters():
        p.requires_grad_(stage != "warmup" or ".indexer." in name)


def indexer_loss(model) -> torch.Tensor | None:
    """The sum over layers of the indexers' KL terms from the last forward (None when none ran), reset."""
    losses = []
    for m in model.modules():
        if isinstance(m, Indexer) and m.loss is not None:
            losses.append(m.loss)
            m.loss = None
    return torch.stack(losses).sum() if losses else None

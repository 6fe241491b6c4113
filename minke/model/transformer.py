"""The DeepSeek-V3 transformer: embedding → dense blocks → MoE blocks → norm → head, plus MTP modules.

Module names follow the Hugging Face checkpoint (``layers.{i}.self_attn.kv_b_proj`` …) so the
weight-name table in weights.py stays short.

Shape legend: B batch, T tokens, D hidden, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import ModelConfig
from .layers import MLP, RMSNorm, Rotary
from .mla import MLA
from .moe import MoE


class Block(nn.Module):
    """Pre-norm residual block: x + MLA(norm(x)), then + FFN(norm(x)); FFN is MoE past the dense layers."""

    def __init__(self, cfg: ModelConfig, i: int):
        super().__init__()
        self.layer = i
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(i) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, cache=None, absorb=None, mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, self.layer, absorb, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class MTPModule(Block):
    """Multi-token prediction module k (V3 §2.2): h' = eh_proj([enorm(emb(t_{i+k})); hnorm(h_{i})]),
    one transformer block, then its own norm (``shared_head.norm``) before the shared output head.
    Checkpoint index: model.layers.{num_hidden_layers + k}.

    Layout of the inputs, as transformers' MtpModel, vLLM (deepseek_mtp.py) and SGLang
    (deepseek_nextn.py) run DeepSeek's released MTP weights: h for module 1 is the main model's hidden
    state AFTER its final norm; for module k > 1 it is module k-1's output after its shared_head.norm,
    which is what ``forward`` returns (and what the shared head reads)."""

    def __init__(self, cfg: ModelConfig, i: int):
        super().__init__(cfg, i)
        D = cfg.hidden_size
        self.enorm = RMSNorm(D, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(D, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * D, D, bias=False)
        self.shared_head = nn.Module()
        self.shared_head.norm = RMSNorm(D, cfg.rms_norm_eps)

    def forward(self, h, emb, cos, sin, cache=None, absorb=None, mask=None):
        """h (B, T, D) the previous depth's normed state at position i, emb (B, T, D) the embedding
        of the token k ahead → (B, T, D) after shared_head.norm."""
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h)], dim=-1))
        return self.shared_head.norm(super().forward(x, cos, sin, cache, absorb, mask))


@dataclass
class Output:
    logits: torch.Tensor  # (B, T, V)
    hidden: torch.Tensor | None = None  # (B, T, D) last block's output, before the final norm
    mtp_logits: list = field(default_factory=list)  # module k: (B, T-k, V), predicting token i+k+1


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.rotary = Rotary(cfg)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.mtp = nn.ModuleList(MTPModule(cfg, cfg.num_hidden_layers + k)
                                 for k in range(cfg.num_nextn_predict_layers))

    # ---- construction --------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, std: float | None = None, generator: torch.Generator | None = None) -> "Transformer":
        """Normal(0, std) for every matrix (V3 §4.2: 0.006), ones for norms, zero routing bias."""
        std = self.config.initializer_range if std is None else std
        for name, p in self.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=generator)
        for m in self.modules():
            if getattr(m, "e_score_correction_bias", None) is not None:
                m.e_score_correction_bias.zero_()
        return self

    def named_moe_layers(self, mtp: bool = True) -> list[tuple[str, MoE]]:
        """("layer i" / "MTP k", MoE) of the main blocks, then of the MTP modules (when ``mtp``)."""
        named = [(f"layer {b.layer}", b.mlp) for b in self.layers if isinstance(b.mlp, MoE)]
        if mtp:
            named += [(f"MTP {k + 1}", m.mlp) for k, m in enumerate(self.mtp) if isinstance(m.mlp, MoE)]
        return named

    def moe_layers(self, mtp: bool = True) -> list[MoE]:
        return [m for _, m in self.named_moe_layers(mtp)]

    # ---- forward -------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, cache=None,
                absorb: bool | None = None, mtp: bool = False, logits: bool = True,
                mask: torch.Tensor | None = None) -> Output:
        """input_ids (B, T) → Output with logits (B, T, V).

        ``positions`` (B, T) default to 0..T-1, or come from the cache (``cache.positions(T)``).
        ``mtp=True`` also runs the MTP modules over the same sequence (training; the cache is not used).
        ``mask`` (B, 1, T, T) bool, without a cache: who attends to whom (packed examples: causal within
        each example only); None = causal.
        """
        B, T = input_ids.shape
        if positions is None:
            if cache is not None:
                positions = cache.positions(T)
            else:
                positions = torch.arange(T, device=input_ids.device).expand(B, T)
        cos, sin = self.rotary(positions)
        emb = self.embed_tokens(input_ids)
        h = emb
        for block in self.layers:
            h = block(h, cos, sin, cache, absorb, mask)
        out = Output(logits=self.head(h) if logits else None, hidden=h)
        if mtp:
            prev = self.norm(h)  # module 1 reads the final norm's output (see MTPModule)
            for k, module in enumerate(self.mtp, start=1):
                if T - k <= 0:
                    break
                # Position i combines h_i (which saw t_0..t_i) with the embedding of t_{i+k}.
                sub = None if mask is None else mask[:, :, :T - k, :T - k]
                prev = module(prev[:, :-1], emb[:, k:], cos[:, :T - k], sin[:, :T - k], mask=sub)
                out.mtp_logits.append(self.mtp_head(k - 1, prev))
        return out

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm + output head: hidden (..., D) → logits (..., V) (the engine runs it on last positions only)."""
        return self.lm_head(self.norm(h))

    def mtp_step(self, k: int, hidden: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor,
                 cache=None, absorb: bool | None = None, logits: bool = True):
        """One MTP module at inference (speculative drafting): hidden (B, T, D) at ``positions`` from the
        previous depth — the main model's state after its final norm (``self.norm(out.hidden)``) or an MTP
        module's output — next_ids (B, T) the tokens one step ahead → (logits (B, T, V) or None, hidden
        (B, T, D) after the module's shared_head.norm, the input of the next depth).
        ``logits=False`` skips the head when only some positions need it (``mtp_head``)."""
        module = self.mtp[k]
        cos, sin = self.rotary(positions)
        h = module(hidden, self.embed_tokens(next_ids), cos, sin, cache, absorb)
        return (self.mtp_head(k, h) if logits else None), h

    def mtp_head(self, k: int, h: torch.Tensor) -> torch.Tensor:
        """MTP module k's output head (shared with the main model; DeepSeek's checkpoints store a copy per
        module as shared_head.head): h (..., D), already after module k's shared_head.norm → (..., V)."""
        return self.lm_head(h)

def build(cfg: ModelConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
          seed: int | None = 0) -> Transformer:
    """A randomly initialised model (meta device builds without allocating: v3-671b fits anywhere)."""
    with torch.device(device):
        model = Transformer(cfg)
    if str(device) != "meta":
        g = None if seed is None else torch.Generator(device=device).manual_seed(seed)
        model.init_weights(generator=g)
        model.to(dtype)
        for m in model.moe_layers():  # the routing bias stays fp32 (see Gate)
            if m.gate.e_score_correction_bias is not None:
                m.gate.e_score_correction_bias.data = m.gate.e_score_correction_bias.data.float()
    return model

"""Multi-head Latent Attention (DeepSeek-V2 §2.1, V3 §2.1.1).

Keys and values are compressed into one latent c_kv (kv_lora_rank) per token, plus one decoupled
rotary key k_pe (qk_rope_head_dim) shared by all heads. Two modes share the same weights:

- MHA mode (training, prefill): kv_b_proj decompresses c_kv into per-head k_nope and v, then
  ordinary attention over [k_nope, k_pe].
- Absorbed MQA mode (decode): kv_b_proj's key half is folded into the query and its value half is
  applied after attention, so attention runs directly over the cached (c_kv, k_pe) — the cache never
  holds more than kv_lora_rank + qk_rope_head_dim numbers per token and layer.

With DeepSeek Sparse Attention (V3.2, ``cfg.dsa``) each layer's lightning indexer (dsa.py) picks
index_topk tokens per query and attention runs over those only: in the absorbed mode over their
gathered latents (decode reads no other token's latent), in MHA mode under a mask of the selection.

Shape legend: B batch, T new tokens, S cached+new tokens, H heads, C kv_lora_rank, R rope dims,
N qk_nope_head_dim, V v_head_dim, D hidden.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from ..kernels.attention import (FP8Folds, absorb_query, absorb_value, absorbed_attention, attention,
                                 gather_tokens, masked_softmax, sparse_rows_attention)
from .dsa import Indexer, indexer_kl, selection_mask
from .layers import RMSNorm, apply_rope, softmax_scale

# Sparse absorbed attention over a whole history (prefill): the indexer scores and kv_b_proj folds
# queries in blocks of this many; attention gathers the selected latents of as many queries as fill
# SPARSE_GATHER_BYTES at a time.
SPARSE_QUERY_BLOCK = 64
SPARSE_GATHER_BYTES = 20 << 20


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_rank = cfg.kv_lora_rank
        D, H, bias = cfg.hidden_size, cfg.num_attention_heads, cfg.attention_bias
        if cfg.q_lora_rank:
            self.q_a_proj = nn.Linear(D, cfg.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * cfg.qk_head_dim, bias=False)
        else:
            self.q_proj = nn.Linear(D, H * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * cfg.v_head_dim, D, bias=bias)
        self.scale = softmax_scale(cfg)
        self.indexer = Indexer(cfg) if cfg.dsa else None

    # ---- projections shared by both modes ------------------------------------------------------
    def query(self, x, cos, sin, q_lat=None):
        """x (B, T, D) → q_nope (B, T, H, N), q_pe (B, T, H, R) with RoPE applied. ``q_lat``: the query
        latent q_a_layernorm(q_a_proj(x)) when already computed (the indexer reads it too)."""
        if q_lat is None and hasattr(self, "q_b_proj"):
            q_lat = self.q_a_layernorm(self.q_a_proj(x))
        q = self.q_b_proj(q_lat) if q_lat is not None else self.q_proj(x)
        q = q.unflatten(-1, (self.n_heads, self.nope + self.rope))
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        return q_nope, apply_rope(q_pe, cos, sin)

    def latent(self, x, cos, sin):
        """x (B, T, D) → c_kv (B, T, C) normalized, k_pe (B, T, R) with RoPE applied: what the cache holds."""
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_rank, self.rope], dim=-1)
        return self.kv_a_layernorm(c_kv), apply_rope(k_pe, cos, sin)

    def _kv_b(self):
        """kv_b_proj's weight as (H, N+V, C): rows [:N] make keys, rows [N:] make values."""
        return self.kv_b_proj.weight.view(self.n_heads, self.nope + self.v_dim, self.kv_rank)

    # ---- the two attention modes ---------------------------------------------------------------
    def attend_mha(self, q_nope, q_pe, c_kv, k_pe, mask):
        """Decompress the latents and attend per head. mask: None (causal, T == S) or bool (B, 1, T, S)."""
        B, T, H, _ = q_nope.shape
        S = c_kv.shape[1]
        kv = self.kv_b_proj(c_kv).unflatten(-1, (H, self.nope + self.v_dim))  # (B, S, H, N+V)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)  # (B, H, T, N+R)
        k = torch.cat([k_nope, k_pe[:, :, None].expand(B, S, H, self.rope)], dim=-1).transpose(1, 2)
        return attention(q, k, v.transpose(1, 2), mask, self.scale).transpose(1, 2)  # (B, T, H, V)

    def attend_absorbed(self, q_nope, q_pe, c_kv, k_pe, mask):
        """Attend in latent space: scores = (q_nope·W_uk)·c_kv + q_pe·k_pe; out = (p·c_kv)·W_uv.
        The weight folds are kernels.attention.absorb_query / absorb_value, the attention over the cache
        kernels.attention.absorbed_attention."""
        w_uk, w_uv_t = self._absorbed_weights()  # (H, N, C), (H, C, V)
        w = self._kv_b()  # (H, N+V, C): both halves, as a one-token kernel reads them
        fp8 = self._kv_b_fp8()
        q_lat = absorb_query(q_nope, w_uk, w, fp8)  # (B, H, T, C)
        o_lat = absorbed_attention(q_lat, q_pe.transpose(1, 2), c_kv, k_pe, mask, self.scale)  # (B, H, T, C)
        return absorb_value(o_lat, w_uv_t, w, fp8)  # (B, T, H, V)

    def sparse_queries(self, q_nope, q_pe, w_uk, w, fp8=None):
        """DSA's queries for the MQA mode: q_nope (B, T, H, N), q_pe (B, T, H, R) → [q_nope·W_uk ‖ q_pe]
        scaled, (B, T, H, C+R) contiguous (kernels.attention.sparse_rows_attention's queries)."""
        q = torch.cat([absorb_query(q_nope, w_uk, w, fp8), q_pe.transpose(1, 2)], dim=-1)  # (B, H, T, C+R)
        return q.mul_(self.scale).transpose(1, 2).contiguous()

    def attend_selected(self, q_nope, q_pe, rows, valid):
        """DSA decode: each of the T new queries over its own selected tokens' rows [c_kv ‖ k_pe] (B, T,
        K, C+R) (valid (B, T, K)) in the MQA mode, kv_b_proj folded in and out → (B, T, H, V)."""
        B, T, H = q_nope.shape[:3]
        w_uk, w_uv_t = self._absorbed_weights()
        w = self._kv_b()
        fp8 = self._kv_b_fp8()
        q = self.sparse_queries(q_nope, q_pe, w_uk, w, fp8).flatten(0, 1)  # (B·T, H, C+R)
        o_lat = sparse_rows_attention(q, rows.flatten(0, 1), valid.flatten(0, 1), self.kv_rank)  # (B·T, H, C)
        return absorb_value(o_lat.view(B, T, H, -1).transpose(1, 2), w_uv_t, w, fp8)

    def _kv_b_fp8(self) -> FP8Folds | None:
        """kv_b_proj's E4M3 weight and scales by head, with the key half's transposed copy (FP8Folds), when
        it is held in FP8 (its module's ``fp8_weight()``: quant/modules.py FP8Linear) in 128×128 blocks
        that lie within heads, outside autograd; made again when the buffers change. Else None."""
        get = getattr(self.kv_b_proj, "fp8_weight", None)
        N, P, C, H = self.nope, self.nope + self.v_dim, self.kv_rank, self.n_heads
        if get is None or N % 128 or P % 128 or C % 128 or torch.is_grad_enabled():
            return None
        q, s = get()
        stamp = tuple((t.data_ptr(), -1 if t.is_inference() else t._version) for t in (q, s))
        if getattr(self, "_fp8_folds", (None,))[0] != stamp:
            q, s = q.view(H, P, C), s.view(H, P // 128, C // 128)
            qT, sT = q[:, :N].transpose(1, 2).contiguous(), s[:, : N // 128].transpose(1, 2).contiguous()
            self._fp8_folds = (stamp, FP8Folds(q, s, qT, sT))
        return self._fp8_folds[1]

    def _absorbed_weights(self):
        """kv_b_proj's key half (H, N, C) and value half transposed (H, C, V). In half precision on CPU,
        bmm copies a strided operand at every call (both halves, every layer and step), so there, outside
        autograd, copies are kept (the key half as the transpose of a contiguous (H, C, N): the layout
        kernels.attention.absorb_query's bf16 one-token kernel streams), made again when the weight
        changes (its storage or
        in-place version counter: load_state_dict, minke's optimizer step; torch's fused optimizers write
        without moving the counter, which build_optimizer corrects). Elsewhere: views, nothing kept."""
        w = self._kv_b()
        w_uk, w_uv_t = w[:, : self.nope], w[:, self.nope:].transpose(1, 2)
        half_cpu = w.device.type == "cpu" and w.dtype in (torch.bfloat16, torch.float16)
        if not half_cpu or (torch.is_grad_enabled() and w.requires_grad):
            return w_uk, w_uv_t
        stamp = (w.data_ptr(), -1 if w.is_inference() else w._version, w.dtype, w.device)  # inference: no counter
        if getattr(self, "_absorbed", (None,))[0] != stamp:
            self._absorbed = (stamp, w_uk.detach().mT.contiguous().mT, w_uv_t.detach().contiguous())
        return self._absorbed[1:]

    def forward(self, x, cos, sin, cache=None, layer: int = 0, absorb: bool | None = None, mask=None):
        """x (B, T, D) → (B, T, D).

        Without a cache: causal MHA mode over the T tokens. With a cache (any object with
        ``update(layer, c_kv, k_pe) -> (c_kv_all, k_pe_all, mask)``): the new latents are stored, and
        attention runs over everything cached, absorbed by default when the new tokens are fewer than
        those already cached (decode, speculative verification) and in MHA mode otherwise (prefill).
        ``mask`` (B, 1, T, T) bool replaces the causal mask when there is no cache (packed examples).
        """
        if self.indexer is not None:
            return self.o_proj(self.forward_sparse(x, cos, sin, cache, layer, absorb, mask).flatten(2))
        q_nope, q_pe = self.query(x, cos, sin)
        c_kv, k_pe = self.latent(x, cos, sin)
        if cache is not None:
            T = x.shape[1]
            c_kv, k_pe, mask = cache.update(layer, c_kv, k_pe)
            if absorb is None:
                absorb = T < c_kv.shape[1] - T
        if absorb:
            o = self.attend_absorbed(q_nope, q_pe, c_kv, k_pe, mask)
        else:
            o = self.attend_mha(q_nope, q_pe, c_kv, k_pe, mask)
        return self.o_proj(o.flatten(2))

    def forward_sparse(self, x, cos, sin, cache, layer, absorb, mask):
        """DSA: x (B, T, D) → attention output (B, T, H, V) over each query's index_topk selected tokens.

        A cache must also hold the indexer keys: ``num_keys(T) -> S`` and ``update_indexer(layer, keys,
        read) -> (keys_all (B, S, E) or None when not ``read``, mask)``, and for the absorbed mode ``update_selected(layer, c_kv, k_pe, idx) -> the selected
        tokens' rows [c_kv ‖ k_pe] (B, T, K, C+R)``, which stores the new latents and reads only the selected ones
        (inference/dsa_cache.py). While a query sees at most index_topk tokens it selects all of them,
        so attention is dense MLA there and the indexer is not scored at all. Past that, with a cache,
        attention always runs in the MQA mode over the selected latents (as V3.2 implements DSA), whatever
        ``absorb`` says: a decode step reads only the selected tokens' latents; a prefill chunk reads the
        history once and attends in blocks of queries, so its memory stays bounded. Without a cache,
        ``absorb`` picks that blocked path, else MHA mode under the selection's mask (training)."""
        T = x.shape[1]
        q_lat = self.q_a_layernorm(self.q_a_proj(x))  # (B, T, Q): MLA's query latent, read by both
        q_nope, q_pe = self.query(x, cos, sin, q_lat)
        c_kv, k_pe = self.latent(x, cos, sin)
        keys = self.indexer.key(x.detach(), cos, sin)  # (B, T, E); only the indexer's KL trains its weights
        if cache is not None:
            if not hasattr(cache, "update_indexer"):
                raise TypeError(f"{type(cache).__name__} holds no indexer keys, which DeepSeek Sparse Attention "
                                f"(index_topk) needs: use minke.inference.dsa_cache's caches")
            S = cache.num_keys(T)  # the history once the T new tokens are in
            # Up to index_topk tokens every query selects all it sees: the keys are stored, not read back.
            keys, mask = cache.update_indexer(layer, keys, read=S > self.indexer.topk)
        else:
            S = T
        if self.training and cache is None and self.indexer.stage:
            return self.train_indexer(x, q_lat, q_nope, q_pe, c_kv, k_pe, keys, cos, sin, mask)
        if cache is not None and absorb is None:
            absorb = T < S - T
        if S <= self.indexer.topk:  # every query selects every token it sees: dense MLA
            if cache is not None:
                c_kv, k_pe, mask = cache.update(layer, c_kv, k_pe)
            attend = self.attend_absorbed if absorb else self.attend_mha
            return attend(q_nope, q_pe, c_kv, k_pe, mask)
        if cache is None and not absorb:  # MHA mode (training; the reference): under the selection's mask
            idx, valid = self.indexer(x, q_lat, cos, sin, keys, mask)
            return self.attend_mha(q_nope, q_pe, c_kv, k_pe, selection_mask(idx, valid, S))
        if cache is not None and T * self.indexer.topk < S:  # decode, verification: only the selected latents
            idx, valid = self.indexer(x, q_lat, cos, sin, keys, mask)
            return self.attend_selected(q_nope, q_pe, cache.update_selected(layer, c_kv, k_pe, idx), valid)
        if cache is not None:  # a prefill (chunk): the whole history once, then the queries in blocks
            c_kv, k_pe, mask = cache.update(layer, c_kv, k_pe)
        return self.attend_sparse_blocks(x, q_lat, q_nope, q_pe, c_kv, k_pe, keys, cos, sin, mask)

    def attend_sparse_blocks(self, x, q_lat, q_nope, q_pe, c_kv, k_pe, keys, cos, sin, mask):
        """Sparse absorbed attention of T queries over S keys held whole (prefill, a prefill chunk):
        queries in blocks of SPARSE_QUERY_BLOCK, each block scored by the indexer over the keys up to
        its last query (when causal) and folded through kv_b_proj at once (its weights are read once per
        block, not per query); then sub-blocks whose gathered [c_kv ‖ k_pe] rows fill SPARSE_GATHER_BYTES
        (one buffer, reused: it stays in the last-level cache between the gather and the two bmms that
        read it), a multiple of the thread count (bmm splits its batch over the threads: 3 queries on 2
        threads ran at 0.7 of 4's speed). → (B, T, H, V)."""
        B, T = x.shape[:2]
        S, topk = c_kv.shape[1], self.indexer.topk
        K = min(topk, S)
        ck = torch.cat([c_kv, k_pe], dim=-1)  # (B, S, C+R): the rows each query gathers
        sub = min(SPARSE_QUERY_BLOCK, T, max(1, SPARSE_GATHER_BYTES // (B * K * ck.shape[-1] * ck.element_size())))
        if sub >= (threads := torch.get_num_threads()):  # bmm splits its queries over the threads: evenly
            sub -= sub % threads
        buf = None  # made at the first selecting block; not under autograd (backward reads the rows)
        w_uk, w_uv_t = self._absorbed_weights()
        w = self._kv_b()
        fp8 = self._kv_b_fp8()
        queries = None  # the indexer's queries, made once for all T (at the first selecting block)
        out = []
        for i in range(0, T, SPARSE_QUERY_BLOCK):
            j = min(T, i + SPARSE_QUERY_BLOCK)
            n = S - T + j if mask is None else S  # keys this block may see
            m = None if mask is None else mask[:, :, i:j]
            if n <= topk:
                out.append(self.attend_absorbed(q_nope[:, i:j], q_pe[:, i:j], c_kv[:, :n], k_pe[:, :n], m))
                continue
            if queries is None:
                with torch.no_grad():
                    queries = self.indexer.queries(x, q_lat, cos, sin)
            idx, valid = self.indexer(x[:, i:j], q_lat[:, i:j], cos[:, i:j], sin[:, i:j], keys[:, :n], m,
                                      (queries[0][:, i:j], queries[1][:, i:j]))
            # attend_selected's folds, here once per block around the sub-blocks' attention
            q = self.sparse_queries(q_nope[:, i:j], q_pe[:, i:j], w_uk, w, fp8)  # (B, Tb, H, C+R)
            if buf is None and not torch.is_grad_enabled():
                buf = ck.new_empty(B * sub * K * ck.shape[-1])
            o_lat = []
            for a in range(0, j - i, sub):
                rows = gather_tokens(ck, idx[:, a:a + sub], buf)  # (B, s, K, C+R)
                o = sparse_rows_attention(q[:, a:a + sub].flatten(0, 1), rows.flatten(0, 1),
                                          valid[:, a:a + sub].flatten(0, 1), self.kv_rank)  # (B·s, H, C)
                o_lat.append(o.view(B, -1, *o.shape[1:]))
            out.append(absorb_value(torch.cat(o_lat, dim=1).transpose(1, 2), w_uv_t, w, fp8))
        return torch.cat(out, dim=1)

    def train_indexer(self, x, q_lat, q_nope, q_pe, c_kv, k_pe, keys, cos, sin, mask):
        """A training forward (no cache) that also leaves the indexer's KL term in ``indexer.loss``
        (dsa.py): "warmup" attends densely and distils the whole attention distribution, "sparse" attends
        over the selected tokens and distils the attention over them. → (B, T, H, V)."""
        B, T = x.shape[:2]
        keep = mask if mask is not None else torch.ones(T, T, dtype=torch.bool, device=x.device).tril()[None, None]
        keep = keep.expand(B, 1, T, T)
        if self.indexer.stage == "sparse" and T > self.indexer.topk:
            idx, valid = self.indexer(x, q_lat, cos, sin, keys, mask)
            keep = selection_mask(idx, valid, T)
            mask = keep
        o = self.attend_mha(q_nope, q_pe, c_kv, k_pe, mask)
        with torch.no_grad():  # the target: the main attention per query, averaged over heads (B, T, S)
            w_uk = self._kv_b()[:, : self.nope]  # (H, N, C)
            q_c = torch.einsum("bthn,hnc->bhtc", q_nope.float(), w_uk.float())
            scores = torch.einsum("bhtc,bsc->bhts", q_c, c_kv.float()) + \
                torch.einsum("bthr,bsr->bhts", q_pe.float(), k_pe.float())
            p = masked_softmax(scores * self.scale, keep).mean(1)
        index = self.indexer.scores(x.detach(), q_lat.detach(), cos, sin, keys)  # (B, T, S), grad to the indexer
        self.indexer.loss = indexer_kl(p, index, keep[:, 0])
        return o

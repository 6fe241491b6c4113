"""Attention backends for MLA's two modes, each with the plain reference tests compare it to.

- MHA mode (training, prefill): ``attention`` dispatches between torch's fused SDPA
  (``fused_attention``) and explicit scores → softmax → weighted sum (``math_attention``, causal in
  query blocks), which inductor fuses on CPU under torch.compile.
- Absorbed MQA mode (decode): ``absorbed_attention`` attends in latent space over the cached
  (c_kv, k_pe) of each row: every head shares one key (c_kv ‖ k_pe) and one value (c_kv) per token.
  ``absorbed_attention_reference`` is the same formula written with einsum, in fp32. ``absorb_query``
  and ``absorb_value`` fold kv_b_proj's halves into the query and out of the output. One fp32 query
  token on the CPU runs all three in kernels/decode.cpp (one pass over the cache, flash-decoding's
  online softmax), where it is built; one bf16 token its two folds (with AVX512-BF16), from kv_b_proj's
  E4M3 weights where it is held so (``FP8Folds``).
- DeepSeek Sparse Attention (V3.2) in the MQA mode: ``sparse_rows_attention`` attends each query over
  its own selected tokens' [c_kv ‖ k_pe] rows (decode gathers them from the paged pools, prefill with
  ``gather_tokens`` into one reused buffer; ``select_rows`` copies rows), against
  ``sparse_absorbed_attention_reference``. ``index_scores`` is the lightning indexer's
  ReLU-weighted dot products (decode.cpp's kernels for bf16 and fp32, else torch in key tiles),
  against ``index_scores_reference``.

Masks: None means causal with the T queries being the last T of the S keys; otherwise bool
(B, 1, T, S), True where a query may attend.

Shape legend: B batch, H heads, T queries, S keys, N query/key head dim, V value head dim,
C kv_lora_rank, R rope dims.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .cpp import cpp_kernels, inference_on_cpu

MATH_ATTENTION_MAX_KEYS = 512  # CPU under torch.compile: explicit attention up to this many keys
MATH_ATTENTION_BLOCK = 128  # causal explicit attention: queries in blocks of this many, each over its prefix


# ---- MHA mode ----------------------------------------------------------------------------------
def attention(q, k, v, mask, scale):
    """q, k (B, H, T|S, N), v (B, H, S, V) → (B, H, T, V).

    torch's fused SDPA, except on CPU under torch.compile with at most MATH_ATTENTION_MAX_KEYS keys:
    there explicit scores → softmax → weighted sum, which inductor fuses, causal in query blocks that
    skip the keys they cannot see. Forward + backward, bf16, 4×8 heads of 256 tokens: 10.9 ms against
    19.0 for the fused kernel (24.3 against 29.5 at 512 tokens; the fused kernel wins from 1024 on).
    Eager, the fused kernel stays: in a whole fp32 training step it was the faster by 3–5%."""
    if q.device.type == "cpu" and torch.compiler.is_compiling() and k.shape[2] <= MATH_ATTENTION_MAX_KEYS:
        return math_attention(q, k, v, mask, scale, MATH_ATTENTION_BLOCK)
    return fused_attention(q, k, v, mask, scale)


def fused_attention(q, k, v, mask, scale):
    """torch's fused SDPA (same arguments as ``attention``)."""
    # CPU's fused (flash) SDPA kernel needs v's head dim equal to q's; otherwise SDPA falls back to
    # materialising the (T, S) scores, masked half included. Zero columns of v give zero output
    # columns, dropped below (2.6x faster forward + backward at T = 1024, 1.25x at 256).
    dv = v.shape[-1]
    pad = max(0, q.shape[-1] - dv) if q.device.type == "cpu" else 0
    v = F.pad(v, (0, pad)) if pad else v
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale)
    return o[..., :dv]


def math_attention(q, k, v, mask, scale, block: int | None = None):
    """Attention with the (T, S) scores written out, softmax in fp32 (same arguments as ``attention``):
    also the reference in tests. ``block``: when causal, queries go in blocks of this many, each over
    the keys up to its last query only (the same result, without the scores above the diagonal
    blocks). Under torch.compile the block loop fixes T, so each new sequence length compiles anew."""
    T, S = q.shape[2], k.shape[2]
    if mask is None and block and block < T:
        return torch.cat([math_attention(q[:, :, i:i + block], k[:, :, :S - T + i + block],
                                         v[:, :, :S - T + i + block], None, scale)
                          for i in range(0, T, block)], dim=2)
    return masked_softmax((q @ k.transpose(-1, -2)).float() * scale, mask).to(v.dtype) @ v


def masked_softmax(scores, mask):
    """scores (..., T, S), a fresh tensor (masked in place) → softmax over S, in their dtype (torch
    accumulates half precision in fp32), where mask (None: causal, the T queries being the last T keys).
    Nothing is masked for causal T = 1, nor on the CPU for a mask that hides nothing (a decode row sees
    its whole history): in a bf16 decode step over 32K keys, masking, with upcasting, scaling and
    casting back, was 60% of the attention."""
    T, S = scores.shape[-2:]
    if mask is None and T > 1:
        mask = torch.ones(T, S, dtype=torch.bool, device=scores.device).tril(S - T)
    if mask is not None and (scores.device.type != "cpu" or torch.compiler.is_compiling() or not bool(mask.all())):
        scores.masked_fill_(~mask, float("-inf"))  # (the check only eager on the CPU: no sync, no graph break)
    return scores.softmax(dim=-1)


# ---- absorbed MQA mode -------------------------------------------------------------------------
# oneDNN, which runs CPU half-precision GEMMs, builds a kernel for every new shape (and stride): about
# 3-10 ms each on a busy 2-core machine, measured (the first layer of every bf16 decode step paid 3.7 ms
# for it). Decode's history grows by one key a step, so half-precision attention over it runs the keys
# as a prefix of a multiple of KEY_BUCKET keys (a new shape every KEY_BUCKET steps) and the rest copied
# into a zero-padded tail of exactly KEY_BUCKET keys (one shape, ever), its padding's scores dropped.
KEY_BUCKET = 64


# decode.cpp's latent_attention scores each (head, token) pair on its own: ahead of torch's GEMMs for a
# few heads, behind them for many. Measured (2 cores, 512 to 32K keys): 12 heads at kv_lora_rank 256
# 1.1-2.5x faster at 1-2 threads; 16 heads at 512, 1.0-1.6x at 4-32K keys; 32 to 128 heads at 512, torch
# 1.1-2.4x faster (V3's 128 heads at 32K keys: 195 ms against torch's 146).
LATENT_KERNEL_MAX_HEADS = 16

# A half-precision batch's attention runs row by row from this many cached latent elements (B·S·C) on:
# below it, one batched GEMM with oneDNN's copy of the keys costs less than a call per row (a small
# model's batched decode, RL's rollouts: 3.6x slower row by row, measured).
ROW_BY_ROW_MIN_ELEMENTS = 1 << 23


def buckets_keys(dtype: torch.dtype, device) -> bool:
    """Whether absorbed attention runs its keys as a bucketed prefix and a padded tail (CPU, half precision)."""
    return torch.device(device).type == "cpu" and dtype in (torch.bfloat16, torch.float16)


def _one_token_cpu(*ts) -> bool:
    """Inputs decode.cpp's fp32 decode kernels take: fp32, and ``inference_on_cpu``."""
    return inference_on_cpu(*ts) and all(t.dtype == torch.float32 for t in ts)


def _bf16_fold(x, w) -> bool:
    """Whether decode.cpp's absorb_value takes one token's bf16 fold x (H, C) through the rows of w
    (H, ·, C) contiguous: a CPU with AVX512-BF16, C a multiple of 32, outside autograd. At V3's widths
    (128 heads, kv_lora_rank 512) each fold reads its 16.8 MB at memory speed: 0.6 ms against bmm's
    1.9 (query) and 1.0 (value), cold, 2 threads."""
    return x.dtype == w.dtype == torch.bfloat16 and w.is_contiguous() and w.shape[-1] % 32 == 0 \
        and inference_on_cpu(x, w) and (cpp := cpp_kernels()) is not None and cpp.has_bf16_dot()


class FP8Folds(NamedTuple):
    """kv_b_proj held in E4M3 with 128×128 block scales (quant/modules.py FP8Linear), for the one-token
    folds: q (H, N+V, C) its weight by head and s (H, (N+V)/128, C/128) its scales; qT (H, C, N) the key
    half transposed, sT (H, C/128, N/128) its blocks' scales transposed (the same numbers: exact). N,
    N+V and C multiples of 128, so that every block lies within one head's key or value half."""
    q: torch.Tensor
    s: torch.Tensor
    qT: torch.Tensor
    sT: torch.Tensor


def _fp8_fold(x, fp8: FP8Folds | None) -> bool:
    """Whether decode.cpp's fp8_fold takes one token's bf16 fold x with kv_b_proj's E4M3 weights: a CPU
    with AVX512-BF16 and VBMI, outside autograd. At V3's widths each fold reads 8.4 MB, half of bf16's."""
    return fp8 is not None and x.dtype == torch.bfloat16 and inference_on_cpu(x, fp8.q) \
        and (cpp := cpp_kernels()) is not None and cpp.has_fp8_dot()


def absorb_query(q_nope, w_uk, w_kv_b, fp8: FP8Folds | None = None):
    """q_nope (B, T, H, N) → q_lat (B, H, T, C), each head's query through kv_b_proj's key half w_uk
    (H, N, C): a view of w_kv_b (H, N+V, C), kv_b_proj's whole weight by head, or the transpose of a
    contiguous (H, C, N) copy (mla.py keeps one for bf16 on CPU). Plain bmm over the head axis (einsum's
    planning costs more than decode's tiny arithmetic). One token: decode.cpp, reading w_kv_b in fp32,
    the (H, C, N) copy in bf16, or its E4M3 counterpart ``fp8.qT`` where given."""
    B, T, H, N = q_nope.shape
    w_ukT = w_uk.mT  # (H, C, N)
    if B * T == 1 and _fp8_fold(q_nope, fp8):
        C = fp8.qT.shape[1]
        return cpp_kernels().fp8_fold(q_nope.reshape(H, N).contiguous(), fp8.qT, fp8.sT, 0, C).view(1, H, 1, -1)
    if B * T == 1 and _one_token_cpu(q_nope, w_kv_b) and w_kv_b.is_contiguous() and (cpp := cpp_kernels()):
        return cpp.absorb_query(q_nope.reshape(H, N), w_kv_b).view(1, H, 1, -1)
    if B * T == 1 and _bf16_fold(q_nope, w_ukT):
        return cpp_kernels().absorb_value(q_nope.reshape(H, N).contiguous(), w_ukT, 0).view(1, H, 1, -1)
    q = q_nope.permute(2, 0, 1, 3).reshape(H, B * T, N)
    q_lat = q @ w_uk  # (H, B·T, C)
    return q_lat.reshape(H, B, T, -1).transpose(0, 1)


def absorb_value(o_lat, w_uv_t, w_kv_b, fp8: FP8Folds | None = None):
    """o_lat (B, H, T, C) → o (B, T, H, V), each head's output through kv_b_proj's value half, w_uv_t
    (H, C, V) transposed for the bmm; one token (fp32, or bf16 with ``_bf16_fold``): decode.cpp reads
    w_kv_b (H, N+V, C) instead, or ``fp8.q`` where given."""
    B, H, T, C = o_lat.shape
    if B * T == 1 and _fp8_fold(o_lat, fp8):
        V = w_uv_t.shape[-1]
        n_nope = fp8.q.shape[1] - V
        return cpp_kernels().fp8_fold(o_lat.reshape(H, C).contiguous(), fp8.q, fp8.s, n_nope, V).view(1, 1, H, -1)
    if B * T == 1 and (_one_token_cpu(o_lat, w_kv_b) and w_kv_b.is_contiguous() or _bf16_fold(o_lat, w_kv_b)) \
            and (cpp := cpp_kernels()):
        n_nope = w_kv_b.shape[1] - w_uv_t.shape[-1]
        return cpp.absorb_value(o_lat.reshape(H, C).contiguous(), w_kv_b, n_nope).view(1, 1, H, -1)
    o = o_lat.transpose(0, 1).reshape(H, B * T, C) @ w_uv_t  # (H, B·T, V)
    return o.view(H, B, T, -1).permute(1, 2, 0, 3)


def absorbed_attention(q_lat, q_pe, c_kv, k_pe, mask, scale):
    """q_lat (B, H, T, C) the queries with kv_b_proj's key half folded in, q_pe (B, H, T, R), c_kv
    (B, S, C), k_pe (B, S, R) → o_lat (B, H, T, C) = softmax(q_lat·c_kvᵀ + q_pe·k_peᵀ)·c_kv.

    Plain (b)mm, the H·T queries of a row against its S cached latents: decode runs this on tiny
    tensors, where einsum's planning costs more than the arithmetic; no operand is broadcast, so the
    cache is never copied (but for the < KEY_BUCKET keys of a half-precision tail). The scale goes on the
    queries; scores and softmax in the cache's dtype (torch's softmax accumulates half precision in
    fp32). A batch of one runs 2-D GEMMs (torch's batched bf16 GEMM for a batch of one ran 3x slower at
    S = 4096; fp32: even), and a half-precision batch runs row by row (see below)."""
    B, H, T, C = q_lat.shape
    S, R = c_kv.shape[1], k_pe.shape[-1]
    if B == 1 and T == 1 and H <= LATENT_KERNEL_MAX_HEADS and C % 16 == 0 and R % 16 == 0 \
            and _one_token_cpu(q_lat, q_pe, c_kv, k_pe) \
            and c_kv.stride(-1) == 1 and k_pe.stride(-1) == 1 and (mask is None or bool(mask.all())) \
            and (cpp := cpp_kernels()):
        # one token of one row sees every cached token: decode.cpp's single pass over the cache
        return cpp.latent_attention(q_lat.reshape(H, C), q_pe.reshape(H, R), c_kv[0], k_pe[0], scale).view(1, H, 1, C)
    if B > 1 and buckets_keys(c_kv.dtype, c_kv.device) and B * S * C >= ROW_BY_ROW_MIN_ELEMENTS:
        # row by row: the bucketed prefix of a batch's (B, S, ·) is no longer one strided batch, and oneDNN
        # copied it whole, transposed, for the scores (a third of a bf16 step, 8 rows of 32K keys)
        return torch.cat([absorbed_attention(q_lat[b:b + 1], q_pe[b:b + 1], c_kv[b:b + 1], k_pe[b:b + 1],
                                             mask if mask is None or mask.shape[0] == 1 else mask[b:b + 1], scale)
                          for b in range(B)])
    q_lat, q_pe = q_lat * scale, q_pe * scale  # the scale on the H·T queries, not on the H·T·S scores
    if B == 1:
        q, q_pe, c_kv, k_pe = q_lat.reshape(H * T, C), q_pe.reshape(H * T, R), c_kv[0], k_pe[0]
    else:
        q, q_pe = q_lat.reshape(B, H * T, C), q_pe.reshape(B, H * T, R)
    if not buckets_keys(c_kv.dtype, c_kv.device):
        p = masked_softmax((q @ c_kv.mT + q_pe @ k_pe.mT).view(B, H, T, S), mask)
        return (p.view(*c_kv.shape[:-2], H * T, S) @ c_kv).view(B, H, T, C)
    S0, n = S // KEY_BUCKET * KEY_BUCKET, S % KEY_BUCKET  # prefix keys, tail keys

    def tail(x):  # (…, S, F) → its last n rows in (…, KEY_BUCKET, F), zero-padded
        t = x.new_zeros(*x.shape[:-2], KEY_BUCKET, x.shape[-1])
        t[..., :n, :] = x[..., S0:, :]
        return t
    c_tail = tail(c_kv) if n else None
    parts = []  # scores (…, H·T, ·) of the prefix, then of the tail's n real keys
    if S0:
        parts.append(q @ c_kv[..., :S0, :].mT + q_pe @ k_pe[..., :S0, :].mT)
    if n:
        parts.append((q @ c_tail.mT + q_pe @ tail(k_pe).mT)[..., :n])
    scores = (parts[0] if len(parts) == 1 else torch.cat(parts, -1)).view(B, H, T, S)
    p = masked_softmax(scores, mask).view(*c_kv.shape[:-2], H * T, S)
    o = p[..., :S0].contiguous() @ c_kv[..., :S0, :] if S0 else 0  # contiguous: oneDNN's kernels are per stride
    if n:
        o = o + torch.nn.functional.pad(p[..., S0:], (0, KEY_BUCKET - n)) @ c_tail
    return o.view(B, H, T, C)


def absorbed_attention_reference(q_lat, q_pe, c_kv, k_pe, mask, scale):
    """The formula of ``absorbed_attention`` with einsum and an explicit mask, all in fp32."""
    T, S = q_lat.shape[2], c_kv.shape[1]
    q_lat, q_pe, c_kv, k_pe = (t.float() for t in (q_lat, q_pe, c_kv, k_pe))
    scores = torch.einsum("bhtc,bsc->bhts", q_lat, c_kv) + torch.einsum("bhtr,bsr->bhts", q_pe, k_pe)
    if mask is None:
        mask = torch.ones(T, S, dtype=torch.bool, device=scores.device).tril(S - T)
    p = torch.where(mask, scores * scale, float("-inf")).softmax(dim=-1)
    return torch.einsum("bhts,bsc->bhtc", p, c_kv)


# ---- sparse (DSA) absorbed mode ----------------------------------------------------------------
def select_rows(x, idx, out=None):
    """x (N, F) rows (contiguous within a row), idx (M,) → x.index_select(0, idx), into ``out`` (M, F)
    when given (rows contiguous within a row, any row stride: a column slice of a wider buffer). Outside
    autograd on the CPU, decode.cpp's select_rows: it prefetches the rows ahead of the copy (2048
    selected rows of a 32K-token cache, out of cache: 0.09 ms bf16 against index_select's 0.16-0.37,
    0.17 fp32 against 0.42-0.69)."""
    idx = idx.long()
    if inference_on_cpu(x, idx) and x.stride(-1) == 1 and (out is None or out.stride(-1) == 1 and out.dtype == x.dtype) \
            and (cpp := cpp_kernels()) is not None:
        out = x.new_empty(idx.shape[0], x.shape[1]) if out is None else out
        return cpp.select_rows(x, idx.contiguous(), out)
    if out is None:
        return x.index_select(0, idx)
    return torch.index_select(x, 0, idx, out=out) if out.is_contiguous() else out.copy_(x.index_select(0, idx))


def gather_tokens(x, idx, out=None):
    """x (B, S, F) per-token rows, idx (B, T, K) token indices → (B, T, K, F): each query's selected rows.
    Whole rows are copied (``select_rows`` over the B·S rows; an element-wise gather costs several times
    more). ``out``: a contiguous buffer of at least B·T·K·F elements to fill (reused across a prefill's
    query blocks: a fresh allocation that large is mapped and page-faulted anew each time); not under
    autograd."""
    B, S, F = x.shape
    T, K = idx.shape[1:]
    if B > 1 and not x.is_contiguous():  # rows of a bigger buffer (a contiguous cache): per row, no copy of x
        return torch.stack([select_rows(x[b], idx[b].flatten()) for b in range(B)]).view(B, T, K, F)
    rows = (idx + (torch.arange(B, device=idx.device) * S).view(B, 1, 1)).flatten() if B > 1 else idx.flatten()
    if out is not None:
        out = out.view(-1)[: B * T * K * F].view(B * T * K, F)
    return select_rows(x.reshape(B * S, F), rows, out).view(B, T, K, F)


def sparse_rows_attention(q, rows, valid, C: int):
    """DeepSeek Sparse Attention over MLA's MQA mode: each query attends to its own K selected tokens.

    q (N, H, C+R) the N queries [q_lat ‖ q_pe] already scaled (q_lat with kv_b_proj's key half folded
    in), rows (N, K, C+R) each query's selected tokens' [c_kv ‖ k_pe] (decode gathers them from the
    paged pools, prefill from the history, into one buffer), valid (N, K) bool (False: a padding slot
    of a query that sees fewer than K tokens) → o_lat (N, H, C). The scores are one GEMM per query over
    C+R, the values the rows' first C columns: the work and the bytes read grow with K, not with the
    context. One query's scores are a 2-D GEMM (torch's bf16 bmm copies the transposed operand of a
    batch of one: 1.8 ms against 1.0 at V3.2's widths)."""
    scores = (q[0] @ rows[0].T)[None] if q.shape[0] == 1 else q @ rows.transpose(1, 2)  # (N, H, K)
    if rows.device.type == "cpu" and rows.dtype in (torch.bfloat16, torch.float16):
        # oneDNN would copy the strided first C columns at every call (slowly: 2 ms a query at 2048 rows);
        # all C+R columns, contiguous, cost 12% more multiply-adds and no copy.
        return _attend_selected(scores, valid, rows)[..., :C]
    return _attend_selected(scores, valid, rows[..., :C])


def _attend_selected(scores, valid, c):
    """scores (N, H, K) in the latents' dtype, scaled; valid (N, K); c (N, K, C) → softmax(scores) @ c."""
    if not bool(valid.all()):
        scores.masked_fill_(~valid[:, None], float("-inf"))  # in place: the callers' own tensor
    # torch's softmax accumulates half precision in fp32 and writes the latents' dtype: one pass.
    return scores.softmax(-1) @ c


def sparse_absorbed_attention_reference(q_lat, q_pe, c_kv, k_pe, idx, valid, scale):
    """``sparse_rows_attention`` of q_lat (B, H, T, C), q_pe (B, H, T, R) (not yet scaled) as dense
    absorbed attention over the whole cache (c_kv (B, S, C), k_pe (B, S, R)) with a mask that keeps only
    each query's valid selected tokens idx (B, T, K) → o_lat (B, H, T, C), fp32."""
    B, T, _ = idx.shape
    keep = torch.zeros(B, T, c_kv.shape[1], dtype=torch.bool, device=idx.device).scatter_(-1, idx, valid)
    return absorbed_attention_reference(q_lat, q_pe, c_kv, k_pe, keep[:, None], scale)


# ---- DSA's lightning indexer -------------------------------------------------------------------
# Torch's path makes the (B, T, J, S) dot products a tile of at least DOTS_TILE_MIN_KEYS keys at a time
# holding at most DOTS_TILE_ELEMENTS: written, rectified and summed while in cache, instead of going
# through memory three times. Measured on a whole fp32 32K prefill (one V3.2 layer, 2 threads): 300 s
# with tiles, 363 s without; one call alone at 1 thread, the two were even.
DOTS_TILE_ELEMENTS = 1 << 21
DOTS_TILE_MIN_KEYS = 256


def index_scores(q, w, keys):
    """The lightning indexer's I (B, T, S) = Σ_j w[..., j] · ReLU(q[..., j, :] · k_s): q (B, T, J, E) its
    roped queries, w (B, T, J) its head weights with both scales in, keys (B, S, E). fp32 (fp64 for an
    fp64 model): bf16 q and keys are multiplied as fp32, as transformers does.

    On the CPU outside autograd and autocast: decode.cpp's index_scores, no (T, J, S) products written
    out. bf16 (with AVX512-BF16): the same products summed in fp32 by vdpbf16ps, 2.6x torch's fp32 GEMM
    for 64 queries over 32K keys, 2 threads. fp32: FMAs, for 64 queries 22 ms over 4K keys and 305 over
    32K against torch's tiles' 75 and 593, for decode's one query over 32K keys 3.8 ms against 14.
    Elsewhere torch in fp32, a tile of keys at a time."""
    B, T, J, E = q.shape
    if inference_on_cpu(q, w, keys) and (cpp := cpp_kernels()) and (
            q.dtype == keys.dtype == torch.float32 or
            q.dtype == keys.dtype == torch.bfloat16 and E % 2 == 0 and cpp.has_bf16_dot()):
        w = w.float()
        rows = [cpp.index_scores(q[b].contiguous(), w[b].contiguous(), keys[b].contiguous()) for b in range(B)]
        return rows[0][None] if B == 1 else torch.stack(rows)
    dt = torch.promote_types(q.dtype, torch.float32)
    q, k_t, w = q.to(dt).reshape(B, T * J, E), keys.to(dt).transpose(1, 2), w.to(dt)[:, :, None]
    tile = max(DOTS_TILE_MIN_KEYS, DOTS_TILE_ELEMENTS // (B * T * J))
    parts = [(w @ (q @ k_t[..., s:s + tile]).view(B, T, J, -1).relu_()).squeeze(2)  # (B, T, tile)
             for s in range(0, k_t.shape[-1], tile)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def index_scores_reference(q, w, keys):
    """``index_scores`` written with einsum, in fp64."""
    dots = torch.einsum("btje,bse->btjs", q.double(), keys.double())
    return torch.einsum("btj,btjs->bts", w.double(), dots.relu())


def top_k(s: torch.Tensor, K: int) -> torch.Tensor:
    """The indices (..., K) of the K largest scores of s (..., S) in increasing order, ties broken
    towards the earlier token (DSA's selection: model/dsa.py). torch.topk breaks ties as its kernel
    happens to (the ReLU gives exact zeros, so ties are common in small models), which would let a
    decode step over S keys pick differently from a full forward whose row holds the same S scores and
    masked ones after them. fp32 on the CPU outside autograd: decode.cpp's top_k; else ``top_k_torch``."""
    S = s.shape[-1]
    if s.dtype == torch.float32 and inference_on_cpu(s) and 0 < K <= S and (cpp := cpp_kernels()) is not None:
        return cpp.top_k(s.reshape(-1, S).contiguous(), K).view(*s.shape[:-1], K)
    return top_k_torch(s, K)


def top_k_torch(s: torch.Tensor, K: int) -> torch.Tensor:
    """``top_k`` in torch ops (any device)."""
    kth = s.topk(K, dim=-1, sorted=False).values.amin(-1, keepdim=True)  # (..., 1) the K-th largest (unsorted: 2.3x faster)
    above, tie = s > kth, s == kth
    room = K - above.sum(-1, keepdim=True)  # how many of the tied scores are kept: the earliest
    keep = above | (tie & (tie.cumsum(-1) <= room))
    return keep.nonzero()[:, -1].view(*s.shape[:-1], K)  # row-major: exactly K per row, in order

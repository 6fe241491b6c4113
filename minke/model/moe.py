"""DeepSeekMoE (DeepSeek-V2 §2.2, V3 §2.1.2): fine-grained routed experts plus always-on shared experts.

Routing (``topk_method``):
- ``noaux_tc`` (V3): sigmoid scores s; selection uses s + b with the per-expert bias b
  (``e_score_correction_bias``, moved by the auxiliary-loss-free update, never entering the gate
  value). Groups are scored by the sum of their top-2 biased scores, the best ``topk_group`` groups
  kept (the rest masked with -inf, as DeepSeek's code does), then top-k experts inside them.
- ``greedy`` (V2-Lite): top-k of the softmax scores.
- ``group_limited_greedy`` (V2): groups scored by their best expert, top-k inside the kept groups.
Gate values are the unbiased scores of the chosen experts, normalized over them when
``norm_topk_prob``, times ``routed_scaling_factor``.

Shape legend: N tokens (flattened batch×time), D hidden, E routed experts, K experts per token,
I moe_intermediate_size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .layers import MLP


class Gate(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.k, self.method, self.scoring = cfg.num_experts_per_tok, cfg.topk_method, cfg.scoring_func
        self.n_group, self.topk_group = cfg.n_group or 1, cfg.topk_group or 1
        self.norm, self.route_scale = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        if self.method == "noaux_tc":
            # fp32 always: the bias moves by γ = 1e-3 steps that bf16 would swallow.
            self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor):
        """x (N, D) → gate weights (N, K) fp32, expert ids (N, K), scores (N, E) fp32.

        fp32 with autocast off (V3 §3.3 keeps the gate in higher precision): under autocast
        F.linear would run in bf16 whatever its inputs' dtype, and bf16 logits pick other experts."""
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if self.scoring == "sigmoid" else logits.softmax(dim=-1)
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias
        if self.method != "greedy" and self.n_group > 1:
            grouped = choice.unflatten(-1, (self.n_group, -1))  # (N, G, E/G)
            if self.method == "noaux_tc":
                group_score = grouped.topk(2, dim=-1).values.sum(-1)
            else:
                group_score = grouped.amax(dim=-1)
            keep = group_score.topk(self.topk_group, dim=-1).indices
            group_mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep, True)
            choice = grouped.masked_fill(~group_mask[..., None], float("-inf")).flatten(1)
        idx = choice.topk(self.k, dim=-1).indices
        w = scores.gather(1, idx)
        if self.norm:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return w * self.route_scale, idx, scores


def swiglu(x, gate, up, down):
    """One expert: down(silu(gate·x) · up·x) with weights (I, D), (I, D), (D, I)."""
    return F.silu(x @ gate.t()) * (x @ up.t()) @ down.t()


class Experts(nn.Module):
    """E SwiGLU experts held as stacked weights, so tokens can be grouped by expert and each expert
    runs one matmul over its slice (and expert parallelism can shard dim 0)."""

    def __init__(self, n: int, dim: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(n, inter, dim))
        self.up_proj = nn.Parameter(torch.empty(n, inter, dim))
        self.down_proj = nn.Parameter(torch.empty(n, dim, inter))

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x, self.gate_proj[e], self.up_proj[e], self.down_proj[e])

    def grouped(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x (M, D) sorted by expert, counts (E,) int64 rows each → (M, D).

        One grouped GEMM per projection where torch has one for these shapes (``grouped_mm_ok``): no
        host sync, so torch.compile keeps the MoE in one graph. Else one matmul per non-empty expert;
        the two agree (tests/test_fast_paths.py). Under autocast the experts compute in its dtype, as
        nn.Linear would (torch's autocast does not cover grouped_mm), with gate and up in one GEMM.
        Half precision on CPU pads each expert's rows (``padded_rows``)."""
        gate_proj, up_proj, down_proj = self.gate_proj, self.up_proj, self.down_proj
        gate_up = None  # (E, 2I, D): gate and up stacked, for one GEMM instead of two
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            # the cast copies the weights anyway; copying gate and up into one tensor costs nothing more
            gate_up = torch.cat([gate_proj, up_proj], 1).to(dtype)
            x, down_proj = x.to(dtype), down_proj.to(dtype)
            gate_proj, up_proj = gate_up.chunk(2, 1)
        if grouped_mm_ok(x, gate_proj, up_proj, down_proj):
            rows = None  # where each row of x sits in the padded layout, if padded
            if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
                rows, offs, total = padded_rows(counts, ROW_MULTIPLE, x.shape[0])
                x = x.new_zeros(total, x.shape[1]).index_copy(0, rows, x)
            else:
                offs = counts.cumsum(0).to(torch.int32)  # end row of each expert

            def mm(a, w):  # a (M, in) @ w[e].T (E, out, in) for each expert's rows → (M, out)
                return F.grouped_mm(a, w.transpose(1, 2), offs=offs)

            g, u = mm(x, gate_up).chunk(2, -1) if gate_up is not None else (mm(x, gate_proj), mm(x, up_proj))
            y = mm(F.silu(g) * u, down_proj)
            return y if rows is None else gather_rows(y, rows)
        # split/cat rather than writing slices of one output: their backward is cat/split, not E
        # zero-filled (M, D) gradients.
        ys = [swiglu(xe, gate_proj[e], up_proj[e], down_proj[e])
              for e, xe in enumerate(x.split(counts.tolist())) if len(xe)]
        return torch.cat(ys) if ys else x.new_empty(x.shape)


# On CPU, bf16/fp16 GEMMs go to oneDNN, which generates a kernel for every new matrix shape (about
# 0.7 ms each, measured). Expert row counts change every step, so nearly every per-expert GEMM would pay
# for one; padding each expert's rows to a multiple of 16 keeps the shapes few and their kernels cached.
ROW_MULTIPLE = 16


def padded_rows(counts: torch.Tensor, multiple: int, m: int):
    """Layout of m rows grouped by expert (``counts`` each) with every group padded to a multiple of
    ``multiple`` rows: (row (m,) of each input row in it, end row of each group (E,) int32, total rows).
    Eager sizes the layout exactly; under torch.compile it takes the static bound m + E·(multiple − 1),
    and the rows past the last group are never read."""
    padded = (counts + multiple - 1) // multiple * multiple
    ends = padded.cumsum(0)
    src_ends = counts.cumsum(0)
    expert = torch.searchsorted(src_ends, torch.arange(m, device=counts.device), right=True)
    shift = (ends - padded) - (src_ends - counts)  # padded start − unpadded start, per expert
    rows = torch.arange(m, device=counts.device) + shift[expert]
    total = m + len(counts) * (multiple - 1) if torch.compiler.is_compiling() else int(ends[-1])
    return rows, ends.to(torch.int32), total


def grouped_mm_ok(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """torch's grouped GEMM (``F.grouped_mm``, torch ≥ 2.10) takes these operands: fp32/bf16/fp16 on CPU
    (bf16 only under torch.compile), bf16 on CUDA sm80+; rows contiguous, row strides and pointers
    16-byte aligned."""
    if not hasattr(F, "grouped_mm"):
        return False
    compiling = torch.compiler.is_compiling()
    if x.device.type == "cpu":
        dtypes = (torch.bfloat16,) if compiling else (torch.float32, torch.bfloat16, torch.float16)
    elif x.device.type == "cuda" and torch.cuda.get_device_capability(x.device) >= (8, 0):
        dtypes = (torch.bfloat16,)
    else:
        return False
    return all(t.dtype == x.dtype and t.dtype in dtypes and t.stride(-1) == 1
               and t.stride(-2) * t.element_size() % 16 == 0 and (compiling or t.data_ptr() % 16 == 0)
               for t in (x, *weights))


def grouped_moe(experts: Experts, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, n_experts: int):
    """Routed output: sort the N·K (token, expert) pairs by expert, run each expert once over its
    contiguous slice, put the rows back in token order and sum each token's K outputs, weighted by
    the gate. Gathers and sums only: no scatter-add. Returns (out (N, D), load (E,)). An experts
    module with a ``few_tokens(x, w, idx)`` method (decode's, installed by kernels/linear.py's
    DecodeWeights) computes the output itself where that returns one."""
    N, K = idx.shape
    few = getattr(experts, "few_tokens", None)  # a decode kernel's path for a few tokens (kernels/linear.py)
    if few is not None and (out := few(x, w, idx)) is not None:
        return out, torch.bincount(idx.flatten(), minlength=n_experts)
    flat = idx.flatten()
    order = flat.argsort(stable=True)
    load = torch.zeros(n_experts, dtype=torch.long, device=idx.device).scatter_add_(0, flat, torch.ones_like(flat))
    y = experts.grouped(gather_rows(x, order, K), load)  # row i: token order[i] // K
    y = gather_rows(y, inverse_permutation(order)).unflatten(0, (N, K))  # back in (token, k) order
    return (y * w[..., None].to(y.dtype)).sum(1), load


def inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    """inv with inv[order[i]] = i: where each row went (one scatter, no second sort)."""
    return torch.empty_like(order).scatter_(0, order, torch.arange(len(order), device=order.device))


class _GatherRows(torch.autograd.Function):
    """out[i] = src[index[i] // fan] for distinct ``index`` values: the backward writes each gradient
    row to its one place (then sums each source row's ``fan`` places) instead of scatter-adding, which
    inductor compiles to atomic adds (on CPU, a compare-and-swap loop per element)."""

    @staticmethod
    def forward(src, index, fan):
        return src[index // fan] if fan > 1 else src[index]

    @staticmethod
    def setup_context(ctx, inputs, output):
        src, index, fan = inputs
        ctx.save_for_backward(index)
        ctx.rows, ctx.fan = src.shape[0], fan

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        g = grad.new_zeros(ctx.rows * ctx.fan, *grad.shape[1:]).index_copy_(0, index, grad)
        return g.view(ctx.rows, ctx.fan, *grad.shape[1:]).sum(1) if ctx.fan > 1 else g, None, None


def gather_rows(src: torch.Tensor, index: torch.Tensor, fan: int = 1) -> torch.Tensor:
    """src[index // fan] for an ``index`` without repeats (a permutation or part of one), with a
    gradient that needs no scatter-add (``_GatherRows``)."""
    if not (src.requires_grad and torch.is_grad_enabled()):  # inference: plain indexing, no Function
        return _GatherRows.forward(src, index, fan)
    return _GatherRows.apply(src, index, fan)


def looped_moe(experts: Experts, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor):
    """Slow reference: every token, every chosen expert, one at a time."""
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for j in range(idx.shape[1]):
            out[n] += (w[n, j] * experts.expert(int(idx[n, j]), x[n:n + 1])[0].float()).to(x.dtype)
    return out


def sequence_balance_loss(scores: torch.Tensor, idx: torch.Tensor, batch: int, n_experts: int, k: int):
    """V3 eq. 17–20: per sequence, Σ_i f_i·P_i with f_i = E/(K·T)·#tokens routed to i and P_i the mean
    of the normalized scores; averaged over the batch. scores (N, E) with N = batch·T."""
    T = scores.shape[0] // batch
    s = scores / scores.sum(-1, keepdim=True)
    P = s.view(batch, T, n_experts).mean(1)  # (B, E)
    counts = torch.zeros(batch, n_experts, device=scores.device).scatter_add_(
        1, idx.view(batch, T * k), torch.ones(batch, T * k, device=scores.device))
    f = counts * n_experts / (k * T)
    return (f * P).sum(-1).mean()


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.gate = Gate(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        n_shared = cfg.n_shared_experts or 0
        self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * n_shared) if n_shared else None
        self.reference = False  # route through looped_moe (tests)
        # Set by every forward for the trainer: per-expert token counts and, when training, the
        # sequence-wise balance term (weight it by α outside).
        self.load: torch.Tensor | None = None
        self.balance_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        w, idx, scores = self.gate(flat)
        if self.reference:
            routed = looped_moe(self.experts, flat, w, idx)
            self.load = torch.bincount(idx.flatten(), minlength=self.n_experts)
        else:
            routed, self.load = grouped_moe(self.experts, flat, w, idx, self.n_experts)
        if self.training and x.dim() == 3:
            self.balance_loss = sequence_balance_loss(scores, idx, shape[0], self.n_experts, self.k)
        out = routed.view(shape)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor, gamma: float) -> None:
        """Auxiliary-loss-free balancing (V3 §2.1.2): b_i += γ·sign(mean load − load_i)."""
        b = self.gate.e_score_correction_bias
        if b is None:
            raise ValueError("update_bias needs topk_method 'noaux_tc' (the only method with a routing bias)")
        load = load.float().to(b.device)
        b += gamma * torch.sign(load.mean() - load)

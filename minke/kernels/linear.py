"""Decode's GEMMs on CPU with weights pre-packed by oneDNN, beside the plain ``F.linear`` they replace.

Batch-1 decode multiplies one row by every weight matrix: it is a stream of matrix-vector products,
bound by how fast the weights come from memory. torch's plain ``F.linear`` re-lays out (bf16) or
reads (fp32) the weight in a layout its GEMV kernel does not stream well; oneDNN's blocked layout,
packed once, reads it near memory speed (inductor's ``freezing`` does the same for compiled CPU
models). In bf16, on a CPU with AVX512-BF16, the packed GEMV moves about twice as many weights per
second as the fp32 one and three times plain bf16 ``F.linear`` (benchmarks/README.md).

``DecodeWeights(model)`` holds packed copies of a model's ``nn.Linear`` weights and of its stacked
expert weights, and while entered (``with weights:``) routes those modules through them. Packs are
refreshed whenever a weight changed since it was packed (its version counter or storage moved), so
a trainer updating the model in place (RL) is seen by the next decode step. Anything the packed path
does not take (another dtype or device, autocast, grad mode) runs the module's own forward.

Shape legend: M rows, K in features, O out features, E experts, I expert width, D hidden.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PACK_BATCH_HINT = 1  # oneDNN picks the packed layout for this many rows: decode's
# A packed GEMV costs ~15 us more per call than torch's own (oneDNN's dispatch); it pays from about
# this many weight elements, measured at one row on one core: bf16 1.3x at 384x768, fp32 only 1.1x at
# 2048x768 (and slower below). Smaller matrices, hot in cache, stay on the plain path.
MIN_PACK_ELEMENTS = {torch.bfloat16: 1 << 17, torch.float32: 1 << 20}


def packed_available(dtype: torch.dtype, device="cpu") -> bool:
    """oneDNN takes fp32 anywhere it is built, bf16 only where the CPU has native bf16 instructions
    (AVX512-BF16 / AMX): elsewhere oneDNN emulates it and the plain path is as fast."""
    if torch.device(device).type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    return dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def worth_packing(weight: torch.Tensor) -> bool:
    """A (…, O, K) weight (one matrix, or one per expert) that the packed path runs faster."""
    return (packed_available(weight.dtype, weight.device)
            and weight.shape[-1] * weight.shape[-2] >= MIN_PACK_ELEMENTS[weight.dtype])


def pack(weight: torch.Tensor) -> torch.Tensor:
    """weight (O, K) → the same matrix in oneDNN's blocked layout (an opaque mkldnn tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), PACK_BATCH_HINT)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) @ Wᵀ + bias → (..., O), W given by ``pack(W)``: what F.linear(x, W, bias) computes."""
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]).contiguous(), packed, bias, "none", [], "")
    return y.view(*x.shape[:-1], y.shape[-1])


def _stamp(*ts: torch.Tensor) -> tuple:
    """What identifies a weight's current values: storage and in-place version of each tensor (an
    inference tensor, made under inference_mode, has no version counter)."""
    return tuple((t.data_ptr(), -1 if t.is_inference() else t._version) for t in ts)


class _PackedLinear:
    """A forward for one nn.Linear through its packed weight (falls back to the module's own)."""

    def __init__(self, module: nn.Linear):
        self.module, self.stamp, self.packed = module, None, None

    def refresh(self) -> None:
        m = self.module
        if self.stamp != _stamp(m.weight):
            self.packed, self.stamp = pack(m.weight), _stamp(m.weight)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        if x.dtype != m.weight.dtype or x.device.type != "cpu" or torch.is_grad_enabled() \
                or torch.is_autocast_enabled("cpu"):
            return type(m).forward(m, x)
        return packed_linear(x, self.packed, None if m.bias is None else m.bias.detach())


class _PackedExperts:
    """``Experts.grouped`` through packed weights: per expert with rows, one GEMV for gate and up
    together ([gate; up] packed as one (2I, D) matrix), one for down."""

    def __init__(self, module: nn.Module):
        self.module, self.stamp, self.gate_up, self.down = module, None, [], []

    def weights(self):
        m = self.module
        return m.gate_proj, m.up_proj, m.down_proj  # (E, I, D), (E, I, D), (E, D, I)

    def refresh(self) -> None:
        stamp = _stamp(*self.weights())
        if self.stamp != stamp:
            g, u, d = (w.detach() for w in self.weights())
            self.gate_up = [pack(torch.cat([g[e], u[e]])) for e in range(len(g))]
            self.down = [pack(d[e]) for e in range(len(d))]
            self.stamp = stamp

    def __call__(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x (M, D) sorted by expert, counts (E,) rows each → (M, D), as ``Experts.grouped``."""
        m = self.module
        if x.dtype != m.gate_proj.dtype or x.device.type != "cpu" or torch.is_grad_enabled() \
                or torch.is_autocast_enabled("cpu"):
            return type(m).grouped(m, x, counts)
        ys, start = [], 0
        for e, c in enumerate(counts.tolist()):  # CPU: reading counts costs no device sync
            if c:
                g, u = packed_linear(x[start:start + c], self.gate_up[e]).chunk(2, -1)
                ys.append(packed_linear(F.silu(g) * u, self.down[e]))
                start += c
        return torch.cat(ys) if ys else x.new_empty(x.shape)


class DecodeWeights:
    """Packed copies of ``model``'s nn.Linear and expert weights in their dtype, used while entered.

    ``with weights:`` refreshes stale packs, then routes every nn.Linear's forward and every experts
    module's ``grouped`` through them; leaving restores the modules. Not re-entrant; the caller holds
    whatever lock keeps other threads off the model meanwhile (the engine's). Weights that
    ``worth_packing`` refuses (dtype, device, too small to gain) are left alone."""

    def __init__(self, model: nn.Module, experts: tuple[type, ...] = ()):
        """``experts``: the classes of stacked SwiGLU experts (model.moe.Experts: gate_proj, up_proj
        (E, I, D), down_proj (E, D, I), ``grouped(x, counts)``), named by the caller, since kernels import
        nothing from the model. Only these exact classes and plain nn.Linear are taken: a subclass with
        its own forward (an FP8 linear) keeps it."""
        self.linears: list[_PackedLinear] = []
        self.experts: list[_PackedExperts] = []
        for m in model.modules():
            if type(m) is nn.Linear and worth_packing(m.weight):
                self.linears.append(_PackedLinear(m))
            elif type(m) in experts and worth_packing(m.gate_proj):
                self.experts.append(_PackedExperts(m))

    def __len__(self) -> int:
        return len(self.linears) + len(self.experts)

    def __enter__(self) -> "DecodeWeights":
        for p in self.linears:
            p.refresh()
            p.module.forward = p
        for p in self.experts:
            p.refresh()
            p.module.grouped = p
        return self

    def __exit__(self, *exc) -> None:
        for p in self.linears:
            p.module.__dict__.pop("forward", None)
        for p in self.experts:
            p.module.__dict__.pop("grouped", None)

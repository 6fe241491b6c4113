"""Decode's GEMMs on CPU with weights laid out once for matrix-vector products, beside the plain
``F.linear`` they replace.

Batch-1 decode multiplies one row by every weight matrix: it is a stream of matrix-vector products,
bound by how fast the weights come from memory. torch's plain ``F.linear`` reads an (O, K) weight in a
layout its GEMV kernel does not stream well. The layouts here (measured in benchmarks/README.md):

- ``"t"`` (fp32): the transpose stored contiguous, (K, O), which decode's one or two rows multiply
  with kernels/decode.cpp: it reads the matrix front to back with the outputs held in L1, the access
  pattern the hardware prefetcher streams fastest, and gets near a plain copy's bandwidth on every
  shape where MKL's GEMV gets half of it on some. Built for the machine on first use
  (``cpp_kernels``); where it cannot be built, MKL multiplies the same layout, chosen then only for
  the shapes it streams well (``mkl_prefers_t``). More rows than ``CPP_MAX_ROWS`` (a batch) go to a
  oneDNN-packed copy made at the first such call.
- ``"packed"``: oneDNN's blocked layout (``_reorder_linear_weight``), what inductor's ``freezing`` does
  for compiled CPU models: every large bf16 matrix on a CPU with AVX512-BF16, where it reads twice the
  weights per second of the fp32 path and three times plain bf16, and the fp32 ones ``"t"`` does not take.
- smaller matrices stay plain: oneDNN's dispatch costs ~15 µs a call, more than they take.

Besides single matrices, matrices that read the same input are fused into one: a SwiGLU MLP's gate and
up projections, and each routed expert's (one GEMV per expert for gate and up, one for down).

``DecodeWeights(model)`` holds the laid-out copies of a model's ``nn.Linear`` weights, SwiGLU MLPs and
stacked experts, and while entered (``with weights:``) routes those modules through them; with the C++
kernels built it also takes a step's few fp32 rows of RMSNorm, the MoE router and the routed experts
(one kernel call each, where torch runs many small ops). Copies are
refreshed whenever a weight changed since it was laid out (its version counter or storage moved), so
a trainer updating the model in place (RL) is seen by the next decode step. Anything the fast path
does not take (another dtype or device, autocast, grad mode) runs the module's own forward. The copies
cost memory: one per weight, two for an fp32 weight that batched decode also ran.

Shape legend: M rows, K in features, O out features, E experts, I expert width, D hidden.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cpp import cpp_kernels, inference_on_cpu

PACK_BATCH_HINT = 1  # oneDNN picks the packed layout for this many rows: decode's
# Below this many weight elements a matrix, hot in cache or not, runs as fast plain (bf16: 384×384).
MIN_PACK_ELEMENTS = {torch.bfloat16: 1 << 17, torch.float32: 1 << 18}
MIN_CPP_ELEMENTS = 1 << 15  # the C++ GEMV's call costs a few µs: it gains from (fp32) 128 KB matrices
WIDE_OUTPUT = 1024  # without the C++ kernel, MKL streams fp32 Wᵀ from this many outputs, whatever the input width
NORM_ROWS = 8  # decode.cpp's rms_norm takes up to this many rows (a decode step's); more run torch's norm
FEW_TOKENS = 2  # decode.cpp's moe_tokens takes up to this many tokens (expert by expert, no batching)
CPP_MAX_ROWS = 2  # kernels/decode.cpp's linear_t takes up to this many rows; a batch is compute-bound, oneDNN's
FP8_MAX_ROWS = 8  # decode.cpp's fp8_linear takes up to this many rows (a decode step's); more dequantize


def mkl_prefers_t(O: int, K: int) -> bool:
    """Whether MKL's GEMV streams fp32 Wᵀ (K, O) faster than oneDNN's packed (O, K): where the output
    is at least as wide as the input, or wider than WIDE_OUTPUT (benchmarks/README.md)."""
    return O >= K or O >= WIDE_OUTPUT


def packed_available(dtype: torch.dtype, device="cpu") -> bool:
    """oneDNN takes fp32 anywhere it is built, bf16 only where the CPU has native bf16 instructions
    (AVX512-BF16 / AMX): elsewhere oneDNN emulates it and the plain path is as fast."""
    if torch.device(device).type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    return dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def layout(weight: torch.Tensor) -> str | None:
    """The layout an (…, O, K) weight (one matrix, or one per expert) decodes fastest in: "t", "packed",
    or None (plain: too small to gain, or a dtype/device the fast paths do not take)."""
    if not packed_available(weight.dtype, weight.device):
        return None
    O, K = weight.shape[-2:]
    if weight.dtype == torch.float32 and O * K >= MIN_CPP_ELEMENTS and cpp_kernels() is not None:
        return "t"
    if O * K < MIN_PACK_ELEMENTS[weight.dtype]:
        return None
    return "t" if weight.dtype == torch.float32 and mkl_prefers_t(O, K) else "packed"


def worth_packing(weight: torch.Tensor) -> bool:
    """A weight that one of the fast layouts runs faster than plain."""
    return layout(weight) is not None


def pack(weight: torch.Tensor) -> torch.Tensor:
    """weight (O, K) → the same matrix in oneDNN's blocked layout (an opaque mkldnn tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), PACK_BATCH_HINT)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) @ Wᵀ + bias → (..., O), W given by ``pack(W)``: what F.linear(x, W, bias) computes."""
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]).contiguous(), packed, bias, "none", [], "")
    return y.view(*x.shape[:-1], y.shape[-1])


def fp8_linear(x: torch.Tensor, q: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor | None:
    """x (..., K) @ Wᵀ → (..., O) with W held in DeepSeek's FP8 format: q (O, K) float8_e4m3fn and one
    fp32 scale per 128×128 block, scale_inv (⌈O/128⌉, ⌈K/128⌉), W = q · scale (quant/modules.py's
    FP8Linear and FP8Experts keep it so in memory). Up to FP8_MAX_ROWS bf16 rows on the CPU, outside
    autograd, go through decode.cpp's fp8_linear (where AVX512-BF16 and AVX512-VBMI are; K a multiple of
    64): the weight read as stored, one byte a weight, and widened to bf16 in registers. Anything else:
    None, and the caller dequantizes."""
    K = x.shape[-1]
    rows = x.numel() // K if K else 0
    if x.dtype != torch.bfloat16 or not 0 < rows <= FP8_MAX_ROWS or K % 64 or not inference_on_cpu(x, q) \
            or (cpp := cpp_kernels()) is None or not cpp.has_fp8_dot():
        return None
    y = cpp.fp8_linear(x.reshape(rows, K).contiguous(), q.contiguous(), scale_inv.float().contiguous())
    return y.view(*x.shape[:-1], q.shape[0])


class Prepared:
    """One (O, K) weight in the layout ``layout`` picked (or plain), and F.linear through it."""

    def __init__(self, weight: torch.Tensor, kind: str | None):
        w = weight.detach()
        self.kind = kind
        self.w = pack(w) if kind == "packed" else w.t().contiguous() if kind == "t" else w
        self.batched = None  # "t": the packed copy more than CPP_MAX_ROWS rows use, made at the first such call

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.kind == "packed":
            return packed_linear(x, self.w, bias)
        if self.kind == "t":
            x2 = x.reshape(-1, x.shape[-1])
            cpp = cpp_kernels() if x2.shape[0] <= CPP_MAX_ROWS and x2.dtype == torch.float32 else None
            if cpp is not None:
                y = cpp.linear_t(x2.contiguous(), self.w, bias)
            elif x2.shape[0] > CPP_MAX_ROWS:
                if self.batched is None:
                    self.batched = pack(self.w.t())
                return packed_linear(x, self.batched, bias)
            else:
                y = torch.addmm(bias, x2, self.w) if bias is not None else torch.mm(x2, self.w)
            return y.view(*x.shape[:-1], y.shape[-1])
        return F.linear(x, self.w, bias)


def _stamp(*ts: torch.Tensor) -> tuple:
    """What identifies a weight's current values: storage and in-place version of each tensor (an
    inference tensor, made under inference_mode, has no version counter)."""
    return tuple((t.data_ptr(), -1 if t.is_inference() else t._version) for t in ts)


def _plain(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Inputs the fast path does not take: the module's own forward runs."""
    return x.dtype != w.dtype or not inference_on_cpu(x, w)


class _Module:
    """A fast forward for one module (installed as its ``attrs`` while DecodeWeights is entered), its
    laid-out weights made again whenever ``weights()`` changed."""
    attrs = {"forward": "__call__"}

    copies: tuple[str, ...] = ()  # the attributes prepare() fills

    def __init__(self, module: nn.Module):
        self.module, self.stamp, self.ready = module, None, False

    def refresh(self) -> None:
        """Forget the copies when a weight changed; the next call lays them out again (so a weight that
        decode never runs through, kv_b_proj in absorbed mode or an unused MTP module, costs nothing)."""
        stamp = _stamp(*self.weights())
        if self.stamp != stamp:
            for name in self.copies:  # freed before the next are made
                setattr(self, name, None)
            self.ready, self.stamp = False, stamp

    def ensure(self) -> None:
        if not self.ready:
            self.prepare(*(w.detach() for w in self.weights()))
            self.ready = True


class _Linear(_Module):
    copies = ("w",)

    def weights(self):
        return (self.module.weight,)

    def prepare(self, w):
        self.w = Prepared(w, layout(w))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        if _plain(x, m.weight):
            return type(m).forward(m, x)
        self.ensure()
        return self.w(x, None if m.bias is None else m.bias.detach())


def _swiglu(gate_up: Prepared, down: Prepared, x: torch.Tensor) -> torch.Tensor:
    """down(silu(gate·x) · up·x) with [gate; up] laid out as one matrix."""
    g, u = gate_up(x).chunk(2, -1)
    return down(F.silu(g) * u)


class _MLP(_Module):
    """A SwiGLU MLP (gate_proj, up_proj, down_proj nn.Linear without bias): gate and up as one GEMV."""
    copies = ("gate_up", "down")

    def weights(self):
        m = self.module
        return m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight

    def prepare(self, g, u, d):
        gu = torch.cat([g, u])
        self.gate_up, self.down = Prepared(gu, layout(gu)), Prepared(d, layout(d))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        if _plain(x, m.gate_proj.weight):
            return type(m).forward(m, x)
        self.ensure()
        return _swiglu(self.gate_up, self.down, x)


class _Experts(_Module):
    """``Experts.grouped`` through laid-out weights: per expert with rows, one GEMV for gate and up
    together ([gate; up] as one (2I, D) matrix), one for down; and ``few_tokens``, which grouped_moe
    asks first: up to FEW_TOKENS tokens of fp32 in the "t" layout go to decode.cpp's moe_tokens, one
    call for the whole routed output (no sort, no gathers)."""
    attrs = {"grouped": "__call__", "few_tokens": "few_tokens"}
    copies = ("gate_up", "down", "t_weights")

    def weights(self):
        m = self.module
        return m.gate_proj, m.up_proj, m.down_proj  # (E, I, D), (E, I, D), (E, D, I)

    def prepare(self, g, u, d):
        gu = torch.cat([g, u], 1)
        kg, kd = layout(gu), layout(d)
        self.gate_up = [Prepared(gu[e], kg) for e in range(len(gu))]
        self.down = [Prepared(d[e], kd) for e in range(len(d))]
        self.t_layout = kg == kd == "t" and gu.dtype == torch.float32
        self.t_weights = ([p.w for p in self.gate_up], [p.w for p in self.down]) if self.t_layout else None

    def few_tokens(self, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor | None:
        """x (N, D), gate weights w (N, K), expert ids idx (N, K) → the routed output (N, D), or None
        (not a few fp32 tokens, or no kernel): grouped_moe's own path then."""
        if x.shape[0] > FEW_TOKENS or _plain(x, self.module.gate_proj) or (cpp := cpp_kernels()) is None:
            return None
        self.ensure()
        if not self.t_layout:
            return None
        return cpp.moe_tokens(x.contiguous(), w.float().contiguous(), idx.contiguous(), *self.t_weights)

    def __call__(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x (M, D) sorted by expert, counts (E,) rows each → (M, D), as ``Experts.grouped``."""
        m = self.module
        if _plain(x, m.gate_proj):
            return type(m).grouped(m, x, counts)
        self.ensure()
        ys, start = [], 0
        for e, c in enumerate(counts.tolist()):  # CPU: reading counts costs no device sync
            if c:
                ys.append(_swiglu(self.gate_up[e], self.down[e], x[start:start + c]))
                start += c
        return torch.cat(ys) if ys else x.new_empty(x.shape)


class _Norm(_Module):
    """An RMSNorm (``weight`` (D,), ``eps``; forward weight · x / rms(x) in fp32) over up to NORM_ROWS fp32
    rows through decode.cpp's rms_norm: one call where the module's forward runs seven ops. Its weight
    is read in place (nothing to lay out)."""

    def weights(self):  # read live at every call: nothing to stamp or lay out
        return ()

    def prepare(self):
        pass

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        rows = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0
        if _plain(x, m.weight) or x.dtype != torch.float32 or not 0 < rows <= NORM_ROWS \
                or (cpp := cpp_kernels()) is None:
            return type(m).forward(m, x)
        return cpp.rms_norm(x.reshape(rows, -1), m.weight.detach(), m.eps).view(x.shape)


class _Gate(_Module):
    """DeepSeek-V3's router (``topk_method`` noaux_tc, ``scoring`` sigmoid: model/moe.py's Gate, whose
    attributes it reads) over up to FEW_TOKENS fp32 tokens through decode.cpp's sigmoid_gate: one call
    where the module runs about twenty ops. Other routers, more tokens, grad mode: the module's forward."""

    def weights(self):  # read live at every call: nothing to stamp or lay out
        return ()

    def prepare(self):
        pass

    def __call__(self, x: torch.Tensor):
        m = self.module
        if x.dim() != 2 or x.shape[0] > FEW_TOKENS or _plain(x, m.weight) or x.dtype != torch.float32 \
                or m.method != "noaux_tc" or m.scoring != "sigmoid" or (cpp := cpp_kernels()) is None:
            return type(m).forward(m, x)
        w, idx, scores = cpp.sigmoid_gate(x.contiguous(), m.weight.detach(), m.e_score_correction_bias,
                                          m.n_group, m.topk_group, m.k, bool(m.norm), float(m.route_scale))
        return w, idx, scores


def _swiglu_mlp(m: nn.Module) -> bool:
    return all(type(getattr(m, n, None)) is nn.Linear and getattr(m, n).bias is None
               for n in ("gate_proj", "up_proj", "down_proj"))


class DecodeWeights:
    """Laid-out copies of ``model``'s nn.Linear, SwiGLU MLP and expert weights in their dtype, used
    while entered.

    ``with weights:`` refreshes stale copies, then routes every such module's forward (an experts
    module's ``grouped``) through them; leaving restores the modules. Not re-entrant; the caller holds
    whatever lock keeps other threads off the model meanwhile (the engine's). Weights that ``layout``
    refuses (dtype, device, too small to gain) are left alone."""

    def __init__(self, model: nn.Module, experts: tuple[type, ...] = (), mlps: tuple[type, ...] = (),
                 norms: tuple[type, ...] = (), gates: tuple[type, ...] = ()):
        """``experts``: the classes of stacked SwiGLU experts (model.moe.Experts: gate_proj, up_proj
        (E, I, D), down_proj (E, D, I), ``grouped(x, counts)``); ``mlps``: the classes of SwiGLU MLPs
        (model.layers.MLP: gate_proj, up_proj, down_proj nn.Linear, forward down(silu(gate(x)) · up(x)));
        ``norms``: the classes of RMSNorms (model.layers.RMSNorm) and ``gates`` of MoE routers
        (model.moe.Gate), taken in fp32 on the CPU where the C++ kernels are built; all named by the caller, since kernels import nothing from the model. Only
        these exact classes and plain nn.Linear are taken: a subclass with its own forward (an FP8
        linear) keeps it."""
        self.linears: list[_Linear] = []
        self.mlps: list[_MLP] = []
        self.experts: list[_Experts] = []
        self.norms: list[_Norm] = []
        self.gates: list[_Gate] = []
        self._installs = None  # (module fast path, its module's __dict__, [(attribute, function)]), made once
        self._stamp = None  # every weight's (storage, version) when last refreshed
        fused: set[int] = set()  # the linears inside a fused MLP
        for m in model.modules():
            if type(m) in mlps and _swiglu_mlp(m) and worth_packing(m.gate_proj.weight):
                self.mlps.append(_MLP(m))
                fused.update(id(getattr(m, n)) for n in ("gate_proj", "up_proj", "down_proj"))
            elif type(m) in experts and worth_packing(m.gate_proj):
                self.experts.append(_Experts(m))
        for m in model.modules():
            if type(m) is nn.Linear and id(m) not in fused and worth_packing(m.weight):
                self.linears.append(_Linear(m))
            elif type(m) in (*norms, *gates) and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu" \
                    and cpp_kernels() is not None:
                (self.norms if type(m) in norms else self.gates).append((_Norm if type(m) in norms else _Gate)(m))

    def _all(self) -> list[_Module]:
        return [*self.linears, *self.mlps, *self.experts, *self.norms, *self.gates]

    def __len__(self) -> int:
        return len(self._all())

    def __enter__(self) -> "DecodeWeights":
        # Every decode step enters: straight into the instance dicts (what nn.Module.__setattr__ does for
        # a plain attribute, after checks that cost more than the rest of entering).
        if self._installs is None:
            self._installs = [(p, p.module.__dict__, [(a, getattr(p, m)) for a, m in p.attrs.items()])
                              for p in self._all()]
        stamp = _stamp(*(t for p, _, _ in self._installs for t in p.weights()))  # one pass; refresh if moved
        if stamp != self._stamp:
            for p, _, _ in self._installs:
                p.refresh()
            self._stamp = stamp
        for _, d, fns in self._installs:
            d.update(fns)
        return self

    def __exit__(self, *exc) -> None:
        for _, d, fns in self._installs:
            for attr, _ in fns:
                d.pop(attr, None)

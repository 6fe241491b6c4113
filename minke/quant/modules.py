"""FP8 applied to a built model from outside, as parallelism is (model code stays single-device math).

Which weights: the linear layers of attention and of the FFNs (dense MLPs, shared and routed experts),
as in DeepSeek-V3 §3.3 and its FP8 checkpoints; the embedding, output head, MoE gate, norms, MTP's
eh_proj and the attention core stay in high precision.

- Training (``to_fp8_training``): each such nn.Linear becomes an ``FP8TrainLinear`` (same class
  layout and Parameter, forward through ``fp8_linear``), each routed-expert stack an ``FP8TrainExperts``
  holding the same Parameters. Master weights stay fp32; only the GEMM operands are FP8.
- Inference (``to_fp8_inference``): ``FP8Linear`` / ``FP8Experts`` hold the E4M3 weights and their
  ``weight_scale_inv`` in memory under the checkpoint's own names. A decode step's few bf16 rows on
  the CPU multiply the E4M3 weights as stored (kernels/linear.py fp8_linear); more rows dequantize per
  block when used; a linear's ``weight`` reads as the dequantized matrix (MLA's absorbed mode reads
  kv_b_proj's for more than one token; one token's folds read its E4M3 ``fp8_weight()``), an expert is
  dequantized only when tokens reach it.

Routed experts are recognised by shape (three stacked 3-D Parameters named gate_proj, up_proj,
down_proj), so this module imports nothing from minke.model. Parallelism comes after FP8
(``to_fp8_training`` refuses an already parallelized EPExperts): FSDP2 gathers each FP8TrainLinear's
and FP8TrainExperts' weight before the forward, so the quantization sees the whole matrix and its
128×128 blocks are those of one process; expert parallelism's EPExperts runs FP8TrainExperts' math
on its local experts (minke/train/parallel.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.linear import fp8_linear as fp8_linear_rows
from .fp8 import ACT, FP8, WEIGHT, Quantized, dequantize, fp8_linear, matmul, native_fp8, quantize

PROJ = ("gate_proj", "up_proj", "down_proj")


def is_fp8_linear(name: str, module: nn.Module) -> bool:
    """An nn.Linear quantized by DeepSeek: ``*_proj`` and kv_a_proj_with_mqa under self_attn or an MLP,
    except MTP's eh_proj; in V3.2's indexer wq_b and wk, not weights_proj (as weights._fp8_candidate)."""
    leaf = name.rsplit(".", 1)[-1]
    if ".indexer." in f".{name}":
        return isinstance(module, nn.Linear) and leaf in ("wq_b", "wk")
    return (isinstance(module, nn.Linear) and leaf.endswith(("_proj", "kv_a_proj_with_mqa")) and leaf != "eh_proj"
            and (".self_attn." in f".{name}" or ".mlp." in f".{name}"))


def is_experts(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, p, None), torch.Tensor) and getattr(module, p).dim() == 3 for p in PROJ) \
        and hasattr(module, "grouped")


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


# ---- training -----------------------------------------------------------------------------------
class FP8TrainLinear(nn.Linear):
    """An nn.Linear whose forward runs ``fp8_linear`` (set on an existing Linear by ``to_fp8_training``)."""
    fp8_name = "linear"
    fp8_pow2 = False

    def forward(self, x):
        return fp8_linear(x, self.weight, self.bias, self.fp8_pow2, self.fp8_name)


class FP8TrainExperts(nn.Module):
    """Routed experts computed with FP8 GEMMs; the same Parameters (and names) as the Experts it replaces.
    ``fp8_first``: the global id of expert 0 here (nonzero for expert parallelism's local slices), for errors."""
    fp8_first = 0

    def __init__(self, experts: nn.Module, name: str = "experts", pow2: bool = False):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = experts.gate_proj, experts.up_proj, experts.down_proj
        self.fp8_name, self.fp8_pow2 = name, pow2

    def _swiglu(self, x, gate, up, down, e):
        n, p = f"{self.fp8_name}.{e + self.fp8_first}", self.fp8_pow2
        h = F.silu(fp8_linear(x, gate, None, p, f"{n}.gate_proj")) * fp8_linear(x, up, None, p, f"{n}.up_proj")
        return fp8_linear(h, down, None, p, f"{n}.down_proj")

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return self._swiglu(x, self.gate_proj[e], self.up_proj[e], self.down_proj[e], e)

    def grouped(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x (M, D) sorted by expert, counts (E,) → (M, D): one FP8 SwiGLU per non-empty expert."""
        # unbind: its backward stacks the per-expert gradients once (indexing would add E full-size zeros)
        w = [p.unbind(0) for p in (self.gate_proj, self.up_proj, self.down_proj)]
        ys = [self._swiglu(xe, w[0][e], w[1][e], w[2][e], e)
              for e, xe in enumerate(x.split(counts.tolist())) if len(xe)]
        if not ys:
            return x.new_empty(x.shape)
        return torch.cat([y.to(ys[0].dtype) for y in ys])


def to_fp8_training(model: nn.Module, pow2: bool = False) -> list[str]:
    """Put the FP8 GEMMs into ``model``'s linears and routed experts (in place, Parameters kept, so an
    optimizer built before or after sees the same tensors). Returns the converted module names."""
    done = []
    for name, m in list(model.named_modules()):
        if is_fp8_linear(name, m):
            m.__class__ = FP8TrainLinear
            m.fp8_name, m.fp8_pow2 = name, pow2
            done.append(name)
        elif name.endswith("mlp.experts"):
            if not is_experts(m) or type(m).__name__ == "EPExperts":
                raise ValueError(f"{name}: FP8 training does not convert {type(m).__name__} (expert parallelism "
                                 "already applied); call to_fp8_training before parallel.parallelize")
            _replace(model, name, FP8TrainExperts(m, name, pow2))
            done.append(name)
    return done


# ---- inference: E4M3 weights kept in memory -----------------------------------------------------
def _blocks(*shape) -> tuple[int, ...]:
    return (*shape[:-2], -(-shape[-2] // WEIGHT[0]), -(-shape[-1] // WEIGHT[1]))


class FP8Linear(nn.Module):
    """A frozen linear whose weight is held as float8_e4m3fn (O, I) plus ``weight_scale_inv`` fp32
    (⌈O/128⌉, ⌈I/128⌉) — the state-dict names of DeepSeek's checkpoints. ``weight`` reads as the
    dequantized matrix in ``dtype`` (kept once read); forward dequantizes per call (CPU) or runs the FP8
    GEMM on activations quantized in 1×128 tiles (CUDA ≥ 8.9); a decode step's few bf16 rows on the CPU
    read the E4M3 weight as stored (kernels/linear.py fp8_linear)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype=torch.bfloat16,
                 device=None):
        super().__init__()
        self.in_features, self.out_features, self.dtype = in_features, out_features, dtype
        # Set in _buffers directly: the name "weight" belongs to the property below.
        self._buffers["weight"] = torch.empty(out_features, in_features, dtype=FP8, device=device)
        self._buffers["weight_scale_inv"] = torch.ones(_blocks(out_features, in_features), device=device)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized (O, I) in ``dtype``, kept until the FP8 buffers change: what reads it (MLA's
        absorbed mode reads kv_b_proj's, 0.15% of V3's weights) gets one stable tensor, whose storage
        and version counter stand for the weights as a plain Linear's would."""
        q, s = self._buffers["weight"], self._buffers["weight_scale_inv"]
        stamp = tuple((t.data_ptr(), t.device, None if t.is_inference() else t._version) for t in (q, s))
        cached = self.__dict__.get("_dequantized")
        if cached is None or cached[0] != (stamp, self.dtype):
            with torch.inference_mode(False), torch.no_grad():  # a normal tensor: it has a version counter
                cached = self.__dict__["_dequantized"] = ((stamp, self.dtype), dequantize(q, s, WEIGHT, self.dtype))
        return cached[1]

    def fp8_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The E4M3 weight (O, I) and its ``weight_scale_inv`` as held (MLA's one-token FP8 folds read kv_b_proj's)."""
        return self._buffers["weight"], self._buffers["weight_scale_inv"]

    def forward(self, x):
        q, s = self.fp8_weight()
        if native_fp8(x.device):
            y = matmul(quantize(x.reshape(-1, x.shape[-1]), ACT), Quantized(q, s, WEIGHT), x.dtype)
            y = y.view(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias
        y = fp8_linear_rows(x, q, s)  # a decode step's few rows on the CPU: the FP8 weight read as stored
        if y is None:
            return F.linear(x, dequantize(q, s, WEIGHT, x.dtype), self.bias)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 128x128 blocks"


class FP8Experts(nn.Module):
    """Routed experts held as E4M3 stacks (E, I, D), (E, I, D), (E, D, I) plus ``<proj>_scale_inv``
    (E, ⌈·/128⌉, ⌈·/128⌉) each; an expert is multiplied only when tokens reach it (dequantized to the
    input's dtype, or a few bf16 rows on the CPU straight from E4M3)."""

    def __init__(self, n: int, dim: int, inter: int, device=None):
        super().__init__()
        for p, shape in zip(PROJ, ((n, inter, dim), (n, inter, dim), (n, dim, inter))):
            self.register_buffer(p, torch.empty(shape, dtype=FP8, device=device))
            self.register_buffer(p + "_scale_inv", torch.ones(_blocks(*shape), device=device))

    def _mm(self, p: str, e: int, x: torch.Tensor) -> torch.Tensor:
        """x @ Wᵀ for expert e's matrix p: a few rows on the CPU read the E4M3 weight as stored, else dequantized."""
        q, s = getattr(self, p)[e], getattr(self, p + "_scale_inv")[e]
        y = fp8_linear_rows(x, q, s)
        return x @ dequantize(q, s, WEIGHT, x.dtype).t() if y is None else y

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return self._mm("down_proj", e, F.silu(self._mm("gate_proj", e, x)) * self._mm("up_proj", e, x))

    def grouped(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x (M, D) sorted by expert, counts (E,) → (M, D)."""
        ys = [self.expert(e, xe) for e, xe in enumerate(x.split(counts.tolist())) if len(xe)]
        return torch.cat(ys) if ys else x.new_empty(x.shape)


def to_fp8_inference(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> list[str]:
    """Replace the FP8 candidates with FP8Linear / FP8Experts on ``model``'s device (meaningful on a
    meta model about to be loaded: the new buffers are uninitialized). Returns the replaced names."""
    done = []
    for name, m in list(model.named_modules()):
        device = next(m.parameters(), torch.empty(0)).device
        if is_fp8_linear(name, m):
            _replace(model, name, FP8Linear(m.in_features, m.out_features, m.bias is not None, dtype, device))
            done.append(name)
        elif name.endswith("mlp.experts") and is_experts(m):
            E, inter, dim = m.gate_proj.shape
            _replace(model, name, FP8Experts(E, dim, inter, device))
            done.append(name)
    return done


def holds_fp8(model: nn.Module) -> bool:
    return any(t.dtype == FP8 for t in model.state_dict().values())

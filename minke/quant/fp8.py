"""Block-wise FP8 (DeepSeek-V3 §3.3): E4M3 values with one fp32 scale per tile or block.

- Weights: one scale per 128×128 block (``WEIGHT``); activations and gradients: one per 1×128 tile
  (``ACT``) along the contracted dimension. DeepSeek's checkpoints store ``W_fp8`` plus
  ``weight_scale_inv`` (edge blocks partial) with W ≈ W_fp8 · scale_inv blockwise.
- Scales come online from each block's absolute maximum, mapped onto E4M3's largest value 448;
  ``pow2=True`` rounds them up to a power of two (V3.1's UE8M0 scales), which makes q · scale exact.
- ``fp8_linear``: y = x·Wᵀ whose three GEMMs (forward, input gradient, weight gradient) all take FP8
  operands with FP32 accumulation. Forward: x in 1×128 tiles, W in 128×128 blocks; input gradient:
  dy in 1×128 tiles, the same W blocks; weight gradient: dyᵀ and xᵀ in 1×128 tiles along the tokens
  (the 128×1 tiles of V3 Fig. 7).
- The GEMM: ``torch._scaled_mm`` with block-wise scales on CUDA with compute capability ≥ 8.9 once its
  self-check passes (torch has this kernel for Hopper, SM90, with cuBLASLt ≥ 12.9; on Ada and Blackwell
  the check fails and says so); everywhere else exact emulation — dequantize the FP8 operands (q · scale, fp32) and
  matmul in fp32, so the numerics are the same FP8 rounding, testable on a CPU. The CPU build of torch
  has ``_scaled_mm`` only with tensor- or row-wise scales (block-wise would take one call per 128 of K),
  and it is no faster than the emulation, so it is not used (measured for issue 14).
- On the CPU, quantize and dequantize run kernels/decode.cpp's fp8_quantize / fp8_dequantize (one
  pass over the data instead of torch's dozen elementwise ones); the torch code below is their
  reference, equal bit for bit (tests/test_fp8.py), and runs wherever the kernels are not built.

Error bound of one quantized element (derived in tests/test_fp8.py): with s the block's scale,
|x − q·s| ≤ 2⁻⁴·|x| + 2⁻¹⁰·s (3 mantissa bits: half an ulp is 2⁻⁴ relative; below E4M3's smallest
normal 2⁻⁶ the ulp is 2⁻⁹).

Shape legend: M rows (tokens), K contracted dim, N output features, b the block size.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..kernels.cpp import cpp_kernels

E4M3_MAX = 448.0
BLOCK = 128
ACT = (1, BLOCK)  # activation / gradient tiles: 1×128 along the last (contracted) dim
WEIGHT = (BLOCK, BLOCK)  # weight blocks
FP8 = torch.float8_e4m3fn
MIN_AMAX = 1e-12  # an all-zero block gets a tiny finite scale (its values quantize to 0 exactly)


class Quantized(NamedTuple):
    """x ≈ q · scale_inv per block: q float8_e4m3fn (..., R, C), scale_inv fp32 (..., ⌈R/br⌉, ⌈C/bc⌉)."""
    q: torch.Tensor
    scale_inv: torch.Tensor
    block: tuple[int, int]

    def t(self) -> "Quantized":
        """The transpose, same numbers: blocks (br, bc) become (bc, br)."""
        return Quantized(self.q.transpose(-1, -2), self.scale_inv.transpose(-1, -2), self.block[::-1])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.q, self.scale_inv, self.block, dtype)


def _grid(shape, block) -> tuple[int, int]:
    return -(-shape[-2] // block[0]), -(-shape[-1] // block[1])


def expand(scale: torch.Tensor, shape, block) -> torch.Tensor:
    """Per-block scales (..., ⌈R/br⌉, ⌈C/bc⌉) → per-element (..., R, C), cropping the partial edge blocks."""
    br, bc = block
    s = scale if br == 1 else scale.repeat_interleave(br, -2)[..., : shape[-2], :]
    return s if bc == 1 else s.repeat_interleave(bc, -1)[..., : shape[-1]]


def scales_from_amax(amax: torch.Tensor, pow2: bool = False) -> torch.Tensor:
    """scale_inv = amax / 448 (the block's largest value lands on E4M3's largest), or with ``pow2`` the
    smallest power of two at least that large (UE8M0), so that every |x| / scale_inv ≤ 448."""
    s = amax.float().clamp(min=MIN_AMAX) / E4M3_MAX
    if pow2:
        m, e = torch.frexp(s)  # s = m · 2^e, m in [0.5, 1); s is already a power of two when m == 0.5
        s = torch.ldexp(torch.ones_like(s), e - (m == 0.5).to(e.dtype))
    return s


def check_finite(x: torch.Tensor, name: str) -> None:
    """Raise naming ``name``, the count and the first non-finite element's index and value."""
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name}: {int(bad.sum())} non-finite value(s) in a {tuple(x.shape)} tensor to quantize "
                         f"to FP8, the first {float(x[idx])} at index {idx}")


def _blocked(x: torch.Tensor, block) -> torch.Tensor:
    """x (..., R, C) → (..., R/br, br, C/bc, bc), zero-padded where the edge blocks are partial."""
    nr, nc = _grid(x.shape, block)
    pr, pc = nr * block[0] - x.shape[-2], nc * block[1] - x.shape[-1]
    if pr or pc:
        x = F.pad(x, (0, pc, 0, pr))
    return x.reshape(*x.shape[:-2], nr, block[0], nc, block[1])


def _unblocked(x: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of _blocked: (..., R/br, br, C/bc, bc) → (..., R, C), the padding cropped."""
    x = x.reshape(*x.shape[:-4], x.shape[-4] * x.shape[-3], x.shape[-2] * x.shape[-1])
    R, C = shape[-2:]
    return x if x.shape[-2:] == (R, C) else x[..., :R, :C].contiguous()


def quantize(x: torch.Tensor, block: tuple[int, int] = ACT, pow2: bool = False,
             name: str = "tensor") -> Quantized:
    """x (..., R, C) → Quantized with one scale per (br, bc) block of the last two dims (edge blocks
    partial). A non-finite value is an error naming ``name`` and its index."""
    if x.dim() < 2:
        raise ValueError(f"{name}: FP8 block quantization needs at least 2 dims, got shape {tuple(x.shape)}")
    k = _cpu_kernels(x)
    if k is not None:
        return _quantize_cpp(k, x, tuple(block), pow2, name)
    blocks = _blocked(x.float(), block)  # (..., nr, br, nc, bc)
    amax = blocks.abs().amax(dim=(-3, -1))  # (..., nr, nc)
    if not bool(torch.isfinite(amax).all()):  # NaN and inf survive amax: one small check, then find where
        check_finite(x, name)
    s = scales_from_amax(amax, pow2)
    q = (blocks / s[..., :, None, :, None]).clamp_(-E4M3_MAX, E4M3_MAX).to(FP8)
    return Quantized(_unblocked(q, x.shape), s, tuple(block))


def dequantize(q: torch.Tensor, scale_inv: torch.Tensor, block=WEIGHT, dtype: torch.dtype = torch.float32,
               name: str = "weight") -> torch.Tensor:
    """q (..., R, C) · scale_inv per block → dtype. A scale of the wrong shape is an error naming both shapes."""
    if q.dim() < 2:
        raise ValueError(f"{name}: FP8 block dequantization needs a 2-D weight, got shape {tuple(q.shape)}")
    want = (*q.shape[:-2], *_grid(q.shape, block))
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"{name}: weight_scale_inv has shape {tuple(scale_inv.shape)}, expected {want} for a "
                         f"{tuple(q.shape)} weight in {block[0]}×{block[1]} blocks")
    k = _cpu_kernels(q)
    if k is not None and dtype in (torch.float32, torch.bfloat16):
        return _dequantize_cpp(k, q, scale_inv, tuple(block), dtype)
    x = _blocked(e4m3_as_fp16(q).float(), block) * (scale_inv.float() * 256.0)[..., :, None, :, None]
    return _unblocked(x, q.shape).to(dtype)


def _cpu_kernels(x: torch.Tensor):
    """kernels/decode.cpp's fp8_quantize / fp8_dequantize for a CPU tensor, else None (the torch path
    beside them is their reference, equal bit for bit: tests/test_fp8.py)."""
    return cpp_kernels() if x.device.type == "cpu" else None


def _transposed(x: torch.Tensor) -> bool:
    """Whether x is a transposed view of a contiguous tensor (quantize(xᵀ) in the FP8 backward)."""
    return not x.is_contiguous() and x.transpose(-1, -2).is_contiguous()


def _quantize_cpp(k, x: torch.Tensor, block, pow2: bool, name: str) -> Quantized:
    if _transposed(x):  # the same blocks, transposed: no copy of x
        return _quantize_cpp(k, x.transpose(-1, -2), block[::-1], pow2, name).t()
    if x.dtype not in (torch.float32, torch.bfloat16):
        x = x.float()
    q, s = k.fp8_quantize(x.contiguous(), block[0], block[1], pow2)
    if not bool(torch.isfinite(s).all()):
        check_finite(x, name)
    return Quantized(q.view(FP8), s, block)


def _dequantize_cpp(k, q: torch.Tensor, s: torch.Tensor, block, dtype: torch.dtype) -> torch.Tensor:
    if _transposed(q) and _transposed(s):
        return _dequantize_cpp(k, q.transpose(-1, -2), s.transpose(-1, -2), block[::-1], dtype).transpose(-1, -2)
    return k.fp8_dequantize(q.contiguous().view(torch.uint8), s.float().contiguous(), block[0], block[1],
                            dtype == torch.bfloat16)


def e4m3_as_fp16(q: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn → float16 holding q · 2⁻⁸ exactly, by moving bits: E4M3's sign, 4 exponent and 3
    mantissa bits are an fp16's sign, low 4 exponent and top 3 mantissa bits, subnormals included (the
    exponent biases differ by 8). torch's own E4M3 → fp32 cast runs ~35x slower on CPU (measured);
    fp16 → fp32 is exact and fast, and the 2⁸ goes into the scale (exact: a power of two)."""
    v = q.view(torch.uint8).to(torch.int16)
    return ((v << 8 & -32768) | (v << 7 & 0x3F80)).view(torch.float16)


def quantize_weight(w: torch.Tensor, block: int = BLOCK, pow2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """w (O, I) → (float8_e4m3fn (O, I), scale_inv fp32 (⌈O/b⌉, ⌈I/b⌉)): DeepSeek's checkpoint format."""
    qw = quantize(w, (block, block), pow2, "weight")
    return qw.q, qw.scale_inv


def dequantize_weight(q: torch.Tensor, scale_inv: torch.Tensor, block: int = BLOCK,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of quantize_weight: W = W_fp8 · scale_inv per block."""
    return dequantize(q, scale_inv, (block, block), dtype)


# ---- the GEMM -----------------------------------------------------------------------------------
_native: dict[str, bool] = {}  # per CUDA device: did torch._scaled_mm pass its self-check (below)?


def _scaled_mm(a: Quantized, b: Quantized, out_dtype: torch.dtype) -> torch.Tensor:
    """a (M, K) in 1×128 tiles @ b (N, K)ᵀ in 1×128 tiles or 128×128 blocks on torch._scaled_mm, in the
    layouts its CUDA kernel accepts (aten/src/ATen/native/cuda/ScaledBlas.cpp): a row-major and b
    column-major; a's scales (M, ⌈K/128⌉) with M fastest; b's (⌈K/128⌉, N) with N fastest, or 128×128
    blocks (⌈K/128⌉, ⌈N/128⌉) with K fastest, whatever views a and b are (the input gradient's W is a
    transposed one). K and N must be multiples of 16, which a layer's width or an expert's token count
    (K of the weight gradient) need not be: both are zero-padded to the next multiple (exact: zeros add
    nothing, and the padding stays inside the last 128-block, so the scales keep their shapes)."""
    (M, K), N = a.q.shape, b.q.shape[0]
    if M == 0:  # no rows: the kernel's scale-stride check cannot hold for an empty scale_a
        return a.q.new_zeros(0, N, dtype=out_dtype)
    pk, pn = -K % 16, -N % 16
    qa, qb, sb = a.q, b.q, b.scale_inv
    if pk:
        qa = F.pad(qa.view(torch.uint8), (0, pk)).view(FP8)  # E4M3's byte 0 is +0
    if pk or pn:
        qb = F.pad(qb.view(torch.uint8), (0, pk, 0, pn)).view(FP8)
        if b.block == ACT and pn:
            sb = F.pad(sb, (0, 0, 0, pn), value=1.0)  # the padded rows' tiles
    scale_a = a.scale_inv.t().contiguous().t()
    scale_b = sb.t().contiguous() if b.block == ACT else sb.contiguous().t()
    y = torch._scaled_mm(qa.contiguous(), qb.contiguous().t(), scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)
    return y[:, :N].contiguous() if pn else y


def native_fp8(device: torch.device) -> bool:
    """Whether FP8 GEMMs on ``device`` run torch._scaled_mm with block-wise scales: CUDA with compute
    capability ≥ 8.9, and only once the kernel has matched the emulation on a small problem of each
    tiling (a kernel that refuses, or disagrees, is dropped with a one-line notice: emulation instead)."""
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return False
    key = f"cuda:{torch.cuda.current_device() if device.index is None else device.index}"  # "cuda" is "cuda:0"
    if key not in _native:
        _native[key] = False
        if torch.cuda.get_device_capability(device) < (8, 9):
            return False
        try:
            g = torch.Generator(device).manual_seed(0)
            # aligned shapes, and ones that take the padding (an expert's 37 tokens, a width of 200)
            for m, n, k in ((256, 512, 384), (37, 72, 200)):
                x, w = torch.randn(m, k, device=device, generator=g), torch.randn(n, k, device=device, generator=g)
                for b in (quantize(w, WEIGHT), quantize(w, ACT)):
                    got, want = _scaled_mm(quantize(x, ACT), b, torch.float32), _emulated(quantize(x, ACT), b)
                    if not torch.allclose(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max())):
                        raise RuntimeError(f"result off by {float((got - want).abs().max()):.3g} from the emulation")
            _native[key] = True
        except (RuntimeError, ValueError, NotImplementedError, TypeError) as e:
            warnings.warn(f"FP8 on {device}: torch._scaled_mm with block-wise scales unusable "
                          f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); emulating FP8 GEMMs")
    return _native[key]


def _emulated(a: Quantized, b: Quantized, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    with torch.autocast(a.q.device.type, enabled=False):
        return (a.dequantize() @ b.dequantize().t()).to(out_dtype)


def matmul(a: Quantized, b: Quantized, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """a (M, K) @ b (N, K)ᵀ → (M, N) from FP8 operands, FP32 accumulation. a's blocks must be 1×128
    tiles along K; b's 1×128 tiles or 128×128 blocks. CUDA ≥ 8.9: the FP8 kernel; else exact emulation."""
    if native_fp8(a.q.device):
        return _scaled_mm(a, b, out_dtype)
    if a.q.device.type not in _noticed:
        _noticed.add(a.q.device.type)
        warnings.warn(f"FP8 GEMMs on {a.q.device.type}: no FP8 kernel here (torch._scaled_mm with block-wise "
                      "scales needs CUDA compute capability >= 8.9); emulating them exactly in fp32", stacklevel=2)
    return _emulated(a, b, out_dtype)


_noticed: set[str] = set()  # device types told once that their FP8 GEMMs are emulated


# ---- the FP8 linear (training) ------------------------------------------------------------------
class _FP8Linear(torch.autograd.Function):
    """y = x·Wᵀ with all three GEMMs on FP8 operands (see the module docstring for the tilings).
    Saves x and W's FP8 blocks; the backward quantizes dy (twice: tiles along N and along M) and xᵀ."""

    @staticmethod
    def forward(ctx, x, w, out_dtype, pow2, name):
        K = x.shape[-1]
        x2 = x.reshape(-1, K)  # (M, K)
        wq = quantize(w, WEIGHT, pow2, f"{name}: weight")
        y = matmul(quantize(x2, ACT, pow2, f"{name}: input"), wq, out_dtype)
        ctx.save_for_backward(x2, wq.q, wq.scale_inv)
        ctx.pow2, ctx.name, ctx.x_shape, ctx.x_dtype, ctx.w_dtype = pow2, name, x.shape, x.dtype, w.dtype
        return y.view(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, gy):
        x2, q, s = ctx.saved_tensors
        g2 = gy.reshape(-1, gy.shape[-1])  # (M, N)
        pow2, name = ctx.pow2, ctx.name
        dx = dw = None
        if ctx.needs_input_grad[0]:  # dx = dy · W: dy in tiles along N, Wᵀ (K, N) in the same blocks
            g = quantize(g2, ACT, pow2, f"{name}: output gradient")
            dx = matmul(g, Quantized(q, s, WEIGHT).t(), ctx.x_dtype).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:  # dW = dyᵀ · x: both in tiles along the M tokens
            gt = quantize(g2.t(), ACT, pow2, f"{name}: output gradient")
            xt = quantize(x2.t(), ACT, pow2, f"{name}: input")
            dw = matmul(gt, xt, ctx.w_dtype)
        return dx, dw, None, None, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, pow2: bool = False,
               name: str = "fp8_linear") -> torch.Tensor:
    """x (..., K) · weight (N, K)ᵀ (+ bias) → (..., N) through FP8 GEMMs in all three products. The
    output dtype is autocast's when it is on (as F.linear's would be), else x's. ``name`` names the
    layer in errors (a non-finite input, weight or gradient)."""
    dt = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    y = _FP8Linear.apply(x, weight, dt, pow2, name)
    return y if bias is None else y + bias.to(dt)


# ---- the FP8 latent cache row -------------------------------------------------------------------
def latent_bytes(C: int) -> int:
    """Bytes of one cached latent row: C E4M3 values, then one fp32 scale per 128 (FlashMLA's FP8 layout:
    C = 512 → 512 + 16 bytes, plus the BF16 rope key kept apart: 656 per token and layer)."""
    return C + 4 * -(-C // BLOCK)


def pack_latent(c: torch.Tensor) -> torch.Tensor:
    """c (..., C) → uint8 (..., latent_bytes(C)): 1×128 tiles to E4M3, the scales' bytes after the values,
    so that a cache row is one plain byte row (block copies, gathers and forks move it unchanged)."""
    qc = quantize(c.reshape(-1, c.shape[-1]), ACT, name="latent cache c_kv")
    row = torch.cat([qc.q.view(torch.uint8), qc.scale_inv.contiguous().view(torch.uint8)], dim=-1)
    return row.view(*c.shape[:-1], -1)


def unpack_latent(row: torch.Tensor, C: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of pack_latent: uint8 (..., latent_bytes(C)) → (..., C) in ``dtype``."""
    flat = row.reshape(-1, row.shape[-1])
    q = flat[:, :C].view(FP8)
    s = flat[:, C:].contiguous().view(torch.float32)  # (M, ⌈C/128⌉)
    return dequantize(q, s, ACT, dtype, "latent cache").view(*row.shape[:-1], C)

"""FP8 GEMM speed against the baseline dtype on DeepSeek-V3's matrix shapes (issue 14's GPU item).

For each weight shape N×K at M tokens, three pairs, minke's FP8 against torch in ``--dtype`` (bf16 on a
GPU), timed in the same run, arms interleaved:

- ``gemm``: the product alone, operands already FP8 (x in 1×128 tiles, W in 128×128 blocks) →
  ``minke.quant.fp8.matmul``, against ``x @ Wᵀ``;
- ``linear``: an inference linear whose weight is kept FP8: quantize x, then the GEMM;
- ``train``: ``fp8_linear`` forward + backward (three FP8 GEMMs, W, x and dy quantized on the fly)
  against ``F.linear``'s.

Per pair: milliseconds per call (``--calls`` back to back between two synchronizations, median over
``--repeats`` such rounds), TFLOP/s (2·M·N·K per GEMM), ``speedup`` = baseline ms / FP8 ms (> 1: FP8
faster), and each output's relative error against an fp32 product of the unquantized operands
(‖y − y₃₂‖ / ‖y₃₂‖; the training pair also its two gradients'): bf16's 8 significant bits give ~0.3% on
random operands, E4M3's 4 give ~4% (independent rounding errors grow with a sum as √K, as the sum
does). ``native`` says whether torch._scaled_mm ran (CUDA, compute capability ≥ 8.9, after its
self-check) or the exact emulation did (dequantize, then an fp32 GEMM: slower than the baseline by
construction; it exists to test the numerics, not for speed). The FP8 ``linear`` and ``train`` arms
include minke's quantization as it runs on that device (on CUDA, torch ops and one host sync per
quantize for the non-finite check).

Default shapes: V3's routed expert (moe_intermediate 2048 × hidden 7168: gate/up and down) and dense
FFN (intermediate 18432: gate/up and down), at 4096 tokens.

    .venv/bin/python benchmarks/fp8_gemm.py --device cuda                    # H100/H200: V3's shapes
    .venv/bin/python benchmarks/fp8_gemm.py --tokens 256 --shapes 1024x768 768x1024  # CPU, emulated

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

from minke.quant.fp8 import ACT, WEIGHT, fp8_linear, matmul, native_fp8, quantize

V3_SHAPES = {"expert_gate_up": (2048, 7168), "expert_down": (7168, 2048),
             "dense_gate_up": (18432, 7168), "dense_down": (7168, 18432)}


def parse_shape(s: str) -> tuple[int, int]:
    try:
        n, k = (int(v) for v in s.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {s!r}: expected NxK, e.g. 2048x7168") from None
    if n < 1 or k < 1:
        raise argparse.ArgumentTypeError(f"shape {s!r}: N and K must be positive")
    return n, k


def timer(device: torch.device, calls: int):
    """A function that runs f ``calls`` times back to back and returns the milliseconds per call, the
    device synchronized only around the batch (so the host's work per call overlaps the GPU's, as in a
    model's forward, instead of counting as idle GPU time)."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    def run(f) -> float:
        sync()
        t0 = time.perf_counter()
        for _ in range(calls):
            f()
        sync()
        return (time.perf_counter() - t0) * 1e3 / calls
    return run


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.detach().float() - ref).norm() / ref.norm())


def bench_shape(M: int, N: int, K: int, dtype: torch.dtype, device: torch.device, warmup: int,
                repeats: int, calls: int) -> dict:
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(M, K, device=device, generator=g)
    w = torch.randn(N, K, device=device, generator=g) * K ** -0.5
    gy = torch.randn(M, N, device=device, generator=g)
    with torch.autocast(device.type, enabled=False):  # fp32 (TF32 off by torch's default for matmul)
        ref, ref_dx, ref_dw = x @ w.t(), gy @ w, gy.t() @ x
    xb, wb, gyb = x.to(dtype), w.to(dtype), gy.to(dtype)
    xq, wq = quantize(xb, ACT), quantize(wb, WEIGHT)
    grads = {}

    def train(fp8: bool):
        xg = xb.detach().requires_grad_()
        wg = wb.detach().requires_grad_()
        y = fp8_linear(xg, wg) if fp8 else F.linear(xg, wg)
        y.backward(gyb)
        grads[fp8] = xg.grad, wg.grad
        return y

    arms = {"gemm": (lambda: xb @ wb.t(), lambda: matmul(xq, wq, dtype)),
            "linear": (lambda: xb @ wb.t(), lambda: matmul(quantize(xb, ACT), wq, dtype)),
            "train": (lambda: train(False), lambda: train(True))}
    clock = timer(device, calls)
    out = {"M": M, "N": N, "K": K}
    for name, (base, fp8) in arms.items():
        for _ in range(warmup):
            base(), fp8()
        times = {"base": [], "fp8": []}
        for _ in range(repeats):  # interleaved: drift of the machine hits both arms alike
            times["base"].append(clock(base))
            times["fp8"].append(clock(fp8))
        ms = {k: statistics.median(v) for k, v in times.items()}
        flop = 2 * M * N * K * (3 if name == "train" else 1)
        out[name] = {"base_ms": ms["base"], "fp8_ms": ms["fp8"], "speedup": ms["base"] / ms["fp8"],
                     "base_tflops": flop / ms["base"] / 1e9, "fp8_tflops": flop / ms["fp8"] / 1e9,
                     "fp8_rel_err": rel_err(fp8(), ref), "base_rel_err": rel_err(base(), ref)}
        if name == "train":  # the two gradients' errors too (grads holds the last call's)
            for arm, is_fp8 in (("fp8", True), ("base", False)):
                dx, dw = grads[is_fp8]
                out[name][f"{arm}_rel_err_dx"], out[name][f"{arm}_rel_err_dw"] = rel_err(dx, ref_dx), rel_err(dw, ref_dw)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                   help="the baseline's dtype (default: bfloat16 on CUDA, float32 on the CPU, where bf16 GEMMs "
                        "without AVX-512 run ~100x slower)")
    p.add_argument("--tokens", type=int, default=4096, help="M, rows of x")
    p.add_argument("--shapes", type=parse_shape, nargs="+", default=None,
                   help="weight shapes NxK (default: V3's expert and dense FFN matrices)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10, help="timed rounds (the median is reported)")
    p.add_argument("--calls", type=int, default=20, help="calls per timed round, back to back")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = getattr(torch, a.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    shapes = {f"{n}x{k}": (n, k) for n, k in a.shapes} if a.shapes else V3_SHAPES
    native = native_fp8(device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="FP8 GEMMs on")  # the emulation's notice: ``native`` says it
        results = {name: bench_shape(a.tokens, n, k, dtype, device, a.warmup, a.repeats, a.calls)
                   for name, (n, k) in shapes.items()}
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."), "native": native,
              "tokens": a.tokens, "shapes": results}
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()

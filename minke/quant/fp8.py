"""Block-wise FP8 (DeepSeek-V3 §3.3): E4M3 values with one fp32 scale per 128×128 weight block.

DeepSeek's checkpoints store ``W_fp8`` plus ``weight_scale_inv`` (one per block, edge blocks
partial) with W ≈ W_fp8 · scale_inv blockwise; the scale maps each block's amax onto E4M3's 448.
"""

from __future__ import annotations

import torch

E4M3_MAX = 448.0
BLOCK = 128


def _expand(scale: torch.Tensor, shape, block: int) -> torch.Tensor:
    """(ceil(O/b), ceil(I/b)) per-block scales → (O, I), cropping the partial edge blocks."""
    return scale.repeat_interleave(block, 0)[: shape[0]].repeat_interleave(block, 1)[:, : shape[1]]


def quantize_weight(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """w (O, I) → (float8_e4m3fn (O, I), scale_inv fp32 (ceil(O/b), ceil(I/b)))."""
    O, I = w.shape
    nb_o, nb_i = -(-O // block), -(-I // block)
    padded = torch.zeros(nb_o * block, nb_i * block, dtype=torch.float32, device=w.device)
    padded[:O, :I] = w.float()
    amax = padded.view(nb_o, block, nb_i, block).abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale_inv = amax / E4M3_MAX
    q = (w.float() / _expand(scale_inv, w.shape, block)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale_inv


def dequantize_weight(q: torch.Tensor, scale_inv: torch.Tensor, block: int = BLOCK,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of quantize_weight: W = W_fp8 · scale_inv per block."""
    if q.dim() != 2:
        raise ValueError(f"FP8 block dequantization needs a 2-D weight, got shape {tuple(q.shape)}")
    want = (-(-q.shape[0] // block), -(-q.shape[1] // block))
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"weight_scale_inv has shape {tuple(scale_inv.shape)}, expected {want} for a "
                         f"{tuple(q.shape)} weight in {block}×{block} blocks")
    return (q.float() * _expand(scale_inv.float(), q.shape, block)).to(dtype)

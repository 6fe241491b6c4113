"""Building blocks: RMSNorm, rotary embedding with YaRN (DeepSeek-V2 §2.1.3, YaRN paper), the dense MLP.

Shape legend: B batch, T tokens, H heads, R rope dims (qk_rope_head_dim), D hidden.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig, yarn_mscale


class RMSNorm(nn.Module):
    """y = x / rms(x) · w, computed in fp32 and cast back (as the released models do)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (R/2,) and the cos/sin magnitude.

    With YaRN, low-frequency dims (wavelength beyond the original context) are interpolated by
    ``factor``, high-frequency dims kept, and a linear ramp between beta_slow and beta_fast
    rotations blends the two. The magnitude is mscale(factor, mscale) / mscale(factor, mscale_all_dim),
    1.0 for every released DeepSeek config; the attention temperature itself lives in the softmax scale.
    """
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    y = cfg.yarn
    if y is None:
        return inv_freq, 1.0
    factor = float(y["factor"])
    orig = y["original_max_position_embeddings"]
    beta_fast, beta_slow = y.get("beta_fast") or 32, y.get("beta_slow") or 1

    def correction_dim(rotations):  # the dim whose wavelength makes `rotations` turns over `orig` tokens
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    m, m_all = y.get("mscale"), y.get("mscale_all_dim")
    magnitude = yarn_mscale(factor, m) / yarn_mscale(factor, m_all) if (m and m_all) else yarn_mscale(factor)
    return inv_freq, float(magnitude)


def softmax_scale(cfg: ModelConfig) -> float:
    """(qk_nope + qk_rope)^-0.5, times mscale² when YaRN extends the context (V3 §4.3)."""
    scale = cfg.qk_head_dim ** -0.5
    y = cfg.yarn
    if y is not None and y.get("mscale_all_dim"):
        m = yarn_mscale(float(y["factor"]), y["mscale_all_dim"])
        scale = scale * m * m
    return scale


class Rotary(nn.Module):
    """Gives (cos, sin) of shape (B, T, R/2) for integer positions (B, T)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # A plain fp32 attribute, not a buffer: it survives meta-device construction and dtype casts.
        with torch.device("cpu"):
            self.inv_freq, self.magnitude = rope_frequencies(cfg)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions[..., None].float() * self.inv_freq
        return freqs.cos() * self.magnitude, freqs.sin() * self.magnitude


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0, x1), (x2, x3)… as DeepSeek's released weights expect.

    x: (B, T, H, R) or (B, T, R); cos/sin: (B, T, R/2). Computed in fp32, returned in x's dtype,
    layout unchanged (pairs stay interleaved).
    """
    if x.dim() == 4:
        cos, sin = cos[:, :, None], sin[:, :, None]
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) · up(x)). Dense layers and shared experts."""

    def __init__(self, dim: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter, bias=False)
        self.up_proj = nn.Linear(dim, inter, bias=False)
        self.down_proj = nn.Linear(inter, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

"""MLA latent cache: per token and layer only c_kv (kv_lora_rank) and k_pe (qk_rope_head_dim).

The model talks to a cache through three calls, so the layout (contiguous here, paged blocks in the
engine) stays the cache's business:
- ``positions(T)`` → (B, T) rotary positions of the next T tokens;
- ``update(layer, c_kv, k_pe)`` → stores the new latents and returns everything the T new tokens may
  attend to, ``(c_kv (B, S, C), k_pe (B, S, R), mask (B, 1, T, S) bool)``;
- ``advance(T)`` after the forward, making the T tokens part of the history.

``LatentCache`` below is the contiguous reference (tests, simple loops); the engine uses the paged
layout in paged.py (``PagedLatentCache``: blocks, block tables, a free pool, rollback).

Shape legend: L layers (MTP layers included), B rows, S max length, C kv_lora_rank, R rope dims.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig


class LatentCache:
    """Contiguous cache with one row per sequence; rows may hold different lengths."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype=torch.float32, device="cpu"):
        L = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
        self.max_len = max_len
        self.c_kv = torch.zeros(L, batch, max_len, cfg.kv_lora_rank, dtype=dtype, device=device)
        self.k_pe = torch.zeros(L, batch, max_len, cfg.qk_rope_head_dim, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self._T = 0

    def positions(self, T: int) -> torch.Tensor:
        if int(self.lengths.max()) + T > self.max_len:
            raise ValueError(f"latent cache full: {int(self.lengths.max())} + {T} tokens > max_len {self.max_len}")
        self._T = T
        return self.lengths[:, None] + torch.arange(T, device=self.lengths.device)

    def update(self, layer: int, c_kv: torch.Tensor, k_pe: torch.Tensor):
        B, T, _ = c_kv.shape
        pos = self.lengths[:, None] + torch.arange(T, device=c_kv.device)  # (B, T)
        rows = torch.arange(B, device=c_kv.device)[:, None]
        self.c_kv[layer, rows, pos] = c_kv.to(self.c_kv.dtype)
        self.k_pe[layer, rows, pos] = k_pe.to(self.k_pe.dtype)
        S = int(self.lengths.max()) + T
        key = torch.arange(S, device=c_kv.device)
        mask = key[None, None, :] <= pos[:, :, None]  # (B, T, S): causal, and nothing past each row's end
        return self.c_kv[layer, :, :S], self.k_pe[layer, :, :S], mask[:, None]

    def advance(self, T: int | None = None) -> None:
        self.lengths += self._T if T is None else T

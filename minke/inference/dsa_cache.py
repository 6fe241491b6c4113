"""Caches for DeepSeek Sparse Attention (V3.2): the indexer keys beside MLA's latents.

Each layer's lightning indexer needs one key (index_head_dim) per cached token; attention then reads
the latents of each query's index_topk selected tokens only. Both caches below extend the latent
caches with the two calls MLA makes under DSA (mla.py ``forward_sparse``):

- ``num_keys(T)`` → S, the history the T new tokens of this forward attend over;
- ``update_indexer(layer, keys, read=True)`` → (keys (B, S, E) of everything the new tokens may attend
  to, or None without ``read``: while S <= index_topk nothing is scored, so the keys are only stored; mask);
- ``update_selected(layer, c_kv, k_pe, idx)`` → stores the new latents like ``update`` and returns
  those of the selected tokens only, as rows [c_kv ‖ k_pe] (B, T, K, C+R) (one buffer: attention
  scores them with one GEMM over C+R).

``DSAPagedCache`` keeps the indexer keys in a third pool with the same slots as the latents, so block
tables, forks, copy-on-write, truncation (speculative rollback) and freeing cover them unchanged;
``update_selected`` gathers only the K selected slots per query from the latent pools.
``DSALatentCache`` is the contiguous reference (it reads the whole history and gathers from it).

Shape legend: L layers, N slots, B rows, T new tokens, S history incl. the new tokens, K selected
tokens, E index_head_dim, C kv_lora_rank, R rope dims.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig
from ..kernels.attention import select_rows, gather_tokens
from .kv_cache import LatentCache
from .paged import PagedLatentCache


class DSALatentCache(LatentCache):
    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype=torch.float32, device="cpu"):
        super().__init__(cfg, batch, max_len, dtype, device)
        L = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
        self.index_k = torch.zeros(L, batch, max_len, cfg.index_head_dim, dtype=dtype, device=device)

    def num_keys(self, T: int) -> int:
        return int(self.lengths.max()) + T

    def update_indexer(self, layer: int, keys: torch.Tensor, read: bool = True):
        B, T, _ = keys.shape
        pos = self.lengths[:, None] + torch.arange(T, device=keys.device)  # (B, T)
        self.index_k[layer, torch.arange(B, device=keys.device)[:, None], pos] = keys.to(self.index_k.dtype)
        S = self.num_keys(T)
        mask = torch.arange(S, device=keys.device)[None, None, :] <= pos[:, :, None]  # (B, T, S)
        return (self.index_k[layer, :, :S].to(keys.dtype) if read else None), mask[:, None]

    def update_selected(self, layer: int, c_kv: torch.Tensor, k_pe: torch.Tensor, idx: torch.Tensor):
        c, r, _ = self.update(layer, c_kv, k_pe)
        return torch.cat([gather_tokens(c, idx), gather_tokens(r, idx)], dim=-1)  # only the selected rows


class DSAPagedCache(PagedLatentCache):
    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int = 16, dtype=torch.float32,
                 device="cpu", mtp: bool = False):
        super().__init__(cfg, num_blocks, block_size, dtype, device, mtp)
        self.index_k = torch.zeros(self.num_layers, self.num_slots, cfg.index_head_dim, dtype=dtype, device=device)

    @property
    def nbytes(self) -> int:
        return super().nbytes + self.index_k.numel() * self.index_k.element_size()

    def reserve(self, seq, n_tokens: int) -> bool:
        """As PagedLatentCache.reserve; a shared block it copies (copy-on-write) is copied in the indexer
        pool too."""
        before = list(self.tables.get(seq, ()))
        if not super().reserve(seq, n_tokens):
            return False
        bs = self.block_size
        for old, new in zip(before, self.tables[seq]):
            if old != new:
                self.index_k[:, new * bs:(new + 1) * bs] = self.index_k[:, old * bs:(old + 1) * bs]
        return True

    def num_keys(self, T: int) -> int:
        return self._view.S

    def update_indexer(self, layer: int, keys: torch.Tensor, read: bool = True):
        v = self._view
        B, T, _ = keys.shape
        pool = self.index_k[layer]  # (N, E)
        if v.start is not None:
            new = v.start + v.base
            pool[new:new + T] = keys[0]
            return (pool[v.start:v.start + v.S][None].to(keys.dtype) if read else None), v.mask
        pool.index_copy_(0, v.write, keys.reshape(B * T, -1).to(pool.dtype))
        if not read:
            return None, v.mask
        return select_rows(pool, v.gather).view(B, v.S, -1).to(keys.dtype), v.mask

    def update_selected(self, layer: int, c_kv: torch.Tensor, k_pe: torch.Tensor, idx: torch.Tensor):
        """Store the new latents; read back only the slots of the selected tokens idx (B, T, K)."""
        v = self._view
        B, T, K = idx.shape
        pool_c, pool_r = self.c_kv[layer], self.k_pe[layer]  # (N, C), (N, R)
        if v.start is not None:
            new = v.start + v.base
            pool_c[new:new + T] = c_kv[0]
            pool_r[new:new + T] = k_pe[0]
            slots = (v.start + idx).flatten()  # (T·K,)
        else:
            pool_c.index_copy_(0, v.write, c_kv.reshape(B * T, -1).to(pool_c.dtype))
            pool_r.index_copy_(0, v.write, k_pe.reshape(B * T, -1).to(pool_r.dtype))
            slots = v.gather.view(B, v.S).gather(1, idx.reshape(B, T * K)).flatten()  # (B·T·K,)
        C = pool_c.shape[-1]
        rows = pool_c.new_empty(slots.shape[0], C + pool_r.shape[-1])  # [c_kv ‖ k_pe], side by side
        select_rows(pool_c, slots, rows[:, :C])
        select_rows(pool_r, slots, rows[:, C:])
        return rows.view(B, T, K, -1).to(c_kv.dtype)

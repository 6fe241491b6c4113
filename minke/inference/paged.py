"""Paged latent cache: MLA's c_kv and k_pe in fixed-size blocks shared by every sequence.

PagedAttention's layout (vLLM) holding MLA latents instead of per-head K/V: per layer one pool of
``num_blocks × block_size`` slots (slot = block · block_size + offset), L = num_hidden_layers layers,
+ num_nextn_predict_layers with ``mtp=True`` (speculative decoding: the MTP modules cache too; their
layers are only allocated then). A sequence owns a block table (its
blocks in order) and a length; sequences of any lengths share the pool without copies, and a finished,
aborted or preempted sequence hands its blocks back to the free pool at once.

The model talks to it through the protocol of kv_cache.py. The engine first picks the batch with
``begin(seq_ids, T)`` (one row per sequence, T new tokens each); then, per layer, ``update`` writes the
new latents into each row's slots and returns the rows' histories gathered through the block tables
(``select_rows``: any layout; a copy of every row's history) with the mask. A lone sequence whose blocks are
consecutive gets a zero-copy slice of the pool instead (the fast path for batch-1 decode; the free
pool hands out the lowest free blocks, so a sequence running alone is usually consecutive).
``advance`` commits the T tokens; ``truncate`` rolls a sequence back (rejected speculative drafts).

Shared prefixes (parallel sampling, vLLM's fork): ``fork(src, dst)`` gives ``dst`` the blocks of ``src``'s
first tokens without copying; every block carries a reference count, ``free``/``shrink`` decrement it and a
block returns to the free pool at 0. A shared block is read-only: ``reserve`` copies each shared block the
sequence will write into (the partly filled last prompt block) to a private one first (copy-on-write), and
``begin`` refuses a write into a block that is still shared.

Prefix caching (vLLM's automatic prefix caching): a full block whose latents are final can be
``publish``-ed under the hash of its token prefix (``chain_hashes``: hash(parent's hash, the block's
tokens)); ``cached_prefix`` finds the longest run of published blocks for a new sequence's hashes and
``adopt`` gives them to it read-only (reference counts, as for a fork). A published block is never
written again: ``reserve`` copies it first like a shared one. When its last holder lets go it is not
freed but kept, evictable, in least-recently-released order (a sequence's tail blocks go first, so a
prefix is evicted from its end); ``_alloc`` takes never-used free blocks first, then evicts the least
recently released cached block, and never one in use. ``num_free_blocks`` counts both kinds.

FP8 latents (``fp8=True``, FlashMLA's V3.2 layout): each slot's c_kv is one byte row, C E4M3 values in
1×128 tiles and their fp32 scales (minke.quant.fp8.pack_latent: 528 bytes for C = 512), k_pe stays in
``dtype``; rows are quantized as written and dequantized as read, and block copies move the bytes.

Shape legend: L layers, N slots (num_blocks × block_size), B rows, T new tokens per row, S longest
row once the new tokens are in, C kv_lora_rank, R rope dims.
"""

from __future__ import annotations

import hashlib
import heapq
from array import array
from collections import OrderedDict
from dataclasses import dataclass

import torch

from ..config import ModelConfig
from ..kernels.attention import select_rows
from ..quant.fp8 import latent_bytes, pack_latent, unpack_latent


def bytes_per_token(cfg: ModelConfig, dtype: torch.dtype, mtp: bool = False) -> int:
    """Cache bytes one token takes over all L layers (the MTP layers included with ``mtp``)."""
    b = cfg.kv_cache_bytes_per_token(torch.empty((), dtype=dtype).element_size(), mtp=mtp)
    return b["latent"] + b.get("indexer", 0)  # DSA (V3.2): the indexer keys beside the latents


def chain_hashes(tokens: list[int], block_size: int, hashes: list[bytes], n_blocks: int,
                 next_token: bool = False) -> list[bytes]:
    """Extend ``hashes`` (those of the first blocks of ``tokens``, in place) to ``n_blocks``: block k's is
    sha256(block k-1's hash, tokens [k·bs, (k+1)·bs)), so equal hashes mean equal token prefixes (a
    cryptographic hash: one tenant cannot craft a collision into another's prefix). ``next_token``: the
    block's key also holds the token after it (speculative decoding: the MTP layer's entry at a
    position reads the next token's embedding)."""
    bs, extra = block_size, int(next_token)
    for k in range(len(hashes), n_blocks):
        block = tokens[k * bs:(k + 1) * bs + extra]
        if len(block) < bs + extra:
            raise ValueError(f"chain_hashes: block {k} needs {bs + extra} tokens, {len(tokens)} given")
        parent = hashes[k - 1] if k else b""
        hashes.append(hashlib.sha256(parent + array("q", block).tobytes()).digest())
    return hashes


@dataclass
class _View:
    seq_ids: list
    T: int
    positions: torch.Tensor  # (B, T) rotary positions of the new tokens
    mask: torch.Tensor | None  # (B, 1, T, S) bool; None = plain causal (all rows start empty)
    S: int
    write: torch.Tensor | None = None  # (B·T,) slots the new latents go to
    gather: torch.Tensor | None = None  # (B·S,) slots of each row's history, padded with slot 0 (masked)
    start: int | None = None  # fast path: the lone row's history is slots [start, start + S)
    base: int = 0  # fast path: the lone row's length before the new tokens


class PagedLatentCache:
    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int = 16, dtype=torch.float32,
                 device="cpu", mtp: bool = False, fp8: bool = False):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"PagedLatentCache: num_blocks ({num_blocks}) and block_size ({block_size}) must be >= 1")
        self.num_layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if mtp else 0)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.device = torch.device(device)
        N = num_blocks * block_size
        self.fp8, C = fp8, cfg.kv_lora_rank
        self.c_kv = torch.zeros(self.num_layers, N, latent_bytes(C), dtype=torch.uint8, device=device) if fp8 \
            else torch.zeros(self.num_layers, N, C, dtype=dtype, device=device)
        self.k_pe = torch.zeros(self.num_layers, N, cfg.qk_rope_head_dim, dtype=dtype, device=device)
        self._free = list(range(num_blocks))  # a min-heap: the lowest free block first
        self._refs = [0] * num_blocks  # sequences holding each block (0 = free or cached, evictable)
        self._cached: dict[bytes, int] = {}  # prefix hash → its published block
        self._hash_of: dict[int, bytes] = {}  # published block → its prefix hash
        self._evictable: OrderedDict = OrderedDict()  # published blocks nobody holds, least recently released first
        self.tables: dict = {}  # seq id → list of block ids
        self.lengths: dict = {}  # seq id → tokens cached
        self._view: _View | None = None
        self._offsets = torch.arange(block_size, device=device)

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def nbytes(self) -> int:
        return self.c_kv.numel() * self.c_kv.element_size() + self.k_pe.numel() * self.k_pe.element_size()

    # ---- blocks --------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks a reservation can take: never-used free ones and cached ones nobody holds (evictable)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        """Published blocks (prefix cache), held or evictable."""
        return len(self._hash_of)

    @property
    def num_shared_blocks(self) -> int:
        """Blocks held by more than one sequence (a forked prompt's blocks, each counted once)."""
        return sum(r > 1 for r in self._refs)

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def _alloc(self) -> int:
        if self._free:
            b = heapq.heappop(self._free)
        else:  # evict the least recently released cached block (nobody holds it)
            b, _ = self._evictable.popitem(last=False)
            del self._cached[self._hash_of.pop(b)]
        self._refs[b] = 1
        return b

    def _release(self, b: int) -> None:
        self._refs[b] -= 1
        if self._refs[b] == 0:
            if b in self._hash_of:
                self._evictable[b] = None
            else:
                heapq.heappush(self._free, b)

    def _shared_writes(self, seq, n_tokens: int) -> list[int]:
        """Indices in the table of ``seq`` of the shared blocks that writing up to ``n_tokens`` tokens touches."""
        table = self.tables[seq]
        first, end = self.lengths[seq] // self.block_size, min(len(table), self.blocks_for(n_tokens))
        return [i for i in range(first, end) if self._refs[table[i]] > 1 or table[i] in self._hash_of]

    def reserve(self, seq, n_tokens: int) -> bool:
        """Make room for ``n_tokens`` tokens in all for ``seq`` (a new seq starts empty), giving it private
        copies of the shared blocks those tokens would be written into. False, and nothing allocated or
        copied, when the free pool is short."""
        table = self.tables.get(seq)
        have = 0 if table is None else len(table)
        need = max(self.blocks_for(n_tokens) - have, 0)
        cow = [] if table is None else self._shared_writes(seq, n_tokens)
        if need + len(cow) > self.num_free_blocks:
            return False
        if table is None:
            table = self.tables[seq] = []
            self.lengths[seq] = 0
        bs = self.block_size
        for i in cow:  # copy-on-write: every layer's slots of the block, then drop the shared reference
            old, new = table[i], self._alloc()
            self.c_kv[:, new * bs:(new + 1) * bs] = self.c_kv[:, old * bs:(old + 1) * bs]
            self.k_pe[:, new * bs:(new + 1) * bs] = self.k_pe[:, old * bs:(old + 1) * bs]
            self._release(old)
            table[i] = new
        table.extend(self._alloc() for _ in range(need))
        return True

    def fork(self, src, dst, length: int | None = None) -> None:
        """``dst`` (new) shares the blocks holding the first ``length`` tokens of ``src`` (default: all of
        them), read-only until ``reserve`` copies the ones it writes into."""
        if dst in self.tables:
            raise ValueError(f"fork: sequence {dst!r} already has blocks")
        length = self.lengths[src] if length is None else length
        if not 0 <= length <= self.lengths[src]:
            raise ValueError(f"fork: length {length} outside [0, {self.lengths[src]}] of {src!r}")
        table = self.tables[src][:self.blocks_for(length)]
        for b in table:
            self._refs[b] += 1
        self.tables[dst], self.lengths[dst] = list(table), length

    def shrink(self, seq, n_tokens: int) -> None:
        """Hand back the blocks of ``seq`` beyond those ``n_tokens`` tokens need (never below its length)."""
        table = self.tables[seq]
        keep = self.blocks_for(max(n_tokens, self.lengths[seq]))
        while len(table) > keep:
            self._release(table.pop())

    def free(self, seq) -> None:
        for b in reversed(self.tables.pop(seq, ())):  # the tail first: a cached prefix is evicted from its end
            self._release(b)
        self.lengths.pop(seq, None)

    # ---- prefix cache --------------------------------------------------------------------------
    def cached_prefix(self, hashes: list[bytes]) -> list[int]:
        """The published blocks of the longest run of ``hashes`` (a prefix's chain, ``chain_hashes``) cached."""
        out = []
        for h in hashes:
            b = self._cached.get(h)
            if b is None:
                break
            out.append(b)
        return out

    def num_evictable(self, blocks: list[int]) -> int:
        """How many of ``blocks`` nobody holds (adopting them takes them out of ``num_free_blocks``)."""
        return sum(self._refs[b] == 0 for b in blocks)

    def adopt(self, seq, blocks: list[int]) -> None:
        """``seq`` (new) starts with the published ``blocks`` (from ``cached_prefix``) as its first
        tokens, read-only, its length their tokens."""
        if seq in self.tables:
            raise ValueError(f"adopt: sequence {seq!r} already has blocks")
        bad = [b for b in blocks if b not in self._hash_of]
        if bad:
            raise ValueError(f"adopt: block {bad[0]} is not a published prefix block")
        for b in blocks:
            if self._refs[b] == 0:
                del self._evictable[b]
            self._refs[b] += 1
        self.tables[seq], self.lengths[seq] = list(blocks), len(blocks) * self.block_size

    def publish(self, seq, hashes: list[bytes]) -> int:
        """Publish the first len(hashes) blocks of ``seq`` under ``hashes`` (their prefix hashes): the
        caller vouches that their latents are final (only full blocks below its length, computed by the
        current weights). A prefix already published under another block keeps that one. Returns how
        many blocks were newly published."""
        table = self.tables[seq]
        if len(hashes) * self.block_size > self.lengths[seq]:
            raise ValueError(f"publish: {len(hashes)} blocks of {seq!r} but only {self.lengths[seq]} tokens cached")
        new = 0
        for b, h in zip(table, hashes):
            if b in self._hash_of or h in self._cached:
                continue
            self._cached[h], self._hash_of[b] = b, h
            new += 1
        return new

    def reset_prefix_cache(self) -> None:
        """Forget every published prefix (the model's weights changed): evictable blocks become free,
        held ones private to their holders."""
        for b in self._evictable:
            heapq.heappush(self._free, b)
        self._evictable.clear()
        self._cached.clear()
        self._hash_of.clear()

    def truncate(self, seq, length: int) -> None:
        """Forget every token of ``seq`` from ``length`` on (its blocks stay reserved for the next step)."""
        if not 0 <= length <= self.lengths[seq]:
            raise ValueError(f"truncate: length {length} outside [0, {self.lengths[seq]}]")
        self.lengths[seq] = length

    # ---- the model's cache protocol ------------------------------------------------------------
    def begin(self, seq_ids: list, T: int) -> None:
        """Rows for the next forward: T new tokens for each sequence (room must be reserved)."""
        lens = [self.lengths[s] for s in seq_ids]
        for s, n in zip(seq_ids, lens):
            if n + T > len(self.tables[s]) * self.block_size:
                raise RuntimeError(f"sequence {s!r}: {n} + {T} tokens exceed its reserved "
                                   f"{len(self.tables[s]) * self.block_size} slots (reserve first)")
            if self._shared_writes(s, n + T):
                raise RuntimeError(f"sequence {s!r}: tokens {n}..{n + T - 1} would be written into a block "
                                   f"it shares with another sequence or the prefix cache (reserve first: it copies the block)")
        dev, bs = self.device, self.block_size
        S = max(lens) + T
        nb = self.blocks_for(S)
        lens_t = torch.tensor(lens, device=dev)
        positions = lens_t[:, None] + torch.arange(T, device=dev)  # (B, T)
        mask = None
        if any(lens):  # new tokens see their row's history and themselves, causally
            mask = (torch.arange(S, device=dev)[None, None, :] <= positions[:, :, None])[:, None]
        view = _View(list(seq_ids), T, positions, mask, S)
        if len(seq_ids) == 1:
            t = self.tables[seq_ids[0]][:nb]
            if t == list(range(t[0], t[0] + nb)):  # consecutive blocks: one slice, no gather
                view.start, view.base = t[0] * bs, lens[0]
        if view.start is None:
            table = torch.tensor([self.tables[s][:nb] + [0] * (nb - min(nb, len(self.tables[s])))
                                  for s in seq_ids], device=dev)  # (B, nb)
            slots = (table[:, :, None] * bs + self._offsets).flatten(1)[:, :S]  # (B, S)
            view.write = slots.gather(1, positions).flatten()
            view.gather = slots.flatten()
        self._view = view

    def positions(self, T: int) -> torch.Tensor:
        if self._view is None or self._view.T != T:
            raise RuntimeError(f"PagedLatentCache: call begin(seq_ids, {T}) before the forward")
        return self._view.positions

    def update(self, layer: int, c_kv: torch.Tensor, k_pe: torch.Tensor):
        """c_kv (B, T, C), k_pe (B, T, R) → histories c_kv (B, S, C), k_pe (B, S, R), mask (B, 1, T, S)."""
        v = self._view
        B, T, _ = c_kv.shape
        pool_c, pool_r = self.c_kv[layer], self.k_pe[layer]  # (N, C), (N, R)
        if v.start is not None:
            new = v.start + v.base
            pool_c[new:new + T] = pack_latent(c_kv[0]) if self.fp8 else c_kv[0]
            pool_r[new:new + T] = k_pe[0]
            c, r = pool_c[v.start:v.start + v.S][None], pool_r[v.start:v.start + v.S][None]
            return self._latents(c, c_kv), r.to(k_pe.dtype), v.mask
        rows = c_kv.reshape(B * T, -1)
        pool_c.index_copy_(0, v.write, pack_latent(rows) if self.fp8 else rows.to(pool_c.dtype))
        pool_r.index_copy_(0, v.write, k_pe.reshape(B * T, -1).to(pool_r.dtype))
        c = select_rows(pool_c, v.gather).view(B, v.S, -1)
        r = select_rows(pool_r, v.gather).view(B, v.S, -1)
        return self._latents(c, c_kv), r.to(k_pe.dtype), v.mask

    def _latents(self, c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Pool rows (B, S, C or FP8 bytes) → latents (B, S, C) in ``like``'s dtype."""
        return unpack_latent(c, like.shape[-1], like.dtype) if self.fp8 else c.to(like.dtype)

    def advance(self, T: int | None = None) -> None:
        v = self._view
        T = v.T if T is None else T
        for s in v.seq_ids:
            self.lengths[s] += T
        self._view = None

"""Long context: DeepSeek Sparse Attention vs dense MLA on the same model, same machine, same run.

One model with DeepSeek-V3.2's attention widths (128 heads, kv_lora_rank 512, rope 64, nope/v 128,
q_lora_rank 1536; indexer 64 heads of 128, index_topk 2048) and ``--layers`` layers (dense MLP, small
vocab: attention is what is measured). Dense = the same weights without the indexers.

Figures per context S (``--contexts``) and batch B (``--batches``), JSON to stdout and ``--out``:
- decode: tokens/s (B / median step time over ``--steps`` steps) and attention time per step (the
  self_attn modules' wall time; ``attention_core_ms`` without MLA's q/kv/o projections, which cost the
  same at any context) with S tokens cached in minke's paged cache (DSAPagedCache, the
  engine's); bytes read per step from the cache: dense reads every cached latent (C + R per token and
  layer), sparse every indexer key (E) plus K selected latents; ``weight_bytes`` is what every step also
  reads once (``--fp8``: the attention's linears held as E4M3 with 128×128 block scales, as V3.2 ships
  them, and decode's few rows multiply them as stored). Steps run as the engine runs them, through its laid-out decode weights (kernels/linear.py;
  ``--plain``: the modules' own forward). The cache is filled with the model's own layer-0 latents and indexer keys of random tokens
  (exactly what a prefill writes into layer 0; deeper layers get the same values, which costs the same);
- prefill: tokens/s of one forward over S tokens (B = 1), dense in MHA mode (fused SDPA, causal),
  sparse in the absorbed mode over each query's selected latents (queries in blocks), for S up to
  ``--max-prefill`` (a dense 32K prefill at these widths is ~2·10¹³ multiply-adds: 6-7 minutes a layer
  on 2 CPU cores, sparse 2.5-5 more; the default stops at 4K);
- ``crossover``: per batch size, the smallest measured context from which on sparse decode attention
  beats dense (and prefill); None when it never does in the measured range.

    .venv/bin/python benchmarks/long_context.py                          # 4K/16K/32K, batch 1 and 8
    .venv/bin/python benchmarks/long_context.py --dtype bfloat16 --max-prefill 32768   # ~13 min
    .venv/bin/python benchmarks/long_context.py --contexts 1024 4096 --batches 1 --max-prefill 4096
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time

import torch

import minke
from minke.inference.dsa_cache import DSAPagedCache
from minke.inference.engine import decode_weights


def config(args) -> minke.ModelConfig:
    return minke.ModelConfig(
        model_type="deepseek_v32", architectures=["DeepseekV32ForCausalLM"], vocab_size=args.vocab,
        hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.heads, q_lora_rank=1536, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=None,
        first_k_dense_replace=args.layers, num_nextn_predict_layers=0,
        max_position_embeddings=max(args.contexts) + args.steps + 64,
        index_n_heads=64, index_head_dim=128, index_topk=args.topk)


def set_dense(model, dense: bool) -> None:
    """Dense: MLA without its indexer (plain absorbed decode over the whole cache, MHA prefill)."""
    for b in model.layers:
        attn = b.self_attn
        if not hasattr(attn, "_dsa"):
            attn._dsa = attn.indexer
        attn.indexer = None if dense else attn._dsa


class Clock:
    """Wall time spent inside some modules (forward hooks), summed until reset."""

    def __init__(self, modules):
        self.total = 0.0
        for m in modules:
            m.register_forward_pre_hook(self._start)
            m.register_forward_hook(self._stop)

    def _start(self, *_):
        self._t = time.perf_counter()

    def _stop(self, *_):
        self.total += time.perf_counter() - self._t


def clocks(model):
    """(the self_attn modules, MLA's own projections in them): attention time with and without the
    projections every decode step runs whatever the context (q_a/q_b, kv_a, o_proj; the indexer's own
    projections count as attention)."""
    attn = [b.self_attn for b in model.layers]
    proj = [getattr(a, n) for a in attn for n in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "o_proj")]
    return Clock(attn), Clock(proj)


@torch.no_grad()
def filled_cache(model, B: int, S: int, extra: int, block_size: int, dtype) -> DSAPagedCache:
    """B rows of S cached tokens each (room for ``extra`` more), every layer holding layer 0's latents and
    indexer keys of one random S-token sequence (computed once, in chunks)."""
    cfg = model.config
    cache = DSAPagedCache(cfg, num_blocks=B * -(-(S + extra) // block_size), block_size=block_size, dtype=dtype)
    attn = model.layers[0].self_attn
    ids = torch.randint(0, cfg.vocab_size, (1, S), generator=torch.Generator().manual_seed(0))
    parts = []
    for i in range(0, S, 2048):
        x = model.layers[0].input_layernorm(model.embed_tokens(ids[:, i:i + 2048]))
        cos, sin = model.rotary(torch.arange(i, i + x.shape[1])[None])
        c, r = attn.latent(x, cos, sin)
        parts.append((c[0], r[0], getattr(attn, "_dsa", attn.indexer).key(x, cos, sin)[0]))
    c, r, k = (torch.cat(p) for p in zip(*parts))
    for row in range(B):
        assert cache.reserve(row, S + extra)
        slots = torch.tensor([b * block_size + o for b in cache.tables[row] for o in range(block_size)][:S])
        for layer in range(cache.num_layers):
            cache.c_kv[layer, slots], cache.k_pe[layer, slots], cache.index_k[layer, slots] = c, r, k
        cache.lengths[row] = S
    return cache


@torch.no_grad()
def decode(model, clock, B: int, S: int, steps: int, block_size: int, dtype, weights) -> dict:
    """``weights``: what the engine enters around a decode step (its laid-out weights, or a null context)."""
    attn_clock, proj_clock = clock
    cache = filled_cache(model, B, S, steps + 1, block_size, dtype)
    ids = torch.randint(0, model.config.vocab_size, (B, 1), generator=torch.Generator().manual_seed(1))
    times, attn, core = [], [], []
    for _ in range(steps + 1):  # the first step warms up
        cache.begin(list(range(B)), 1)
        attn_clock.total = proj_clock.total = 0.0
        t = time.perf_counter()
        with weights:
            model(ids, positions=cache.positions(1), cache=cache)
        times.append(time.perf_counter() - t)
        attn.append(attn_clock.total)
        core.append(attn_clock.total - proj_clock.total)
        cache.advance(1)
    step = statistics.median(times[1:])
    return {"tok_s": B / step, "step_ms": 1e3 * step, "attention_ms": 1e3 * statistics.median(attn[1:]),
            "attention_core_ms": 1e3 * statistics.median(core[1:])}


@torch.no_grad()
def prefill(model, S: int, absorb: bool) -> float:
    ids = torch.randint(0, model.config.vocab_size, (1, S), generator=torch.Generator().manual_seed(2))
    t = time.perf_counter()
    model(ids, absorb=absorb, logits=False)
    return S / (time.perf_counter() - t)


def cache_bytes_read(cfg, B: int, S: int, sparse: bool, elt: int) -> int:
    L, C, R, E, K = cfg.num_hidden_layers, cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.index_head_dim, cfg.index_topk
    per_row = S * E + min(K, S) * (C + R) if sparse and S > K else S * (C + R)
    return B * L * per_row * elt


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # ---- what is measured
    p.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 32768], help="cached/prompt tokens S")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="decode batch sizes")
    p.add_argument("--steps", type=int, default=3, help="timed decode steps per point (after one warm-up)")
    p.add_argument("--max-prefill", type=int, default=4096, help="prefill only contexts up to this (0: none)")
    # ---- the model
    p.add_argument("--layers", type=int, default=1, help="transformer layers")
    p.add_argument("--heads", type=int, default=128, help="MLA heads (V3/V3.2: 128)")
    p.add_argument("--hidden", type=int, default=1024, help="hidden size")
    p.add_argument("--vocab", type=int, default=1024, help="vocabulary size")
    p.add_argument("--topk", type=int, default=2048, help="index_topk (V3.2: 2048)")
    p.add_argument("--block-size", type=int, default=64, help="paged cache block size")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights and cache")
    p.add_argument("--fp8", action="store_true",
                   help="attention's linear layers (and the indexer's wq_b, wk) in DeepSeek's FP8 block format "
                        "in memory, as V3.2 ships them (minke.load(fp8=True)); activations and cache in --dtype")
    p.add_argument("--plain", action="store_true",
                   help="decode through the modules' own forward (Engine(packed_decode=False)), not the laid-out "
                        "weights the engine decodes with by default")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    cfg = config(args)
    model = minke.build(cfg, seed=0, dtype=dtype).eval()
    if args.fp8:  # quantized as minke.load quantizes a BF16 checkpoint
        with tempfile.TemporaryDirectory() as d:
            minke.save(model, d)
            model = minke.load(d, dtype=dtype, fp8=True)
    clock = clocks(model)
    weights = contextlib.nullcontext() if args.plain else decode_weights(model)
    elt = torch.empty((), dtype=dtype).element_size()
    weight_bytes = sum(t.numel() * t.element_size() for n, t in model.state_dict().items() if "embed_tokens" not in n)
    report = {"config": {k: getattr(cfg, k) for k in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                                                      "kv_lora_rank", "qk_rope_head_dim", "index_n_heads",
                                                      "index_head_dim", "index_topk")},
              "dtype": args.dtype, "fp8_weights": args.fp8, "threads": torch.get_num_threads(), "weight_bytes": weight_bytes,
              "decode_weights": "plain" if args.plain else "laid out (the engine's)",
              "decode": [], "prefill": []}
    for S in args.contexts:
        for B in args.batches:
            row = {"context": S, "batch": B}
            for mode in ("dense", "sparse"):
                set_dense(model, mode == "dense")
                row[mode] = decode(model, clock, B, S, args.steps, args.block_size, dtype, weights)
                row[mode]["cache_bytes_read"] = cache_bytes_read(cfg, B, S, mode == "sparse", elt)
            d, s = row["dense"], row["sparse"]
            row["attention_speedup"] = d["attention_ms"] / s["attention_ms"]
            row["attention_core_speedup"] = d["attention_core_ms"] / s["attention_core_ms"]
            row["decode_speedup"] = s["tok_s"] / d["tok_s"]
            row["bytes_ratio"] = (d["cache_bytes_read"] + weight_bytes) / (s["cache_bytes_read"] + weight_bytes)
            report["decode"].append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
        if S <= args.max_prefill:
            row = {"context": S}
            for mode in ("dense", "sparse"):
                set_dense(model, mode == "dense")
                row[mode + "_tok_s"] = prefill(model, S, absorb=mode == "sparse")
            row["speedup"] = row["sparse_tok_s"] / row["dense_tok_s"]
            report["prefill"].append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    set_dense(model, False)
    # Per batch size: the smallest measured context from which on sparse decode attention (projections
    # included) is faster at every larger measured context; prefill likewise.
    def crossover(rows, faster):
        rows = sorted(rows, key=lambda r: r["context"])
        wins = [i for i in range(len(rows)) if all(faster(r) for r in rows[i:])]
        return rows[wins[0]]["context"] if wins else None
    report["crossover"] = {f"decode_attention_batch_{B}": crossover([r for r in report["decode"] if r["batch"] == B],
                                                                   lambda r: r["attention_speedup"] > 1)
                           for B in args.batches}
    report["crossover"]["prefill"] = crossover(report["prefill"], lambda r: r["speedup"] > 1)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return report


if __name__ == "__main__":
    main()

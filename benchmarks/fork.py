"""Rollout throughput with shared prefixes: ``n`` samples of each prompt as one group (the prompt prefilled
once, its blocks shared, the partial last block copied per sample) vs the same ``n`` samples as separate
requests with the same seeds (each one prefilling the prompt and holding its own copy). GRPO's rollouts
(G samples per prompt) and the server's ``n > 1`` take the first path.

Both runs sample at temperature 1 (top-p ``--top-p``) with eos disabled, so every sample has
``--new-tokens`` tokens, and must give identical tokens (checked; ``identical`` in the JSON).
Figures (JSON to stdout and to ``--out``): generated tokens/s of each (median over ``--repeats``
interleaved rounds), ``speedup`` (median of the rounds' paired ratios; ``speedup_cpu_time`` the same
per CPU-second, steadier on a shared machine), the first step's time (prefill, fork and one decode),
prefill tokens, and the most cache blocks held at once.

    .venv/bin/python benchmarks/fork.py                     # 16 prompts of 100 tokens, n=8, 64 new tokens
    .venv/bin/python benchmarks/fork.py --speculative       # the same through MTP speculative decoding
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

import minke
from minke.inference.engine import Engine
from minke.inference.sampling import SamplingParams


def rollout(engine: Engine, prompts: list[list[int]], params: SamplingParams, n: int, shared: bool) -> dict:
    """All samples through one engine, driven step by step to watch the cache; outputs prompt-major."""
    t0, c0 = time.perf_counter(), time.process_time()
    if shared:
        ids = [rid for p in prompts for rid in engine.add_request(p, params, n=n)]
    else:
        ids = [engine.add_request(p, SamplingParams(**{**params.__dict__, "seed": params.seed + j}))
               for p in prompts for j in range(n)]
    outs = {i: [] for i in ids}
    peak, first = 0, None
    while engine.has_unfinished():
        events = engine.step()
        first = first or time.perf_counter() - t0  # admission + prefill (+ fork) + one decode
        for e in events:
            if e.token_id is not None:
                outs[e.request_id].append(e.token_id)
        peak = max(peak, engine.cache.num_blocks - engine.cache.num_free_blocks)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    tokens = sum(map(len, outs.values()))
    return {"seconds": seconds, "first_step_s": first, "tok_s": tokens / seconds, "tok_per_cpu_s": tokens / cpu, "generated_tokens": tokens,
            "prefill_tokens": engine.stats.prefill_tokens, "peak_blocks": peak,
            "outputs": [outs[i] for i in ids]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # ---- model and engine
    p.add_argument("--preset", default="tiny", help="minke preset (random weights)")
    p.add_argument("--dtype", default="float32", help="model and cache dtype")
    p.add_argument("--max-batch", type=int, default=128, help="sequences decoded together at most")
    p.add_argument("--block-size", type=int, default=16, help="cache block size (tokens)")
    p.add_argument("--speculative", action="store_true", help="MTP speculative decoding in both runs")
    # ---- workload
    p.add_argument("--prompts", type=int, default=16, help="distinct prompts")
    p.add_argument("--prompt-len", type=int, default=100, help="tokens per prompt")
    p.add_argument("--n", type=int, default=8, help="samples per prompt (GRPO's G)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens per sample")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus mass (temperature 1)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (shared, unshared)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default="out/bench_fork.json", help="also write the JSON here")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    dtype = getattr(torch, a.dtype)
    model = minke.build(minke.preset(a.preset), seed=0, dtype=dtype).eval()
    g = torch.Generator().manual_seed(0)
    V = model.config.vocab_size
    prompts = [torch.randint(3, V, (a.prompt_len,), generator=g).tolist() for _ in range(a.prompts)]
    params = SamplingParams(max_tokens=a.new_tokens, temperature=1.0, top_p=a.top_p, seed=0, stop_token_ids=[])
    seqs = a.prompts * a.n
    blocks = seqs * -(-(a.prompt_len + a.new_tokens + 4) // a.block_size)  # room for all unshared: no preemption

    def engine():
        return Engine(model, max_batch=a.max_batch, block_size=a.block_size, num_blocks=blocks,
                      speculative=a.speculative, prefix_cache=False)  # the fork alone (unshared would hit the cache)

    rollout(engine(), prompts[:1], params, 2, True)  # warm-up
    runs = {"shared": [], "unshared": []}
    for _ in range(a.repeats):
        for kind in runs:
            runs[kind].append(rollout(engine(), prompts, params, a.n, kind == "shared"))
    s, u = runs["shared"], runs["unshared"]
    report = {
        "preset": a.preset, "dtype": a.dtype, "threads": torch.get_num_threads(), "speculative": a.speculative,
        "prompts": a.prompts, "prompt_len": a.prompt_len, "n": a.n, "new_tokens": a.new_tokens,
        "max_batch": a.max_batch, "block_size": a.block_size, "num_blocks": blocks,
        "shared_tok_s": statistics.median(r["tok_s"] for r in s),
        "unshared_tok_s": statistics.median(r["tok_s"] for r in u),
        "speedup": statistics.median(x["tok_s"] / y["tok_s"] for x, y in zip(s, u)),
        "speedup_cpu_time": statistics.median(x["tok_per_cpu_s"] / y["tok_per_cpu_s"] for x, y in zip(s, u)),
        "shared_first_step_s": statistics.median(r["first_step_s"] for r in s),
        "unshared_first_step_s": statistics.median(r["first_step_s"] for r in u),
        "shared_prefill_tokens": s[0]["prefill_tokens"], "unshared_prefill_tokens": u[0]["prefill_tokens"],
        "shared_peak_blocks": s[0]["peak_blocks"], "unshared_peak_blocks": u[0]["peak_blocks"],
        "identical": all(x["outputs"] == y["outputs"] for x, y in zip(s, u)),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if a.out:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        with open(a.out, "w") as f:
            f.write(text + "\n")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)

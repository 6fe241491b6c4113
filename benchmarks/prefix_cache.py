"""Time to first token with automatic prefix caching on vs off, at the engine: requests that share a
``--prefix-len`` token prefix (a system prompt, few-shot examples, a chat history) and each add their own
``--suffix-len`` tokens, as a chat server sees them.

Each round runs the same ``--requests`` requests through a fresh engine with the cache off, then on
(rounds alternate the order, so neither mode always runs on a machine warmed by the other). A request is
submitted once the one before it has finished (one client, as a chat user): its TTFT is the wall time from
``add_request`` to the event carrying its first token (admission, the prefill of what is not cached, the
first token). With the cache on, the first request of a round prefills the whole prefix and publishes it;
the others prefill their suffix only. Outputs are greedy and must be identical in both modes (checked;
``identical`` in the JSON).

Figures (JSON to stdout and to ``--out``): per mode, TTFT median and p90 over the requests after each
round's first (``ttft_ms``), the first request's TTFT, CPU-seconds per request, prefill tokens per
round and the cache hit rate (EngineStats.prefix_hit_rate); ``speedup``: the median over rounds of the
off/on ratio of the median TTFTs (``speedup_cpu_time`` the same in CPU time, steadier on a shared
machine).

Default model: the "small" preset's widths with 4 layers and 8K positions (as benchmarks/decode.py),
random weights, float32.

    .venv/bin/python benchmarks/prefix_cache.py                      # 1K prefix, 8 requests x 3 rounds
    .venv/bin/python benchmarks/prefix_cache.py --speculative        # the same with MTP speculative decoding
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

# benchmarks/decode.py's default model: the "small" preset with 4 layers (1 dense + 3 MoE) and room for 8K
DEFAULT_OVERRIDES = dict(num_hidden_layers=4, max_position_embeddings=8192)


def one_round(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> dict:
    """The prompts one after another; per request its TTFT (wall and CPU seconds) and tokens."""
    ttft, cpu, outs = [], [], []
    for p in prompts:
        t0, c0 = time.perf_counter(), time.process_time()
        rid = engine.add_request(p, params)
        toks, first = [], None
        while engine.has_unfinished():
            for e in engine.step():
                if e.request_id == rid and e.token_id is not None:
                    if first is None:
                        first = time.perf_counter() - t0, time.process_time() - c0
                    toks.append(e.token_id)
        ttft.append(first[0])
        cpu.append(first[1])
        outs.append(toks)
    return {"ttft": ttft, "cpu": cpu, "outputs": outs}


def summary(rounds: list[dict], stats: list[dict]) -> dict:
    later = [t for r in rounds for t in r["ttft"][1:]]
    q = statistics.quantiles(later, n=10) if len(later) > 1 else later * 9
    return {
        "ttft_ms": {"median": 1e3 * statistics.median(later), "p90": 1e3 * q[-1]},
        "first_request_ttft_ms": 1e3 * statistics.median(r["ttft"][0] for r in rounds),
        "ttft_cpu_ms_median": 1e3 * statistics.median(c for r in rounds for c in r["cpu"][1:]),
        "prefill_tokens_per_round": stats[0]["prefill_tokens"],
        "prefix_hit_rate": stats[0]["prefix_hit_rate"],
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # ---- model and engine
    p.add_argument("--preset", default="small", help="minke preset (random weights)")
    p.add_argument("--set", nargs="*", default=None, metavar="KEY=VALUE",
                   help="config fields over the preset (default: num_hidden_layers=4 max_position_embeddings=8192)")
    p.add_argument("--dtype", default="float32", help="model and cache dtype")
    p.add_argument("--block-size", type=int, default=16, help="cache block size (tokens)")
    p.add_argument("--speculative", action="store_true", help="MTP speculative decoding in both modes")
    # ---- workload
    p.add_argument("--prefix-len", type=int, default=1024, help="tokens every request shares")
    p.add_argument("--suffix-len", type=int, default=32, help="tokens of each request's own")
    p.add_argument("--requests", type=int, default=8, help="requests per round, one after another")
    p.add_argument("--new-tokens", type=int, default=4, help="tokens generated per request (greedy)")
    p.add_argument("--repeats", type=int, default=3, help="rounds (each: cache off and cache on)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default="out/bench_prefix_cache.json", help="also write the JSON here")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.requests < 2:
        raise SystemExit("--requests must be >= 2 (the first request of a round fills the cache)")

    over = DEFAULT_OVERRIDES if a.set is None else {
        k: json.loads(v) for k, v in (kv.split("=", 1) for kv in a.set)}
    cfg = minke.preset(a.preset, **over)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    dtype = getattr(torch, a.dtype)
    model = minke.build(cfg, seed=0, dtype=dtype).eval()
    g = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(3, cfg.vocab_size, (n,), generator=g).tolist()  # noqa: E731
    prefix = rand(a.prefix_len)
    prompts = [prefix + rand(a.suffix_len) for _ in range(a.requests)]
    params = SamplingParams(max_tokens=a.new_tokens, temperature=0.0, stop_token_ids=[])
    need = a.requests * -(-(a.prefix_len + a.suffix_len + a.new_tokens + 4) // a.block_size)

    def engine(on: bool) -> Engine:
        return Engine(model, max_batch=1, block_size=a.block_size, num_blocks=need, speculative=a.speculative,
                      prefix_cache=on)

    one_round(engine(True), [rand(64), rand(64)], params)  # warm-up (allocator, first-call paths)
    runs = {"off": [], "on": []}
    stats = {"off": [], "on": []}
    for i in range(a.repeats):
        for mode in (("off", "on") if i % 2 == 0 else ("on", "off")):
            e = engine(mode == "on")
            runs[mode].append(one_round(e, prompts, params))
            stats[mode].append(e.stats.as_dict())
            print(f"round {i + 1}/{a.repeats} cache {mode}: TTFT median "
                  f"{1e3 * statistics.median(runs[mode][-1]['ttft'][1:]):.1f} ms", file=sys.stderr, flush=True)
    off, on = runs["off"], runs["on"]
    report = {
        "preset": a.preset, "overrides": over, "dtype": a.dtype, "threads": torch.get_num_threads(),
        "speculative": a.speculative, "prefix_len": a.prefix_len, "suffix_len": a.suffix_len,
        "requests": a.requests, "new_tokens": a.new_tokens, "repeats": a.repeats, "block_size": a.block_size,
        "params_total": cfg.param_counts()["total"],
        "cache_off": summary(off, stats["off"]),
        "cache_on": summary(on, stats["on"]),
        "speedup": statistics.median(statistics.median(x["ttft"][1:]) / statistics.median(y["ttft"][1:])
                                     for x, y in zip(off, on)),
        "speedup_cpu_time": statistics.median(statistics.median(x["cpu"][1:]) / statistics.median(y["cpu"][1:])
                                              for x, y in zip(off, on)),
        "identical": all(x["outputs"] == y["outputs"] for x, y in zip(off, on)),
        "load_average_at_start": load,
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

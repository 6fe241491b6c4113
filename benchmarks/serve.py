"""Serving benchmark: a real OpenAI client (``openai.AsyncOpenAI``) drives an OpenAI-compatible server
(`minke serve`, or vLLM's on the same checkpoint) with N concurrent streams, as vLLM's
benchmark_serving does, and reports JSON.

Workload: ``--num-prompts`` streamed ``/v1/completions`` requests of random token ids (the checkpoint's
vocabulary, above its special tokens), prompt and output lengths drawn uniformly from
[len·(1 − range_ratio), len·(1 + range_ratio)] (vLLM's random dataset), greedy, ``ignore_eos`` so every
request generates its drawn length, and ``logprobs: 0`` so that every token is streamed as it comes (a
random model's text often ends in an incomplete UTF-8 sequence, which a server holds back until it
completes: without logprobs whole answers arrive as one chunk; ``--no-logprobs`` to measure that);
with ``--shared-prefix-len`` every prompt starts with the same
prefix (a system prompt or few-shot block: the prefix cache's workload). At most ``--concurrency``
requests are in flight (a list runs each level in turn, each server in turn on the same requests,
after two warm-up requests of other prompts; a level's hit rate includes the shared prefix cached
by the level before). Per level: requests/s, output tok/s, total
tok/s, TTFT (time to the first streamed token), ITL (gaps between streamed chunks) and TPOT
((latency − TTFT) / (output tokens − 1)) mean, p50 and p99 in ms, and the prefix-cache hit rate over
the level (prompt tokens found cached / looked up), read from the server's ``/metrics`` (minke's JSON
``prefix_hit_tokens`` / ``prefix_queried_tokens``, or vLLM's Prometheus ``prefix_cache_hits`` /
``prefix_cache_queries``); None where the server reports neither.

A server that is down or does not answer ``/v1/models`` within ``--connect-timeout`` seconds is an error
naming the URL, before any load is sent. ``--serve CKPT`` starts `minke serve` on a free port for the run
(and stops it); ``--peer-url`` drives a second server (e.g. ``vllm serve CKPT``) in the same run with the
same requests and adds the ratios minke / peer (``--repeats``: the median of paired ratios).

    .venv/bin/python benchmarks/serve.py --serve CKPT --concurrency 1 8 32 --out out/bench_serve.json
    .venv/bin/python benchmarks/serve.py --base-url http://127.0.0.1:8000/v1 --checkpoint CKPT \\
        --peer-url http://127.0.0.1:8001/v1 --shared-prefix-len 512
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai


class BenchmarkError(SystemExit):
    """A setup problem (server down, bad flags): its message, exit status 1."""

    def __init__(self, msg: str):
        super().__init__(f"benchmarks/serve.py: {msg}")


@dataclass
class Result:
    prompt_len: int
    output_len: int = 0  # tokens the server says it generated (usage), else streamed chunks
    ttft: float | None = None  # seconds
    latency: float = 0.0
    itl: list = field(default_factory=list)  # seconds between streamed chunks after the first
    error: str | None = None


# ---- workload ----------------------------------------------------------------------------------
def lengths(mean: int, ratio: float, n: int, rng: random.Random) -> list[int]:
    lo, hi = max(1, int(mean * (1 - ratio))), max(1, int(mean * (1 + ratio)))
    return [rng.randint(lo, hi) for _ in range(n)]


def workload(a, vocab: int, first_id: int, level: int) -> list[tuple[list[int], int]]:
    """(prompt ids, output length) per request; the same for every server given the same flags. The
    shared prefix depends on the seed only, the rest on the level too (a level must not find whole
    prompts of the previous one in the prefix cache)."""
    r0 = random.Random(a.seed)
    prefix = [r0.randrange(first_id, vocab) for _ in range(a.shared_prefix_len)]
    rng = random.Random(a.seed * 1000003 + level)
    ins = lengths(a.input_len, a.range_ratio, a.num_prompts, rng)
    outs = lengths(a.output_len, a.range_ratio, a.num_prompts, rng)
    return [(prefix + [rng.randrange(first_id, vocab) for _ in range(n)], m) for n, m in zip(ins, outs)]


def vocabulary(checkpoint: str) -> tuple[int, int]:
    """(vocab_size, first ordinary token id) of a checkpoint directory: random prompts avoid the
    special tokens (bos, eos, pad, <think>…), which the tokenizer lists as added tokens."""
    path = Path(checkpoint)
    try:
        config = json.loads((path / "config.json").read_text())
        vocab = int(config["vocab_size"])
    except (OSError, ValueError, KeyError) as e:
        raise BenchmarkError(f"--checkpoint {checkpoint}: cannot read vocab_size from config.json ({e})") from None
    try:
        added = json.loads((path / "tokenizer.json").read_text()).get("added_tokens", [])
        special = [t["id"] for t in added if t.get("special")]
    except (OSError, ValueError):
        special = []
    first = max([i for i in special if i < 1024] or [-1]) + 1  # specials sit at the start of the vocabulary
    if first >= vocab:
        raise BenchmarkError(f"--checkpoint {checkpoint}: no ordinary token ids below vocab_size {vocab}")
    return vocab, first


# ---- one server --------------------------------------------------------------------------------
def root_of(base_url: str) -> str:
    return base_url.rstrip("/").removesuffix("/v1")


def model_name(base_url: str, api_key: str, timeout: float) -> str:
    """The first model the server lists; a clear error when nothing answers (no hang)."""
    try:
        r = httpx.get(base_url.rstrip("/") + "/models", headers={"Authorization": f"Bearer {api_key}"},
                      timeout=timeout)
    except httpx.HTTPError as e:
        raise BenchmarkError(f"no OpenAI server answers at {base_url} within {timeout:g} s "
                             f"({type(e).__name__}: {e or 'no response'}); is it running? "
                             f"(minke serve --model CKPT --port N, or --serve CKPT)") from None
    if r.status_code != 200:
        raise BenchmarkError(f"{base_url}/models answered {r.status_code}: {r.text[:200]}")
    data = r.json().get("data") or []
    if not data:
        raise BenchmarkError(f"{base_url}/models lists no model")
    return data[0]["id"]


def prefix_counters(base_url: str, timeout: float) -> tuple[float, float] | None:
    """(hit tokens, queried tokens) so far from the server's /metrics, or None."""
    try:
        r = httpx.get(root_of(base_url) + "/metrics", timeout=timeout)
    except httpx.HTTPError:
        return None
    if r.status_code != 200:
        return None
    if r.headers.get("content-type", "").startswith("application/json"):  # minke: EngineStats
        m = r.json()
        if "prefix_hit_tokens" in m and "prefix_queried_tokens" in m:
            return float(m["prefix_hit_tokens"]), float(m["prefix_queried_tokens"])
        return None
    hits = queries = None  # Prometheus text (vLLM): vllm:prefix_cache_hits_total{...} value
    for line in r.text.splitlines():
        name = line.split("{")[0].split(" ")[0]
        if name in ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_hits"):
            hits = (hits or 0) + float(line.rsplit(" ", 1)[1])
        elif name in ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_queries"):
            queries = (queries or 0) + float(line.rsplit(" ", 1)[1])
    return None if hits is None or queries is None else (hits, queries)


async def one(client: openai.AsyncOpenAI, model: str, prompt: list[int], max_tokens: int,
              logprobs: int | None = 0) -> Result:
    res = Result(len(prompt))
    start = last = time.perf_counter()
    chunks = 0
    try:
        stream = await client.completions.create(
            model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True, logprobs=logprobs,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.usage is not None:
                res.output_len = chunk.usage.completion_tokens
            if not chunk.choices:
                continue
            if res.ttft is None:
                res.ttft = now - start
            else:
                res.itl.append(now - last)
            last = now
            chunks += 1
        res.output_len = res.output_len or chunks
    except Exception as e:  # one failed request is reported, not fatal
        res.error = f"{type(e).__name__}: {e}"
    res.latency = time.perf_counter() - start
    return res


async def level(base_url: str, api_key: str, model: str, requests: list, concurrency: int,
                timeout: float, logprobs: int | None = 0) -> tuple[list[Result], float]:
    """All requests with at most ``concurrency`` in flight; (results, wall seconds)."""
    client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0,
                                timeout=httpx.Timeout(timeout, connect=10.0),
                                http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency)))
    gate = asyncio.Semaphore(concurrency)

    async def gated(p, m):
        async with gate:
            return await one(client, model, p, m, logprobs)

    t0 = time.perf_counter()
    try:
        results = await asyncio.gather(*(gated(p, m) for p, m in requests))
    finally:
        await client.close()
    return list(results), time.perf_counter() - t0


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100  # linear interpolation between ranks (numpy's default)
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summary(results: list[Result], seconds: float, hits: tuple | None) -> dict:
    ok = [r for r in results if r.error is None]
    ms = lambda xs: {"mean": statistics.fmean(xs) * 1e3 if xs else None,
                     "p50": (pct(xs, 50) or 0) * 1e3 if xs else None, "p99": (pct(xs, 99) or 0) * 1e3 if xs else None}
    out_tokens = sum(r.output_len for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    tpot = [(r.latency - r.ttft) / (r.output_len - 1) for r in ok if r.ttft is not None and r.output_len > 1]
    return {
        "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "duration_s": seconds, "input_tokens": in_tokens, "output_tokens": out_tokens,
        "request_throughput": len(ok) / seconds, "output_throughput": out_tokens / seconds,
        "total_token_throughput": (in_tokens + out_tokens) / seconds,
        "ttft_ms": ms([r.ttft for r in ok if r.ttft is not None]), "tpot_ms": ms(tpot),
        "itl_ms": ms([x for r in ok for x in r.itl]),
        "prefix_cache_hit_rate": hits,
    }


def run_server(base_url: str, api_key: str, requests: list, concurrencies: list[int], a, warmup: list) -> dict:
    """``warmup``: requests run first, unmeasured (prompts of their own: they must not put the measured
    prompts into the prefix cache)."""
    model = model_name(base_url, api_key, a.connect_timeout)
    lp = None if a.no_logprobs else 0
    asyncio.run(level(base_url, api_key, model, warmup, 1, a.request_timeout, lp))
    levels = {}
    for c in concurrencies:
        before = prefix_counters(base_url, a.connect_timeout)
        results, seconds = asyncio.run(level(base_url, api_key, model, requests, c, a.request_timeout, lp))
        after = prefix_counters(base_url, a.connect_timeout)
        hits = None
        if before is not None and after is not None and after[1] > before[1]:
            hits = (after[0] - before[0]) / (after[1] - before[1])
        levels[str(c)] = summary(results, seconds, hits)
        s = levels[str(c)]
        print(f"{base_url} concurrency {c}: {s['request_throughput']:.2f} req/s, {s['output_throughput']:.1f} "
              f"output tok/s, TTFT p50 {s['ttft_ms']['p50'] or 0:.0f} ms p99 {s['ttft_ms']['p99'] or 0:.0f} ms, "
              f"ITL p50 {s['itl_ms']['p50'] or 0:.1f} ms p99 {s['itl_ms']['p99'] or 0:.1f} ms, "
              f"prefix hits {hits if hits is None else round(hits, 3)}, failed {s['failed']}"
              f"{' (' + s['errors'][0][:300] + ')' if s['errors'] else ''}", file=sys.stderr)
    return {"base_url": base_url, "model": model, "levels": levels}


# ---- `--serve CKPT`: minke serve for the run -----------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(checkpoint: str, extra: list[str], wait: float) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "minke.cli", "serve", "--model", checkpoint, "--port", str(port),
           "--log-level", "warning", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchmarkError(f"minke serve exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url + "/v1"
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise BenchmarkError(f"minke serve did not answer /health within {wait:g} s: {' '.join(cmd)}")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # ---- servers
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="the server under test")
    p.add_argument("--serve", default=None, metavar="CKPT", help="start `minke serve --model CKPT` for the run "
                   "(instead of --base-url); its vocabulary is the workload's")
    p.add_argument("--serve-arg", action="append", default=[], help="extra flag for --serve (repeatable)")
    p.add_argument("--peer-url", default=None, help="a second server (e.g. vllm serve CKPT) driven the same way")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "none"), help="bearer key")
    p.add_argument("--checkpoint", default=None, help="checkpoint directory (vocab for random prompts)")
    p.add_argument("--connect-timeout", type=float, default=5.0, help="seconds to wait for a server to answer")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds one request may take")
    # ---- workload
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="concurrent streams per level")
    p.add_argument("--num-prompts", type=int, default=None, help="requests per level (default 4 x concurrency, >= 16)")
    p.add_argument("--input-len", type=int, default=128, help="mean prompt tokens (after the shared prefix)")
    p.add_argument("--output-len", type=int, default=32, help="mean output tokens")
    p.add_argument("--range-ratio", type=float, default=0.5, help="lengths uniform in len x [1 - r, 1 + r]")
    p.add_argument("--shared-prefix-len", type=int, default=0, help="tokens every prompt starts with")
    p.add_argument("--seed", type=int, default=0, help="workload seed")
    p.add_argument("--repeats", type=int, default=1,
                   help="runs per level, fresh prompts each, servers alternating (the median is reported)")
    p.add_argument("--no-logprobs", action="store_true",
                   help="do not ask for logprobs (tokens whose text is held back then arrive together)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    a = p.parse_args(argv)
    if a.serve and a.checkpoint is None:
        a.checkpoint = a.serve
    if a.checkpoint is None:
        raise BenchmarkError("--checkpoint CKPT (or --serve CKPT) is needed for the prompts' vocabulary")
    if not 0 <= a.range_ratio < 1 or a.input_len < 1 or a.output_len < 1 or a.shared_prefix_len < 0:
        raise BenchmarkError("need --input-len, --output-len >= 1, --shared-prefix-len >= 0, 0 <= --range-ratio < 1")
    if a.repeats < 1:
        raise BenchmarkError(f"--repeats must be >= 1, got {a.repeats}")
    if any(c < 1 for c in a.concurrency):
        raise BenchmarkError(f"--concurrency must be >= 1, got {a.concurrency}")
    vocab, first = vocabulary(a.checkpoint)

    report = {"workload": {k: getattr(a, k) for k in ("input_len", "output_len", "range_ratio", "shared_prefix_len",
                                                      "seed", "concurrency")}, "checkpoint": a.checkpoint}
    proc = None
    try:
        if a.serve:
            proc, a.base_url = launch(a.serve, a.serve_arg, 300)
        else:
            model_name(a.base_url, a.api_key, a.connect_timeout)  # fail fast, before the peer is driven
        if a.peer_url:
            model_name(a.peer_url, a.api_key, a.connect_timeout)
        servers = {"minke": a.base_url, **({"peer": a.peer_url} if a.peer_url else {})}
        for name, url in servers.items():
            report[name] = {}
        ratios = {}
        for c in a.concurrency:  # per level and repeat one workload; the servers take turns on it
            n = a.num_prompts or max(16, 4 * c)
            report["workload"].setdefault("num_prompts", {})[str(c)] = n
            runs = {name: [] for name in servers}
            for rep in range(a.repeats):
                salt = c * 1000 + rep  # fresh prompts per repeat: a repeat must not hit the one before
                requests = workload(argparse.Namespace(**{**vars(a), "num_prompts": n}), vocab, first, salt)
                warmup = workload(argparse.Namespace(**{**vars(a), "num_prompts": 2, "shared_prefix_len": 0}),
                                  vocab, first, -salt - 1)
                order = list(servers.items())
                for name, url in order if rep % 2 == 0 else order[::-1]:  # alternate who goes first
                    r = run_server(url, a.api_key, requests, [c], a, warmup)
                    report[name].setdefault("model", r["model"])
                    runs[name].append(r["levels"][str(c)])
            for name, rs in runs.items():  # the median repeat by output throughput, and every repeat's
                s = sorted(rs, key=lambda x: x["output_throughput"])[(len(rs) - 1) // 2]
                s = {**s, "output_throughput_repeats": [x["output_throughput"] for x in rs],
                     "failed_repeats": [x["failed"] for x in rs],
                     "errors_repeats": sorted({e for x in rs for e in x["errors"]})[:5]}
                report[name].setdefault("levels", {})[str(c)] = s
            if a.peer_url:
                ratios[str(c)] = {k: statistics.median(m[k] / q[k] if q[k] else float("nan")
                                                       for m, q in zip(runs["minke"], runs["peer"]))
                                  for k in ("request_throughput", "output_throughput")}
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    if a.peer_url:
        report["ratio"] = ratios  # minke / peer, median of the repeats' paired ratios
    text = json.dumps(report, indent=2)
    print(text)
    if a.out:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        Path(a.out).write_text(text + "\n")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])

"""Decode speed: minke's engine vs transformers' ``generate()`` on the same weights, same machine, same run.

minke builds a model, writes it with ``minke.save`` and both libraries read it back (transformers'
DeepseekV3ForCausalLM drops the MTP layer; minke's plain decode does not use it either). Both decode
greedily with eos disabled, so they produce the same number of tokens.

Figures (JSON to stdout and to ``--out``):
- batch-1 decode tokens/s at each ``--contexts`` length (prompt of that many tokens, then
  ``--new-tokens`` tokens), batch-``--batch`` decode tokens/s at the first context length;
- prefill tokens/s (the prompt of the longest context): time to the first token, less one decode step;
- cache bytes per token: minke's latent (main layers, as transformers; minke's MTP layer in
  ``minke_cache_bytes_per_token_with_mtp``) and what transformers' cache object holds after generation;
- minke's batch-1 decode against the memory-bandwidth bound: bytes read per token = active weight
  bytes (the embedding table excluded: one row is read) + the latent cache read at that context,
  bandwidth = a measured large-tensor copy (bytes read + written per second). This machine's
  bandwidth drifts from minute to minute, so each context runs ``--rounds`` times, each round between
  two copy probes and compared with the higher of them; ``fraction_of_bound`` is the median over the
  rounds (``rounds`` lists each), ``bound_tok_s`` uses the highest of all the probes
  (``copy_bandwidth_GB_s_each``).
Timing: the clock is read after every engine step (minke) and at every token transformers hands its
streamer; decode tokens/s = batch / median step time, robust to other processes on a shared machine.
``*_cpu`` figures divide by the step's CPU time in this process instead (steadier when other jobs
take the cores; exact with ``--threads 1``). minke decodes with its packed GEMM weights
(kernels/linear.py); ``minke_plain_*`` is the same engine with ``packed_decode=False`` (the model's
own GEMMs, the reference: ``packed_same_tokens_as_plain`` checks the greedy tokens agree).

``--speculative`` (with ``--model DIR`` for a trained checkpoint; otherwise the default random model,
whose MTP head agrees with nothing) compares plain and MTP-speculative greedy decode at batch 1:
tokens/s (medians over ``--repeats`` rounds, each decoding with both engines in turn; ``speedup`` is the
median of the rounds' paired ratios, ``speedup_cpu_time`` the same per CPU-second), acceptance rate,
tokens per verify forward, and that both outputs are identical.

    .venv/bin/python benchmarks/decode.py                         # default config, CPU, ~3-5 min on 2 cores
    .venv/bin/python benchmarks/decode.py --contexts 512 --no-transformers
    .venv/bin/python benchmarks/decode.py --speculative --model out/ckpt --new-tokens 128
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch

import minke
from minke.inference.engine import Engine
from minke.inference.paged import bytes_per_token
from minke.inference.sampling import SamplingParams

# The "small" preset's widths (hidden 768, 12 heads, kv_lora_rank 256, 16 routed experts top-4 + 1 shared,
# vocab 32000) with 4 layers (1 dense + 3 MoE) so the whole run fits a few minutes on two CPU cores;
# max_position_embeddings 8192 leaves room to decode after a 4096-token prompt. ~107M parameters, ~50M
# active per token.
DEFAULT_OVERRIDES = dict(num_hidden_layers=4, max_position_embeddings=8192)


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, stop_token_ids=[])


def copy_bandwidth(nbytes: int = 1 << 29, repeats: int = 5) -> tuple[float, float]:
    """Bytes moved (read + written) by a large tensor copy per wall second and per CPU second of this
    process (the machine's streaming bandwidth; the CPU-time figure is what the ``*_cpu`` decode rates
    compare with, exact with one thread)."""
    a = torch.ones(nbytes // 4)
    b = torch.empty_like(a)
    b.copy_(a)
    times, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        b.copy_(a)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return 2 * nbytes / min(times), 2 * nbytes / max(min(cpu), 1e-9)


# ---- minke -------------------------------------------------------------------------------------
def minke_run(engine: Engine, prompts: list[list[int]], new_tokens: int) -> dict:
    """Greedy-decode every prompt; per-step wall times. Step 1 prefills (and decodes once)."""
    ids = [engine.add_request(p, greedy(new_tokens)) for p in prompts]
    steps, cpu, tokens = [], [], []
    outs = {i: [] for i in ids}
    while engine.has_unfinished():
        t, c = time.perf_counter(), time.process_time()
        evs = engine.step()
        steps.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        tokens.append(sum(e.token_id is not None for e in evs))
        for e in evs:
            if e.token_id is not None:
                outs[e.request_id].append(e.token_id)
    decode = statistics.median(steps[1:])
    return {"first_step_s": steps[0], "decode_step_s": decode, "steps": steps, "tokens": tokens,
            "decode_tok_s": len(prompts) / decode, "decode_tok_s_cpu": len(prompts) / statistics.median(cpu[1:]),
            "prefill_tok_s": sum(map(len, prompts)) / max(steps[0] - decode, 1e-9),
            "outputs": [outs[i] for i in ids]}


# ---- transformers ------------------------------------------------------------------------------
class _Clock:
    """A generate() streamer that only reads the clock: put() gets the prompt, then each new token."""

    def __init__(self):
        self.t: list[float] = []

    def put(self, value):
        self.t.append(time.perf_counter())

    def end(self):
        pass


def hf_cache_bytes(cache) -> int:
    seen, total = set(), 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            x = getattr(layer, name, None)
            if isinstance(x, torch.Tensor) and x.data_ptr() not in seen:
                seen.add(x.data_ptr())
                total += x.numel() * x.element_size()
    return total


@torch.inference_mode()
def hf_run(hf, prompts: list[list[int]], new_tokens: int) -> dict:
    ids = torch.tensor(prompts)
    clock = _Clock()
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                      streamer=clock, return_dict_in_generate=True)
    t = clock.t  # t[0] before prefill, t[1] first token, then one per decode step
    steps = [b - a for a, b in zip(t[1:], t[2:])]
    decode = statistics.median(steps)
    cache = out.past_key_values
    seq = cache.get_seq_length() if cache is not None else 0
    nbytes = hf_cache_bytes(cache)
    return {"first_step_s": t[1] - t[0], "decode_step_s": decode, "decode_tok_s": len(prompts) / decode,
            "prefill_tok_s": sum(map(len, prompts)) / (t[1] - t[0]),
            "cache_bytes_per_token": nbytes / (len(prompts) * seq) if seq else None,
            "outputs": out.sequences[:, ids.shape[1]:].tolist()}


def load_hf(path: str, dtype):
    import transformers
    from transformers import DeepseekV3ForCausalLM
    transformers.logging.set_verbosity_error()  # its load report lists the MTP layer it drops
    hf = DeepseekV3ForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa",
                                               experts_implementation="grouped_mm").eval()
    hf.generation_config.eos_token_id = None  # decode exactly new_tokens, as minke does
    hf.generation_config.pad_token_id = 0
    return hf


# ---- the comparison ----------------------------------------------------------------------------
def compare(args, cfg, dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    rand = lambda n, b=1: torch.randint(3, cfg.vocab_size, (b, n), generator=g).tolist()  # noqa: E731
    with tempfile.TemporaryDirectory() as d:
        minke.save(minke.build(cfg, seed=0), d)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = minke.load(d, dtype=dtype)
            hf = None if args.no_transformers else load_hf(d, dtype)

    ctxs = args.contexts
    max_ctx = max(ctxs)
    engine = lambda b, packed=True: Engine(model, max_batch=b, block_size=args.block_size,  # noqa: E731
                                           num_blocks=b * (-(-(max_ctx + args.new_tokens + 2) // args.block_size)),
                                           packed_decode=packed)
    # warm-up (allocator, first-call paths) for both
    minke_run(engine(1), rand(64), 4)
    if hf is not None:
        hf_run(hf, rand(64), 4)

    res: dict = {"minke": {}, "transformers": {}}
    runs = [(f"batch1_ctx{c}", rand(c)) for c in ctxs] + [(f"batch{args.batch}_ctx{ctxs[0]}", rand(ctxs[0], args.batch))]
    rounds: dict = {}  # batch-1 runs: per round (tok/s, CPU tok/s, copy bandwidth before, after)
    all_probes: list = []  # every copy-bandwidth probe taken
    for name, prompts in runs:
        n = args.new_tokens
        if len(prompts) == 1:
            probes, got = [copy_bandwidth()], []
            for _ in range(args.rounds):
                got.append(minke_run(engine(1), prompts, n))
                probes.append(copy_bandwidth())
            rounds[name] = [(g["decode_tok_s"], g["decode_tok_s_cpu"], a, b) for g, a, b in zip(got, probes, probes[1:])]
            all_probes += probes
            m = got[0]
            m["decode_tok_s"] = statistics.median(g["decode_tok_s"] for g in got)
            m["decode_tok_s_cpu"] = statistics.median(g["decode_tok_s_cpu"] for g in got)
        else:
            m = minke_run(engine(len(prompts)), prompts, n)
        res["minke"][name] = m
        print(f"{name}: minke {m['decode_tok_s']:.1f} tok/s", end="", file=sys.stderr, flush=True)
        if not args.no_plain:  # the reference path: the model's own GEMMs, no packed weights
            pl = minke_run(engine(len(prompts), packed=False), prompts, n)
            res.setdefault("minke_plain", {})[name] = pl
            print(f" (plain GEMMs {pl['decode_tok_s']:.1f}{'' if pl['outputs'] == m['outputs'] else ', outputs differ'})",
                  end="", file=sys.stderr, flush=True)
        if hf is not None:
            h = hf_run(hf, prompts, n)
            res["transformers"][name] = h
            same = h["outputs"] == m["outputs"]
            res.setdefault("same_tokens", {})[name] = same
            print(f", transformers {h['decode_tok_s']:.1f} tok/s ({m['decode_tok_s'] / h['decode_tok_s']:.2f}x)"
                  f"{'' if same else ' [outputs differ]'}", end="", file=sys.stderr)
        print(file=sys.stderr)

    bw, bw_cpu = max(p[0] for p in all_probes), max(p[1] for p in all_probes)
    pc = cfg.param_counts()
    elt = torch.empty((), dtype=dtype).element_size()
    weight_bytes = (pc["active"] - cfg.vocab_size * cfg.hidden_size) * elt
    cache_main = cfg.kv_cache_bytes_per_token(elt)["latent"]
    report = {
        "config": {"preset": args.preset, **{k: getattr(cfg, k) for k in (
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "q_lora_rank", "kv_lora_rank",
            "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "num_experts_per_tok",
            "n_shared_experts", "moe_intermediate_size", "intermediate_size")},
            "params_total": pc["total"], "params_active": pc["active"]},
        "dtype": args.dtype, "threads": torch.get_num_threads(), "new_tokens": args.new_tokens,
        "block_size": args.block_size,
        "load_average_at_start": args.loadavg,
        "load_average_at_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "transformers_impl": ({"attn_implementation": hf.config._attn_implementation,
                               "experts_implementation": hf.config._experts_implementation}
                              if hf is not None else None),
        "versions": {"torch": torch.__version__,
                     "transformers": __import__("transformers").__version__ if hf is not None else None},
    }
    for name, _ in runs:
        m = res["minke"][name]
        r = {"minke_decode_tok_s": round(m["decode_tok_s"], 2), "minke_decode_tok_s_cpu": round(m["decode_tok_s_cpu"], 2)}
        if "minke_plain" in res:
            pl = res["minke_plain"][name]
            r.update(minke_plain_decode_tok_s=round(pl["decode_tok_s"], 2),
                     minke_plain_decode_tok_s_cpu=round(pl["decode_tok_s_cpu"], 2),
                     packed_same_tokens_as_plain=pl["outputs"] == m["outputs"])
        if hf is not None:
            h = res["transformers"][name]
            r.update(transformers_decode_tok_s=round(h["decode_tok_s"], 2),
                     ratio=round(m["decode_tok_s"] / h["decode_tok_s"], 2), same_tokens=res["same_tokens"][name])
        report[name] = r
    big = f"batch1_ctx{max_ctx}"
    report["prefill"] = {"tokens": max_ctx, "minke_tok_s": round(res["minke"][big]["prefill_tok_s"], 1)}
    if hf is not None:
        report["prefill"].update(transformers_tok_s=round(res["transformers"][big]["prefill_tok_s"], 1),
                                 ratio=round(res["minke"][big]["prefill_tok_s"]
                                             / res["transformers"][big]["prefill_tok_s"], 2))
    report["cache_bytes_per_token"] = {
        "minke": cache_main, "minke_with_mtp": bytes_per_token(cfg, dtype, mtp=True),
        "transformers_measured": (round(res["transformers"][big]["cache_bytes_per_token"], 1)
                                  if hf is not None and res["transformers"][big]["cache_bytes_per_token"] else None),
        "decompressed_would_be": cfg.kv_cache_bytes_per_token(elt)["decompressed"]}
    bound = {"copy_bandwidth_GB_s": round(bw / 1e9, 2), "copy_bandwidth_GB_per_cpu_s": round(bw_cpu / 1e9, 2),
             "copy_bandwidth_GB_s_each": [round(p[0] / 1e9, 2) for p in all_probes],
             "active_weight_bytes": weight_bytes}
    for c in ctxs:
        per_tok = weight_bytes + c * cache_main
        each = [{"tok_s": round(t, 2), "copy_bandwidth_GB_s": round(max(a[0], b[0]) / 1e9, 2),
                 "fraction_of_bound": round(t * per_tok / max(a[0], b[0]), 3),
                 "fraction_of_bound_cpu_time": round(tc * per_tok / max(a[1], b[1]), 3)}
                for t, tc, a, b in rounds[f"batch1_ctx{c}"]]
        got = res["minke"][f"batch1_ctx{c}"]["decode_tok_s"]
        bound[f"ctx{c}"] = {"bytes_per_token": per_tok, "bound_tok_s": round(bw / per_tok, 2), "minke_tok_s": round(got, 2),
                            "fraction_of_bound": statistics.median(r["fraction_of_bound"] for r in each),
                            "fraction_of_bound_cpu_time": statistics.median(r["fraction_of_bound_cpu_time"] for r in each),
                            "rounds": each}
    report["bandwidth_bound_batch1"] = bound
    return report


def speculative(args, cfg, dtype) -> dict:
    """Plain vs MTP-speculative greedy decode at batch 1 on one model."""
    if args.model:
        model = minke.load(args.model, dtype=dtype)
        cfg = model.config
    else:
        model = minke.build(cfg, seed=0, dtype=dtype)
    prompt = None
    if args.model and os.path.exists(os.path.join(args.model, "tokenizer.json")):
        from minke.data.tokenizer import Tokenizer
        tok = Tokenizer.load(args.model)
        if args.chat:
            text = args.prompt or "Please reason step by step, and put your final answer within \\boxed{}. What is 12 * 7 + 5?"
            prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]))
        else:  # the format `minke pretrain` trains on (tasks/__init__.py), what a base model continues
            prompt = [tok.bos_id] + tok.encode(f"Question: {args.prompt or 'What is 12 * 7 + 5?'}\nAnswer:")
    if prompt is None:
        prompt = torch.randint(3, cfg.vocab_size, (64,), generator=torch.Generator().manual_seed(0)).tolist()
    out = {"model": args.model or "random init (default config)", "prompt_tokens": len(prompt),
           "prompt_format": "chat" if args.chat else "pretrain", "threads": torch.get_num_threads(),
           "new_tokens": args.new_tokens, "num_draft": args.num_draft}
    engines = {"plain": Engine(model, max_batch=1, block_size=args.block_size),
               "speculative": Engine(model, max_batch=1, block_size=args.block_size, speculative=True,
                                     num_draft=args.num_draft)}
    rates = {name: [] for name in engines}  # decode tokens per wall second, one per round
    cpu = {name: [] for name in engines}  # per CPU-second of this process: steadier on a shared machine
    outputs = {}
    for e in engines.values():
        minke_run(e, [prompt[:16]], 16)  # warm-up: prefill and several decode steps
    # rounds alternate the two, so drift of a shared machine hits both alike; ratios are paired per round
    for _ in range(args.repeats):
        for name, e in engines.items():
            e.stats = type(e.stats)()
            c0 = time.process_time()
            r = minke_run(e, [prompt], args.new_tokens)
            c = time.process_time() - c0
            # tokens/s over the decode steps (a speculative step emits a variable number of tokens)
            rates[name].append(sum(r["tokens"][1:]) / sum(r["steps"][1:]))
            cpu[name].append(sum(r["tokens"]) / c)  # prefill included: the same for both
            outputs.setdefault(name, r["outputs"][0])
    stats = engines["speculative"].stats  # of the last round (greedy: every round is the same)
    ratios = [s / p for s, p in zip(rates["speculative"], rates["plain"])]
    out.update({"repeats": args.repeats,
                "plain_tok_s": round(statistics.median(rates["plain"]), 2),
                "speculative_tok_s": round(statistics.median(rates["speculative"]), 2),
                "acceptance_rate": round(stats.acceptance_rate, 3),
                "tokens_per_verify_forward": round((stats.generated_tokens - stats.prefills) / stats.decode_forwards, 3),
                "speedup": round(statistics.median(ratios), 3),  # median over rounds of spec / plain
                "speedup_per_round": [round(x, 3) for x in ratios],
                "speedup_cpu_time": round(statistics.median(
                    [s / p for s, p in zip(cpu["speculative"], cpu["plain"])]), 3)})
    out["identical_outputs"] = outputs["plain"] == outputs["speculative"]
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # ---- model ----
    p.add_argument("--preset", default="small", help="minke preset whose widths to use (default: small)")
    p.add_argument("--layers", type=int, default=DEFAULT_OVERRIDES["num_hidden_layers"],
                   help="num_hidden_layers (default 4: 1 dense + 3 MoE)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights and cache dtype")
    p.add_argument("--model", help="a checkpoint directory (for --speculative)")
    # ---- what to measure ----
    p.add_argument("--contexts", default="512,4096", help="comma-separated prompt lengths for batch-1 decode")
    p.add_argument("--batch", type=int, default=8, help="batch for the batched decode figure (first context)")
    p.add_argument("--new-tokens", type=int, default=48, help="tokens decoded per run")
    p.add_argument("--rounds", type=int, default=3,
                   help="batch-1 decode runs per context, each between two copy-bandwidth probes (medians)")
    p.add_argument("--block-size", type=int, default=64, help="minke's cache block size")
    p.add_argument("--no-transformers", action="store_true", help="time minke only")
    p.add_argument("--no-plain", action="store_true",
                   help="skip minke's reference decode (Engine(packed_decode=False): the model's own GEMMs)")
    p.add_argument("--speculative", action="store_true", help="plain vs MTP speculative decode at batch 1")
    p.add_argument("--num-draft", type=int, default=1, help="draft tokens per step for --speculative")
    p.add_argument("--repeats", type=int, default=11, help="--speculative: rounds of plain then speculative; medians")
    p.add_argument("--prompt", help="prompt text for --speculative with a checkpoint's tokenizer")
    p.add_argument("--chat", action="store_true",
                   help="--speculative: wrap the prompt in the chat template (default: the pretraining format "
                        "'Question: …\\nAnswer:', the input a base checkpoint such as `make run`'s was trained on)")
    # ---- run ----
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default="out/bench_decode.json", help="also write the JSON here")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    args.contexts = [int(c) for c in args.contexts.split(",")]
    args.loadavg = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    dtype = getattr(torch, args.dtype)
    cfg = minke.preset(args.preset, num_hidden_layers=args.layers,
                       max_position_embeddings=max(max(args.contexts) * 2,
                                                   minke.preset(args.preset).max_position_embeddings))
    t0 = time.perf_counter()
    report = speculative(args, cfg, dtype) if args.speculative else compare(args, cfg, dtype)
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return report


if __name__ == "__main__":
    main()

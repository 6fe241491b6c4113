"""`minke cost`: the token economy — dollars per million input and output tokens.

Two ways in:
- **measured**: tokens/s from a benchmark JSON (benchmarks/decode.py's, a vLLM-style serving result, or
  any JSON with ``input_tok_s`` / ``output_tok_s``) or given directly (``--tokens-per-s IN OUT``), priced at
  ``--price`` dollars per accelerator-hour times ``--accelerators`` in the measured setup;
- **projected**: a roofline for a config (``--preset v3-671b`` or ``--model DIR``) on an accelerator preset
  and a deployment (sequences per GPU, prefill/decode expert-parallel widths, redundant experts, MTP
  acceptance), printed line by line beside DeepSeek's published API prices and day-6 serving figures.

The roofline (per GPU, one decode step of ``b`` sequences, each forwarding ``t`` tokens: 1, or 2 with an
MTP draft to verify, and emitting ``1 + acceptance`` tokens on average):
- memory time = bytes read / HBM bandwidth. Bytes = the non-routed weights (attention, dense and shared
  FFNs, norms, gates, the output head; not the embedding table: one row per token) + the routed experts
  this GPU holds that the step touches (with uniform routing a slot receives m = b·t·k/slots tokens on
  average and is touched with probability 1 − e^(−m)) + the MTP module's weights + the latent KV cache
  of every sequence at ``--context`` tokens (ModelConfig.kv_cache_bytes_per_token);
- compute time = GEMM FLOPs (2 per active parameter and token) at the FP8 rate when the weights are FP8
  + output head and absorbed-attention FLOPs at the BF16 rate (DeepSeek's serving: "matrix multiplications
  ... FP8 ... core MLA computations ... BF16");
- network time = the MoE all-to-all bytes that leave the node (dispatch in FP8, combine in BF16; one copy
  per remote expert, as DeepEP's low-latency decode kernels send them) / the GPU's NIC bandwidth;
- step time = the largest of the three (perfect overlap: the roofline's optimism; their sum, no overlap at
  all, is printed as the pessimistic end), tokens/s = emitted tokens / step time.
Prefill is compute-bound (or NIC-bound): FLOPs per prompt token = GEMMs + causal attention in MHA mode
over half the context on average; its all-to-all sends a token once per remote node (DeepEP's normal
kernels forward inside the node over NVLink); prompt tokens that hit the prefix cache cost nothing.
Not modelled: kernel efficiency below peak, EP load imbalance, latency targets, idle capacity.
Parameter and cache sizes come from ModelConfig.param_counts() / kv_cache_bytes_per_token().
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, replace

from .config import PRESETS, ConfigError, ModelConfig, preset


class CostError(ValueError):
    """A cost request that cannot be answered: a bad price, preset, deployment or benchmark file."""


# ---- accelerators ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Accelerator:
    name: str
    hbm_bytes_s: float  # HBM bandwidth, bytes/s
    bf16_flops: float  # dense (not 2:4 sparse) BF16 tensor-core FLOP/s
    fp8_flops: float  # dense FP8 tensor-core FLOP/s
    memory_bytes: float  # HBM capacity
    nic_bytes_s: float  # scale-out (InfiniBand/RoCE) bandwidth per GPU, one direction; 0 = ignore the network


# NVIDIA H100 SXM5 datasheet (and the Hopper whitepaper's table): 3.35 TB/s HBM3, 80 GB, 989.4 dense BF16
# TFLOP/s, 1978.9 dense FP8 (the datasheet's 1979/3958 are with 2:4 sparsity). The H800 SXM5 is the same
# die and memory with NVLink cut to 400 GB/s (export variant); DeepSeek-V3 §3.1 / day 6 serve on it. H200
# SXM: the same compute, 141 GB HBM3e at 4.8 TB/s (H200 datasheet). NIC: one 400 Gb/s ConnectX-7 per GPU
# (DGX H100/H200 and DeepSeek's H800 nodes, V3 report §3.1) = 50 GB/s per direction.
ACCELERATORS = {
    "H800": Accelerator("H800", 3.35e12, 989.4e12, 1978.9e12, 80e9, 50e9),
    "H100": Accelerator("H100", 3.35e12, 989.4e12, 1978.9e12, 80e9, 50e9),
    "H200": Accelerator("H200", 4.8e12, 989.4e12, 1978.9e12, 141e9, 50e9),
}

# DeepSeek's published figures. API: DeepSeek-R1's price list ($ per 1M tokens). Day 6: open-infra-index,
# 202502OpenSourceWeek/day_6_one_more_thing_deepseekV3R1_inference_system_overview.md (24 h from
# 2025-02-27 12:00 UTC+8): per H800 node ~73.7k input tok/s (cache hits included) in prefill or ~14.8k
# output tok/s in decode; 226.75 nodes on average at $2 per GPU-hour = $87,072/day; 608B input tokens
# (342B prefix-cache hits), 168B output; 20-22 tok/s per user; average KV length per output token 4,989;
# $562,027 theoretical revenue at R1 prices, 545% cost-profit margin.
DEEPSEEK = dict(api_input_miss=0.55, api_input_hit=0.14, api_output=2.19,
                prefill_node_tok_s=73.7e3, decode_node_tok_s=14.8e3, gpus_per_node=8, gpu_hour=2.0,
                nodes=226.75, daily_cost=87_072, daily_revenue=562_027, margin=5.45,
                input_tokens=608e9, cache_hit_tokens=342e9, output_tokens=168e9,
                user_tok_s=(20, 22), kv_length=4989)


def accelerator(name: str, **overrides) -> Accelerator:
    """A preset by name (case-insensitive), with any field given a non-None override."""
    acc = ACCELERATORS.get(name.upper())
    if acc is None:
        raise CostError(f"unknown accelerator {name!r}; known: {', '.join(ACCELERATORS)}")
    over = {k: v for k, v in overrides.items() if v is not None}
    for k, v in over.items():
        if v < 0 or (v == 0 and k != "nic_bytes_s"):
            raise CostError(f"accelerator {k} must be > 0, got {v}")
    return replace(acc, **over)


def usd_per_million(tok_s: float, usd_per_hour: float) -> float:
    """$ per 1M tokens for a machine that costs ``usd_per_hour`` and produces ``tok_s`` tokens/s."""
    return usd_per_hour / (tok_s * 3600) * 1e6


def _positive_price(price: float) -> None:
    if not price > 0:
        raise CostError(f"--price must be > 0 dollars per accelerator-hour, got {price}")


# ---- measured ----------------------------------------------------------------------------------
def _dotted(d, key: str, path: str):
    cur = d
    for part in key.split("."):
        if not isinstance(cur, dict) or part not in cur:
            raise CostError(f"{path}: no key {key!r} in the benchmark JSON")
        cur = cur[part]
    if isinstance(cur, bool) or not isinstance(cur, (int, float)):
        raise CostError(f"{path}: {key!r} is {cur!r}, not a number of tokens/s")
    return float(cur)


def read_bench(path: str, input_key: str | None = None, output_key: str | None = None) -> dict:
    """Input and output tokens/s from a benchmark JSON, with the keys they came from.

    Layouts recognised: benchmarks/decode.py (``prefill.minke_tok_s``; output = the fastest
    ``batch*_ctx*.minke_decode_tok_s``), vLLM's benchmark_serving (``output_throughput``, input =
    ``total_input_tokens / duration``), and plain ``input_tok_s`` / ``output_tok_s``. ``input_key`` /
    ``output_key`` (dotted, e.g. ``batch8_ctx512.minke_decode_tok_s``) pick any other number."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CostError(f"{path}: no such benchmark file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CostError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CostError(f"{path}: expected a JSON object of benchmark figures, got {type(data).__name__}")
    found = {}
    decode_runs = sorted(k for k, v in data.items() if k.startswith("batch") and isinstance(v, dict)
                         and isinstance(v.get("minke_decode_tok_s"), (int, float)))
    if isinstance(data.get("prefill"), dict) and "minke_tok_s" in data["prefill"]:
        found["input"] = ("prefill.minke_tok_s", _dotted(data, "prefill.minke_tok_s", path))
    if decode_runs:
        best = max(decode_runs, key=lambda k: data[k]["minke_decode_tok_s"])
        found["output"] = (f"{best}.minke_decode_tok_s", float(data[best]["minke_decode_tok_s"]))
    if "output_throughput" in data:
        found["output"] = ("output_throughput", _dotted(data, "output_throughput", path))
        if "total_input_tokens" in data and "duration" in data:
            found["input"] = ("total_input_tokens / duration", _dotted(data, "total_input_tokens", path)
                              / _dotted(data, "duration", path))
    for side in ("input", "output"):
        if f"{side}_tok_s" in data:
            found[side] = (f"{side}_tok_s", _dotted(data, f"{side}_tok_s", path))
    if input_key:
        found["input"] = (input_key, _dotted(data, input_key, path))
    if output_key:
        found["output"] = (output_key, _dotted(data, output_key, path))
    if not found:
        raise CostError(f"{path}: no throughput figures found (expected benchmarks/decode.py's prefill.minke_tok_s "
                        f"and batch*_ctx*.minke_decode_tok_s, vLLM's output_throughput, input_tok_s/output_tok_s, "
                        f"or name them with --input-key/--output-key)")
    for side, (key, v) in found.items():
        if not v > 0:
            raise CostError(f"{path}: {key} = {v}: tokens/s must be > 0")
    out = {side: {"key": key, "tok_s": v} for side, (key, v) in found.items()}
    cfg = data.get("config")
    if isinstance(cfg, dict) and isinstance(cfg.get("params_total"), (int, float)):  # decode.py's record
        out["model"] = f"{cfg.get('preset', 'model')} at {cfg.get('num_hidden_layers', '?')} layers, " \
                       f"{cfg['params_total'] / 1e6:,.1f}M parameters, {data.get('dtype', '?')}"
    return out


def measured(rates: dict, price: float, accelerators: int) -> dict:
    """$/1M tokens from measured rates ({"input"/"output": tokens/s}), each priced as if the machine did only
    that (separate prefill and decode measurements, or a split deployment like DeepSeek's)."""
    _positive_price(price)
    if accelerators < 1:
        raise CostError(f"--accelerators must be >= 1, got {accelerators}")
    usd_h = price * accelerators
    out = {"price_per_accelerator_hour": price, "accelerators": accelerators, "usd_per_hour": usd_h}
    for side, tok_s in rates.items():
        if not tok_s > 0:
            raise CostError(f"{side} tokens/s must be > 0, got {tok_s}")
        out[side] = {"tok_s": tok_s, "usd_per_1m": usd_per_million(tok_s, usd_h)}
    return out


# ---- the model's sizes -------------------------------------------------------------------------
@dataclass(frozen=True)
class Sizes:
    """What the roofline needs of a model, in parameters, FLOPs and bytes."""

    n_routed: int  # routed experts per MoE layer (0: dense)
    top_k: int  # routed experts per token
    moe_layers: int  # MoE layers in the main model
    expert: float  # parameters of one routed expert in one layer
    dense: float  # every main-model parameter outside the routed experts (embedding and head included)
    embedding: float
    head: float
    active: float  # parameters used per token (embedding and head included)
    hidden: int
    mtp_dense: float  # MTP modules' parameters outside their routed experts (embedding/head shared, not counted)
    mtp_active: float  # MTP modules' parameters used per token
    mtp_moe_layers: int
    kv_bytes: float  # latent cache bytes per token, main layers
    kv_bytes_mtp: float  # the same with the MTP layers
    attn_decode: float  # absorbed-attention FLOPs per token per cached token, main layers
    attn_prefill: float  # MHA-mode attention FLOPs per token per attended key, main layers
    attn_mtp_share: float  # MTP layers' attention FLOPs as a fraction of the main layers'

    @classmethod
    def of(cls, cfg: ModelConfig, kv_element_bytes: float = 2) -> "Sizes":
        pc = cfg.param_counts()
        L, nh = cfg.num_hidden_layers, cfg.num_attention_heads
        E = cfg.n_routed_experts or 0
        k = (cfg.num_experts_per_tok or 0) if E else 0
        moe = sum(cfg.is_moe_layer(i) for i in range(L))
        mtp_moe = sum(cfg.is_moe_layer(L + j) for j in range(cfg.num_nextn_predict_layers))
        if E and moe:
            if E == k:
                raise CostError(f"num_experts_per_tok = n_routed_experts = {E}: every routed expert is active, "
                                f"so expert parallelism has nothing to split; give the model as dense")
            # total − active = the inactive experts of every MoE layer = moe · (E − k) · expert
            expert = (pc["total"] - pc["active"]) / ((E - k) * moe)
        else:
            E = k = moe = mtp_moe = 0
            expert = 0.0
        emb = cfg.vocab_size * cfg.hidden_size
        head = 0 if cfg.tie_word_embeddings else emb
        kv = cfg.kv_cache_bytes_per_token(kv_element_bytes)["latent"]
        kv_mtp = cfg.kv_cache_bytes_per_token(kv_element_bytes, mtp=True)["latent"]
        latent, rope = cfg.kv_lora_rank, cfg.qk_rope_head_dim
        return cls(
            n_routed=E, top_k=k, moe_layers=moe, expert=expert, dense=pc["total"] - E * moe * expert,
            embedding=emb, head=head, active=pc["active"], hidden=cfg.hidden_size,
            mtp_dense=pc["mtp_unique"] - E * mtp_moe * expert,
            mtp_active=pc["mtp_unique"] - (E - k) * mtp_moe * expert, mtp_moe_layers=mtp_moe,
            kv_bytes=kv, kv_bytes_mtp=kv_mtp,
            # absorbed decode, per head and cached token: scores over the (latent + rope) key, then the
            # latent-valued output: 2 FLOPs per multiply-add
            attn_decode=2 * nh * (latent + rope + latent) * L,
            # MHA mode (prefill): q·k over qk_head_dim, p·v over v_head_dim
            attn_prefill=2 * nh * (cfg.qk_head_dim + cfg.v_head_dim) * L,
            attn_mtp_share=cfg.num_nextn_predict_layers / L)


# ---- deployment and projection -----------------------------------------------------------------
@dataclass
class Deployment:
    gpus_per_node: int = 8
    batch: int = 88  # sequences per GPU in decode: 14.8k tok/s / 8 GPUs / ~21 tok/s per user (day 6)
    # cached tokens per sequence in decode (day 6: the mean per output token); the prompt length in prefill
    context: int = 4989
    decode_ep: int = 144  # day 6: routed experts EP144 (18 nodes), MLA and shared expert DP144
    prefill_ep: int = 32  # day 6: EP32 (4 nodes)
    redundant_experts: int = 32  # day 6: 32 redundant routed experts in both phases
    mtp_accept: float = 0.85  # V3 §5.4.3: second-token acceptance 85-90%; 0 = no MTP
    cache_hit: float = 0.563  # share of prompt tokens served from the prefix cache (day 6: 342B / 608B)
    weight_bytes: float = 1.0  # per parameter: 1 = FP8 (V3's checkpoint); embedding and head stay 2 (BF16)
    kv_element_bytes: float = 2.0  # BF16 latent cache (FlashMLA)

    def validate(self) -> None:
        for k, flag in (("gpus_per_node", "--accelerators"), ("batch", "--batch"), ("context", "--context"),
                        ("decode_ep", "--decode-ep"), ("prefill_ep", "--prefill-ep")):
            v = getattr(self, k)
            if not (isinstance(v, int) and v >= 1):
                raise CostError(f"{flag} ({k}) must be an integer >= 1, got {v!r}")
        if self.redundant_experts < 0:
            raise CostError(f"--redundant-experts must be >= 0, got {self.redundant_experts}")
        if not 0 <= self.mtp_accept < 1:
            raise CostError(f"--mtp-accept must lie in [0, 1) (0 = no MTP), got {self.mtp_accept}")
        if not 0 <= self.cache_hit < 1:
            raise CostError(f"--cache-hit must lie in [0, 1), got {self.cache_hit}")
        for k in ("weight_bytes", "kv_element_bytes"):
            if not getattr(self, k) > 0:
                raise CostError(f"--{k.replace('_', '-')} must be > 0, got {getattr(self, k)}")


def _g(x: float) -> str:
    """Engineering notation for the arithmetic lines: 3 significant figures."""
    return f"{x:.3g}" if abs(x) < 1e4 else f"{x:.3e}".replace("e+0", "e").replace("e+", "e")


def _t(seconds: float) -> str:
    for unit, scale in (("s", 1), ("ms", 1e3), ("µs", 1e6)):
        if seconds * scale >= 1:
            return f"{seconds * scale:.2f} {unit}"
    return f"{seconds * 1e9:.3g} ns"


def project(s: Sizes, acc: Accelerator, dep: Deployment, price: float) -> dict:
    """The roofline for one deployment; returns every intermediate and ``lines``, the arithmetic as text."""
    _positive_price(price)
    dep.validate()
    G, b, ctx = dep.gpus_per_node, dep.batch, dep.context
    mtp = dep.mtp_accept > 0 and s.mtp_active > 0
    t = 2 if mtp else 1  # tokens each sequence forwards per step: the last token (+ the draft to verify)
    emitted = 1 + dep.mtp_accept if mtp else 1.0
    wb, hb = dep.weight_bytes, max(dep.weight_bytes, 2.0)  # embedding and head stay BF16 in V3's FP8 checkpoint
    gemm_rate = acc.fp8_flops if wb <= 1 else acc.bf16_flops
    moe_layers = s.moe_layers + (s.mtp_moe_layers if mtp else 0)
    lines = []
    L = lines.append

    def slots_for(ep):
        return math.ceil((s.n_routed + dep.redundant_experts) / ep) if s.n_routed else 0

    def remote(ep):  # share of a token's routed experts on another node (EP spans ceil(ep / G) nodes)
        return max(ep - G, 0) / ep

    # ---- decode ----
    slots = slots_for(dep.decode_ep)
    r = {"mtp": mtp, "tokens_forwarded_per_seq": t, "tokens_emitted_per_seq": emitted}
    L(f"decode, per GPU: EP{dep.decode_ep} over {math.ceil(dep.decode_ep / G)} nodes, {b} sequences × {ctx} "
      f"cached tokens, " + (f"MTP: {t} tokens forwarded, 1 + {dep.mtp_accept} = {emitted:.3g} emitted per step"
                             if mtp else "no MTP: 1 token per step"))
    touched = 0.0
    if s.n_routed:
        per_slot = b * t * s.top_k / slots
        touched = 1 - math.exp(-per_slot)
        L(f"  expert slots per GPU     = ceil(({s.n_routed} + {dep.redundant_experts} redundant) / {dep.decode_ep}) "
          f"= {slots}; tokens per slot = {b}·{t}·{s.top_k} / {slots} = {per_slot:.3g} → touched 1 − e^−m = "
          f"{touched:.3f}")
    w_dense = wb * (s.dense - s.embedding - s.head) + hb * s.head
    w_routed = wb * slots * touched * s.expert * s.moe_layers
    w_mtp = (wb * s.mtp_dense + hb * s.head + wb * slots * touched * s.expert * s.mtp_moe_layers) if mtp else 0.0
    kv = s.kv_bytes_mtp if mtp else s.kv_bytes
    kv_read = b * ctx * kv
    bytes_step = w_dense + w_routed + w_mtp + kv_read
    t_mem = bytes_step / acc.hbm_bytes_s
    L(f"  weights read per step    = {_g(s.dense - s.embedding - s.head)} non-routed × {wb:g} B + {_g(s.head)} head "
      f"× {hb:g} B" + (f" + {slots}·{touched:.3f} experts × {_g(s.expert)} × {s.moe_layers} layers × {wb:g} B"
                       if s.n_routed else "")
      + (f" + MTP {_g(w_mtp)} B" if mtp else "") + f" = {_g(w_dense + w_routed + w_mtp)} B")
    L(f"  KV cache read per step   = {b} × {ctx} × {kv:,.0f} B = {_g(kv_read)} B")
    L(f"  memory time              = {_g(bytes_step)} B / {acc.hbm_bytes_s / 1e12:g} TB/s = {_t(t_mem)}")
    lin = s.active - s.embedding - s.head + (s.mtp_active if mtp else 0)
    heads = 2 if mtp else 1
    attn = s.attn_decode * (1 + (s.attn_mtp_share if mtp else 0)) * ctx
    fl_gemm = b * t * 2 * lin
    fl_bf16 = b * t * (2 * s.head * heads + attn)
    t_comp = fl_gemm / gemm_rate + fl_bf16 / acc.bf16_flops
    L(f"  GEMM FLOPs per step      = {b}·{t} tokens × 2 × {_g(lin)} active params = {_g(fl_gemm)} "
      f"at {gemm_rate / 1e12:.0f} TFLOP/s = {_t(fl_gemm / gemm_rate)}")
    L(f"  head + attention FLOPs   = {b}·{t} × (2 × {_g(s.head)} × {heads} + {_g(attn / ctx)} × {ctx} ctx) "
      f"= {_g(fl_bf16)} at {acc.bf16_flops / 1e12:.0f} TFLOP/s = {_t(fl_bf16 / acc.bf16_flops)}")
    L(f"  compute time             = {_t(t_comp)}")
    net_step = b * t * moe_layers * s.top_k * remote(dep.decode_ep) * s.hidden * 3  # FP8 out, BF16 back
    t_net = net_step / acc.nic_bytes_s if acc.nic_bytes_s else 0.0
    if acc.nic_bytes_s and net_step:
        L(f"  all-to-all off the node  = {b}·{t} × {moe_layers} layers × {s.top_k} × {remote(dep.decode_ep):.3f} "
          f"remote × {s.hidden} × (1 + 2) B = {_g(net_step)} B / {acc.nic_bytes_s / 1e9:g} GB/s = "
          f"{_t(t_net)}")
    step = max(t_mem, t_comp, t_net)
    bound = "HBM bandwidth" if step == t_mem else "compute" if step == t_comp else "network"
    dec_gpu = b * emitted / step
    L(f"  step = max(memory, compute, network) = {_t(step)} ({bound}-bound) → {b} × {emitted:.3g} / "
      f"{_t(step)} = {dec_gpu:,.0f} tok/s per GPU, {dec_gpu * G:,.0f} per node, "
      f"{emitted / step:.1f} per user")
    serial = t_mem + t_comp + t_net
    L(f"  no overlap at all        = {_t(t_mem)} + {_t(t_comp)} + {_t(t_net)} = {_t(serial)} → "
      f"{b * emitted / serial * G:,.0f} tok/s per node (the pessimistic end)")
    held = hb * (s.embedding + s.head) + wb * (s.dense - s.embedding - s.head + slots * s.expert * s.moe_layers)
    if mtp:
        held += wb * (s.mtp_dense + slots * s.expert * s.mtp_moe_layers)
    mem = held + b * ctx * kv
    fits = mem <= acc.memory_bytes
    max_batch = max(int((acc.memory_bytes - held) // (ctx * kv)), 0)
    L(f"  memory per GPU           = {held / 1e9:.1f} GB weights + {b * ctx * kv / 1e9:.1f} GB cache = "
      f"{mem / 1e9:.1f} GB of {acc.memory_bytes / 1e9:g} GB" + ("" if fits else "  ** DOES NOT FIT **")
      + f" (at most {max_batch} sequences at this context)")
    r["decode"] = {"expert_slots_per_gpu": slots, "experts_touched": touched, "weight_bytes_per_step":
                   w_dense + w_routed + w_mtp, "kv_bytes_per_step": kv_read, "bytes_per_step": bytes_step,
                   "gemm_flops_per_step": fl_gemm, "bf16_flops_per_step": fl_bf16,
                   "network_bytes_per_step": net_step, "memory_s": t_mem, "compute_s": t_comp, "network_s": t_net,
                   "step_s": step, "bound": bound, "tok_s_per_gpu": dec_gpu, "tok_s_per_node": dec_gpu * G,
                   "tok_s_per_user": emitted / step, "tok_s_per_node_no_overlap": b * emitted / serial * G,
                   "memory_bytes_per_gpu": mem, "fits": fits,
                   "max_batch": max_batch}

    # ---- prefill ----
    pslots = slots_for(dep.prefill_ep)
    p_lin = s.active - s.embedding - s.head + (s.mtp_active if mtp else 0)
    p_attn = s.attn_prefill * (1 + (s.attn_mtp_share if mtp else 0)) * ctx / 2  # causal: ctx/2 keys on average
    t_tok = 2 * p_lin / gemm_rate + p_attn / acc.bf16_flops
    # DeepEP's prefill kernels send a token once per remote node (NVLink forwards it inside the node): with
    # uniform routing over N nodes, k experts land on (N − 1)(1 − (1 − 1/N)^k) remote nodes on average
    n_nodes = math.ceil(dep.prefill_ep / G)
    p_copies = (n_nodes - 1) * (1 - (1 - 1 / n_nodes) ** s.top_k) if s.top_k else 0.0
    p_net = moe_layers * p_copies * s.hidden * 3
    t_tok_net = p_net / acc.nic_bytes_s if acc.nic_bytes_s else 0.0
    per_tok = max(t_tok, t_tok_net)
    pre_gpu = 1 / per_tok
    pre_node = pre_gpu * G
    pre_node_hits = pre_node / (1 - dep.cache_hit)
    L(f"prefill, per GPU: EP{dep.prefill_ep} over {n_nodes} nodes ({pslots} expert slots per GPU), "
      f"prompts of {ctx} tokens")
    L(f"  compute per token        = 2 × {_g(p_lin)} / {gemm_rate / 1e12:.0f}T + {_g(p_attn)} attention "
      f"({ctx}/2 keys) / {acc.bf16_flops / 1e12:.0f}T = {_t(t_tok)}")
    if acc.nic_bytes_s and p_net:
        L(f"  all-to-all per token     = {moe_layers} layers × {p_copies:.3f} remote nodes "
          f"[({n_nodes} − 1)(1 − (1 − 1/{n_nodes})^{s.top_k})] × {s.hidden} × (1 + 2) B = "
          f"{_g(p_net)} B / {acc.nic_bytes_s / 1e9:g} GB/s = {_t(t_tok_net)}")
    L(f"  → {pre_gpu:,.0f} computed tok/s per GPU, {pre_node:,.0f} per node; with {dep.cache_hit:.1%} prefix-cache "
      f"hits {pre_node:,.0f} / (1 − {dep.cache_hit:g}) = {pre_node_hits:,.0f} input tok/s per node")
    if t_tok_net:
        L(f"  no overlap at all        = {_t(t_tok)} + {_t(t_tok_net)} → {G / (t_tok + t_tok_net):,.0f} computed "
          f"tok/s per node, {G / (t_tok + t_tok_net) / (1 - dep.cache_hit):,.0f} with the hits")
    p_held = hb * (s.embedding + s.head) + wb * (s.dense - s.embedding - s.head + pslots * s.expert * s.moe_layers)
    r["prefill"] = {"expert_slots_per_gpu": pslots, "flops_s_per_token": t_tok, "network_s_per_token": t_tok_net,
                    "bound": "compute" if t_tok >= t_tok_net else "network", "tok_s_per_gpu": pre_gpu,
                    "tok_s_per_node": pre_node, "tok_s_per_node_with_hits": pre_node_hits,
                    "tok_s_per_node_with_hits_no_overlap": G / (t_tok + t_tok_net) / (1 - dep.cache_hit),
                    "weight_bytes_per_gpu": p_held}

    # ---- dollars ----
    node_h = price * G
    in_miss = usd_per_million(pre_node, node_h)
    in_all = usd_per_million(pre_node_hits, node_h)
    out = usd_per_million(dec_gpu * G, node_h)
    ds = DEEPSEEK
    ds_node_h = ds["gpu_hour"] * ds["gpus_per_node"]
    ds_in = usd_per_million(ds["prefill_node_tok_s"], ds_node_h)
    ds_out = usd_per_million(ds["decode_node_tok_s"], ds_node_h)
    L(f"cost at ${price:g}/GPU-hour × {G} = ${node_h:g}/node-hour: $/1M = node-hour / (tok/s × 3600) × 1e6")
    L(f"  input, computed (cache miss) = {node_h:g} / ({pre_node:,.0f} × 3600) × 1e6 = ${in_miss:.4f}   "
      f"(R1 API, cache miss: ${ds['api_input_miss']})")
    L(f"  input, cache hits included   = {node_h:g} / ({pre_node_hits:,.0f} × 3600) × 1e6 = ${in_all:.4f}   "
      f"(day 6: {ds_node_h:g} / (73,700 × 3600) × 1e6 = ${ds_in:.4f})")
    L(f"  output                       = {node_h:g} / ({dec_gpu * G:,.0f} × 3600) × 1e6 = ${out:.4f}   "
      f"(R1 API: ${ds['api_output']}; day 6: {ds_node_h:g} / (14,800 × 3600) × 1e6 = ${ds_out:.4f})")
    # The day-6 traffic at the projected rates: node-seconds of prefill and of decode, over a day.
    nodes = (ds["input_tokens"] / pre_node_hits + ds["output_tokens"] / (dec_gpu * G)) / 86400
    day_cost = nodes * G * price * 24
    rev = (ds["cache_hit_tokens"] * ds["api_input_hit"] + (ds["input_tokens"] - ds["cache_hit_tokens"])
           * ds["api_input_miss"] + ds["output_tokens"] * ds["api_output"]) / 1e6
    ds_nodes = (ds["input_tokens"] / ds["prefill_node_tok_s"] + ds["output_tokens"] / ds["decode_node_tok_s"]) / 86400
    L("the day-6 traffic (608B input tokens, 342B of them cache hits; 168B output) at these rates:")
    L(f"  nodes  = (608e9 / {pre_node_hits:,.0f} + 168e9 / {dec_gpu * G:,.0f}) / 86400 s = {nodes:.1f}   "
      f"(day 6: (608e9 / 73,700 + 168e9 / 14,800) / 86400 = {ds_nodes:.1f}; published 226.75)")
    L(f"  cost   = {nodes:.1f} × {G} × ${price:g} × 24 h = ${day_cost:,.0f}/day   "
      f"(day 6: 226.75 × 8 × $2 × 24 = ${ds['nodes'] * 8 * 2 * 24:,.0f})")
    L(f"  margin = (${rev:,.0f} − ${day_cost:,.0f}) / ${day_cost:,.0f} = {(rev - day_cost) / day_cost:.0%}   "
      f"(day 6: (562,027 − 87,072) / 87,072 = {(ds['daily_revenue'] - ds['daily_cost']) / ds['daily_cost']:.0%})")
    L(f"  revenue at R1 prices = 342e9 × $0.14 + 266e9 × $0.55 + 168e9 × $2.19 per 1M = ${rev:,.0f} "
      f"(published $562,027)")
    L(f"projection / day 6: prefill {pre_node_hits / ds['prefill_node_tok_s']:.2f}×, decode "
      f"{dec_gpu * G / ds['decode_node_tok_s']:.2f}×, per-user speed {emitted / step:.0f} vs 20-22 tok/s")
    r["usd_per_1m"] = {"input_cache_miss": in_miss, "input_with_hits": in_all, "output": out}
    r["day6_traffic"] = {"nodes": nodes, "usd_per_day": day_cost, "revenue_at_r1_prices": rev,
                         "margin": (rev - day_cost) / day_cost}
    r["deepseek"] = {**ds, "usd_per_1m_input_day6": ds_in, "usd_per_1m_output_day6": ds_out}
    r["ratio_to_day6"] = {"prefill": pre_node_hits / ds["prefill_node_tok_s"],
                          "decode": dec_gpu * G / ds["decode_node_tok_s"]}
    r["lines"] = lines
    return r


# ---- CLI ---------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="minke cost", description=__doc__.split("\n")[0])
    # ---- measured throughput ----
    p.add_argument("--bench", metavar="FILE",
                   help="a benchmark JSON (benchmarks/decode.py, a vLLM-style serving result)")
    p.add_argument("--tokens-per-s", nargs=2, type=float, metavar=("IN", "OUT"),
                   help="measured input and output tokens/s instead of a file")
    p.add_argument("--input-key", help="dotted key of the input tokens/s in --bench (default: recognised layouts)")
    p.add_argument("--output-key", help="dotted key of the output tokens/s in --bench")
    # ---- price ----
    p.add_argument("--price", type=float, default=DEEPSEEK["gpu_hour"],
                   help="dollars per accelerator-hour (default 2, DeepSeek's H800 assumption)")
    p.add_argument("--accelerators", type=int, default=None,
                   help="accelerators per node (projection, default 8) or in the measured run (default 1)")
    # ---- projection: model and accelerator ----
    p.add_argument("--preset", default="v3-671b", help=f"model preset, one of {', '.join(PRESETS)}")
    p.add_argument("--model", help="a checkpoint directory (its config.json) instead of a preset")
    p.add_argument("--accelerator", default="H800", help=f"one of {', '.join(ACCELERATORS)}")
    p.add_argument("--hbm-tb-s", type=float, help="override the preset's HBM bandwidth, TB/s")
    p.add_argument("--bf16-tflops", type=float, help="override the dense BF16 TFLOP/s")
    p.add_argument("--fp8-tflops", type=float, help="override the dense FP8 TFLOP/s")
    p.add_argument("--memory-gb", type=float, help="override the HBM capacity, GB")
    p.add_argument("--nic-gb-s", type=float,
                   help="override the per-GPU network bandwidth, GB/s (0: ignore the network)")
    # ---- projection: deployment ----
    d = Deployment()
    p.add_argument("--batch", type=int, default=d.batch, help=f"decode sequences per GPU (default {d.batch})")
    p.add_argument("--context", type=int, default=d.context,
                   help=f"cached tokens per sequence in decode, prompt length in prefill (default {d.context})")
    p.add_argument("--decode-ep", type=int, default=d.decode_ep, help="expert-parallel GPUs in decode (default 144)")
    p.add_argument("--prefill-ep", type=int, default=d.prefill_ep, help="expert-parallel GPUs in prefill (default 32)")
    p.add_argument("--redundant-experts", type=int, default=d.redundant_experts,
                   help="redundant copies of hot routed experts per EP group (default 32)")
    p.add_argument("--mtp-accept", type=float, default=d.mtp_accept,
                   help="MTP draft acceptance rate (default 0.85; 0 = no MTP)")
    p.add_argument("--cache-hit", type=float, default=d.cache_hit,
                   help="share of prompt tokens hitting the prefix cache (default 0.563, day 6)")
    p.add_argument("--weight-bytes", type=float, default=None,
                   help="bytes per weight (default 1 for an FP8 config, else 2)")
    p.add_argument("--kv-bytes", type=float, default=d.kv_element_bytes, help="bytes per cache element (default 2)")
    p.add_argument("--json", action="store_true", help="print JSON")
    a = p.parse_args(argv)
    try:
        if a.bench or a.tokens_per_s:
            if a.bench and a.tokens_per_s:
                raise CostError("give --bench FILE or --tokens-per-s IN OUT, not both")
            n = 1 if a.accelerators is None else a.accelerators
            if a.bench:
                found = read_bench(a.bench, a.input_key, a.output_key)
                rates = {side: found[side]["tok_s"] for side in ("input", "output") if side in found}
            else:
                found = None
                rates = {"input": a.tokens_per_s[0], "output": a.tokens_per_s[1]}
            r = measured(rates, a.price, n)
            if found:
                for side in rates:
                    r[side]["key"] = found[side]["key"]
                if "model" in found:
                    r["model"] = found["model"]
            _print_measured(r, a.bench, a.json)
            return 0
        cfg = ModelConfig.load(a.model) if a.model else preset(a.preset)
        acc = accelerator(a.accelerator, hbm_bytes_s=_scale(a.hbm_tb_s, 1e12), bf16_flops=_scale(a.bf16_tflops, 1e12),
                          fp8_flops=_scale(a.fp8_tflops, 1e12), memory_bytes=_scale(a.memory_gb, 1e9),
                          nic_bytes_s=_scale(a.nic_gb_s, 1e9))
        fp8 = (cfg.quantization_config or {}).get("quant_method") == "fp8"
        dep = Deployment(gpus_per_node=8 if a.accelerators is None else a.accelerators, batch=a.batch,
                         context=a.context, decode_ep=a.decode_ep, prefill_ep=a.prefill_ep,
                         redundant_experts=a.redundant_experts, mtp_accept=a.mtp_accept, cache_hit=a.cache_hit,
                         weight_bytes=a.weight_bytes if a.weight_bytes is not None else (1.0 if fp8 else 2.0),
                         kv_element_bytes=a.kv_bytes)
        dep.validate()
        r = project(Sizes.of(cfg, dep.kv_element_bytes), acc, dep, a.price)
    except (CostError, ConfigError) as e:
        raise SystemExit(f"minke cost: {e}") from None
    if a.json:
        print(json.dumps({"model": a.model or a.preset, "accelerator": asdict(acc), "deployment": asdict(dep),
                          "price_per_gpu_hour": a.price, **r}, indent=2))
        return 0
    pc = cfg.param_counts()
    print(f"{a.model or a.preset} on {acc.name} × {dep.gpus_per_node} per node (HBM {acc.hbm_bytes_s / 1e12:g} TB/s, "
          f"BF16 {acc.bf16_flops / 1e12:g} / FP8 {acc.fp8_flops / 1e12:g} TFLOP/s dense, "
          f"{acc.memory_bytes / 1e9:g} GB, "
          f"NIC {acc.nic_bytes_s / 1e9:g} GB/s); {pc['total'] / 1e9:.1f}B params, {pc['active'] / 1e9:.2f}B active, "
          f"weights {dep.weight_bytes:g} B/param")
    print("\n".join(r["lines"]))
    return 0


def _scale(v, unit):
    return None if v is None else v * unit


def _print_measured(r: dict, path: str | None, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"bench": path, **r}, indent=2))
        return
    usd_h = r["usd_per_hour"]
    print(f"price: ${r['price_per_accelerator_hour']:g}/accelerator-hour × {r['accelerators']} = ${usd_h:g}/hour"
          + (f"; figures from {path}" if path else "") + (f" ({r['model']})" if "model" in r else ""))
    api = {"input": DEEPSEEK["api_input_miss"], "output": DEEPSEEK["api_output"]}
    for side in ("input", "output"):
        if side not in r:
            continue
        v = r[side]
        src = f" [{v['key']}]" if "key" in v else ""
        print(f"  {side:<6} = {usd_h:g} / ({v['tok_s']:,.1f} tok/s{src} × 3600) × 1e6 = ${v['usd_per_1m']:,.4f} "
              f"per 1M "
              f"tokens   (DeepSeek-R1 API: ${api[side]})")
    if "input" in r and "output" in r:
        print("  each rate priced as if the machine did only that (separate prefill and decode measurements)")


if __name__ == "__main__":
    raise SystemExit(main())

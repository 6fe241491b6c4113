"""`minke cost`: the arithmetic on hand-worked cases (round numbers a person can check on paper), the
model-size decomposition against hand counts, DeepSeek's published day-6 sums, and bad input."""

import json
import math

import pytest

import minke
from minke import cli
from minke.cost import (DEEPSEEK, Accelerator, CostError, Deployment, Sizes, accelerator, main, project,
                        read_bench, usd_per_million)

# A toy model with round sizes: 1000 non-routed parameters (embedding 100 and head 100 among them), 4 routed
# experts of 10 parameters in one MoE layer, 2 active: 1000 + 2·10 = 1020 active. Cache 4 B per token;
# decode attention 2 FLOPs per token per cached token, prefill 4 per attended key.
TOY = Sizes(n_routed=4, top_k=2, moe_layers=1, expert=10, dense=1000, embedding=100, head=100, active=1020,
            hidden=10, mtp_dense=0, mtp_active=0, mtp_moe_layers=0, kv_bytes=4, kv_bytes_mtp=4,
            attn_decode=2, attn_prefill=4, attn_mtp_share=0)
# 1000 B/s of HBM, 1000 BF16 and 2000 FP8 FLOP/s, no network term
TOY_ACC = Accelerator("toy", hbm_bytes_s=1000, bf16_flops=1000, fp8_flops=2000, memory_bytes=1e6, nic_bytes_s=0)


def test_usd_per_million_by_hand():
    # $3.60/hour = $0.001/s; at 1000 tok/s a token costs $1e-6: $1 per 1M
    assert usd_per_million(1000, 3.6) == pytest.approx(1.0)
    assert usd_per_million(100, 7.2) == pytest.approx(20.0)


def test_decode_and_prefill_projection_by_hand():
    """2 GPUs per node, EP2, batch 2 sequences of 10 cached tokens, FP8 weights, no MTP, half the prompt
    tokens cached. Fails with the head read at 1 byte, attention at the FP8 rate, or the cache hits not
    credited to prefill."""
    dep = Deployment(gpus_per_node=2, batch=2, context=10, decode_ep=2, prefill_ep=2, redundant_experts=0,
                     mtp_accept=0, cache_hit=0.5, weight_bytes=1)
    r = project(TOY, TOY_ACC, dep, price=3.6)
    d = r["decode"]
    # 2 expert slots per GPU = ceil(4 / 2); each gets 2 seqs · 1 token · top-2 / 2 slots = 2 tokens on average,
    # so it is touched with probability 1 − e^-2
    assert d["expert_slots_per_gpu"] == 2
    touched = 1 - math.exp(-2)
    assert d["experts_touched"] == pytest.approx(touched)
    # bytes: 800 non-routed × 1 B + head 100 × 2 B + 2·touched experts × 10 × 1 B; cache 2 × 10 × 4 B = 80
    assert d["weight_bytes_per_step"] == pytest.approx(1000 + 20 * touched)
    assert d["kv_bytes_per_step"] == 80
    assert d["memory_s"] == pytest.approx((1080 + 20 * touched) / 1000)
    # FLOPs: 2 tokens × 2 × 820 linear params = 3280 at 2000/s = 1.64 s; head + attention
    # 2 × (2 × 100 + 2 × 10) = 440 at 1000/s = 0.44 s
    assert d["gemm_flops_per_step"] == 3280 and d["bf16_flops_per_step"] == 440
    assert d["compute_s"] == pytest.approx(2.08)
    assert d["bound"] == "compute" and d["step_s"] == pytest.approx(2.08)
    assert d["tok_s_per_gpu"] == pytest.approx(2 / 2.08)
    assert d["tok_s_per_node"] == pytest.approx(4 / 2.08)
    assert d["tok_s_per_node_no_overlap"] == pytest.approx(4 / (2.08 + d["memory_s"]))  # no network term
    # memory held: embedding + head 200 × 2 B + (800 + 2 slots × 10) × 1 B = 1220, + 80 B of cache
    assert d["memory_bytes_per_gpu"] == pytest.approx(1300) and d["fits"]
    assert d["max_batch"] == (1_000_000 - 1220) // 40
    # prefill: 2 × 820 / 2000 + 4 × 10/2 / 1000 = 0.84 s per token per GPU
    p = r["prefill"]
    assert p["tok_s_per_gpu"] == pytest.approx(1 / 0.84)
    assert p["tok_s_per_node_with_hits"] == pytest.approx(2 / 0.84 / 0.5)
    # dollars: $3.6 × 2 GPUs = $7.2/node-hour = $0.002/s
    c = r["usd_per_1m"]
    assert c["output"] == pytest.approx(0.002 / (4 / 2.08) * 1e6)  # $1040
    assert c["output"] == pytest.approx(1040)
    assert c["input_cache_miss"] == pytest.approx(840)
    assert c["input_with_hits"] == pytest.approx(420)


def test_mtp_and_network_bound_by_hand():
    """One GPU per node, EP2 (half of the experts on the other node), an MTP module of 50 non-routed
    parameters (60 used per token), acceptance 0.5, a 20 B/s NIC. Fails with the draft tokens not
    forwarded (t = 1) or the remote share taken as 1."""
    s = Sizes(**{**TOY.__dict__, "mtp_dense": 50, "mtp_active": 60, "kv_bytes_mtp": 5, "attn_mtp_share": 0.5})
    acc = Accelerator("toy", hbm_bytes_s=1000, bf16_flops=1000, fp8_flops=2000, memory_bytes=1e6, nic_bytes_s=20)
    dep = Deployment(gpus_per_node=1, batch=2, context=10, decode_ep=2, prefill_ep=2, redundant_experts=0,
                     mtp_accept=0.5, cache_hit=0, weight_bytes=1)
    r = project(s, acc, dep, price=3.6)
    d = r["decode"]
    assert r["tokens_forwarded_per_seq"] == 2 and r["tokens_emitted_per_seq"] == 1.5
    touched = 1 - math.exp(-4)  # 2 seqs · 2 tokens · top-2 / 2 slots = 4 tokens per slot
    # weights 1000 + experts 20·touched + MTP (50 × 1 B + the head again 100 × 2 B); cache 2 × 10 × 5 B
    assert d["bytes_per_step"] == pytest.approx(1000 + 20 * touched + 250 + 100)
    # GEMMs 2·2 tokens × 2 × (820 + 60) = 7040 / 2000 = 3.52 s; two heads and 1.5× the attention:
    # 4 × (2 × 100 × 2 + 2 × 1.5 × 10) = 1720 / 1000 = 1.72 s
    assert d["compute_s"] == pytest.approx(5.24)
    # all-to-all: 4 tokens × 1 layer × top-2 × 1/2 remote × 10 × 3 B = 120 B / 20 B/s = 6 s
    assert d["network_bytes_per_step"] == pytest.approx(120)
    assert d["bound"] == "network" and d["step_s"] == pytest.approx(6.0)
    assert d["tok_s_per_gpu"] == pytest.approx(2 * 1.5 / 6)
    assert d["tok_s_per_user"] == pytest.approx(0.25)
    # prefill: 2 nodes; top-2 lands on (2 − 1)(1 − (1/2)^2) = 0.75 remote nodes: 0.75 × 10 × 3 B = 22.5 B
    # / 20 B/s = 1.125 s > compute 2 × 880 / 2000 + 4 × 1.5 × 5 / 1000 = 0.91 s
    p = r["prefill"]
    assert p["network_s_per_token"] == pytest.approx(1.125) and p["flops_s_per_token"] == pytest.approx(0.91)
    assert p["bound"] == "network" and p["tok_s_per_gpu"] == pytest.approx(1 / 1.125)
    assert p["tok_s_per_node_with_hits_no_overlap"] == pytest.approx(1 / (1.125 + 0.91))
    assert d["tok_s_per_node_no_overlap"] == pytest.approx(3 / (d["memory_s"] + 5.24 + 6.0))


def test_sizes_match_hand_counts():
    """tiny: hidden 64, 3 layers (1 dense + 2 MoE), 8 experts of 3·64·32 parameters, top-2, an MoE MTP layer,
    latent 32 + rope 8, 4 heads. Fails with the routed experts left inside ``dense``."""
    cfg = minke.preset("tiny")
    s = Sizes.of(cfg)
    pc = cfg.param_counts()
    e = 3 * 64 * 32
    assert (s.n_routed, s.top_k, s.moe_layers, s.mtp_moe_layers) == (8, 2, 2, 1)
    assert s.expert == e
    assert s.dense == pc["total"] - 8 * 2 * e
    assert s.dense + 2 * 2 * e == pc["active"]  # top-2 in each of 2 MoE layers
    assert s.mtp_dense == pc["mtp_unique"] - 8 * e and s.mtp_active == pc["mtp_unique"] - 6 * e
    assert s.kv_bytes == (32 + 8) * 3 * 2 and s.kv_bytes_mtp == (32 + 8) * 4 * 2
    assert s.attn_decode == 2 * 4 * (32 + 8 + 32) * 3
    assert s.attn_prefill == 2 * 4 * (24 + 16) * 3
    v3 = Sizes.of(minke.preset("v3-671b"))
    assert v3.expert == 3 * 7168 * 2048 and v3.moe_layers == 58
    assert v3.embedding == v3.head == 129280 * 7168


def test_deepseek_published_arithmetic():
    ds = DEEPSEEK
    assert ds["nodes"] * ds["gpus_per_node"] * ds["gpu_hour"] * 24 == pytest.approx(ds["daily_cost"])
    assert (ds["daily_revenue"] - ds["daily_cost"]) / ds["daily_cost"] == pytest.approx(ds["margin"], abs=0.01)
    # 608B / 73.7k + 168B / 14.8k node-seconds over a day ≈ the published 226.75 average nodes
    nodes = (ds["input_tokens"] / ds["prefill_node_tok_s"] + ds["output_tokens"] / ds["decode_node_tok_s"]) / 86400
    assert nodes == pytest.approx(226.75, rel=0.01)
    # $16/node-hour over 14.8k output tok/s: $0.30 per 1M
    assert usd_per_million(ds["decode_node_tok_s"], 16) == pytest.approx(0.3003, abs=1e-4)


def test_v3_on_h800_prints_the_arithmetic(capsys):
    assert cli.main(["cost", "--accelerator", "h800"]) == 0
    out = capsys.readouterr().out
    assert "v3-671b on H800" in out and "EP144" in out and "EP32" in out
    assert "$87,072" in out and "545%" in out and "$2.19" in out and "$0.55" in out
    assert "ceil((256 + 32 redundant) / 144) = 2" in out
    assert main(["--json", "--nic-gb-s", "0"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["decode"]["network_s"] == 0 and r["decode"]["fits"]
    assert r["decode"]["bound"] in ("compute", "HBM bandwidth")
    assert r["deployment"]["weight_bytes"] == 1.0  # FP8 config


def test_measured_from_rates_and_files(tmp_path, capsys):
    assert main(["--tokens-per-s", "1000", "100", "--price", "3.6", "--accelerators", "2", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["input"]["usd_per_1m"] == pytest.approx(2.0) and r["output"]["usd_per_1m"] == pytest.approx(20.0)
    # benchmarks/decode.py's layout: the fastest decode run is the output figure
    f = tmp_path / "decode.json"
    f.write_text(json.dumps({"config": {"preset": "small", "num_hidden_layers": 4, "params_total": 106_804_480},
                             "dtype": "float32", "prefill": {"tokens": 4096, "minke_tok_s": 2000.0},
                             "batch1_ctx512": {"minke_decode_tok_s": 10.0},
                             "batch8_ctx512": {"minke_decode_tok_s": 40.0}}))
    assert main(["--bench", str(f), "--price", "3.6", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["output"]["key"] == "batch8_ctx512.minke_decode_tok_s"
    assert r["model"] == "small at 4 layers, 106.8M parameters, float32"
    assert r["output"]["usd_per_1m"] == pytest.approx(25.0) and r["input"]["usd_per_1m"] == pytest.approx(0.5)
    assert read_bench(str(f), output_key="batch1_ctx512.minke_decode_tok_s")["output"]["tok_s"] == 10.0
    # vLLM benchmark_serving's result: input = total_input_tokens / duration
    g = tmp_path / "serve.json"
    g.write_text(json.dumps({"output_throughput": 50.0, "total_input_tokens": 10_000, "duration": 10.0}))
    b = read_bench(str(g))
    assert b["output"]["tok_s"] == 50.0 and b["input"]["tok_s"] == 1000.0
    assert main(["--bench", str(g), "--price", "1.8"]) == 0
    assert "$10.0000" in capsys.readouterr().out  # 1.8 / (50 × 3600) × 1e6


@pytest.mark.parametrize("argv, message", [
    (["--price", "0"], "--price must be > 0"),
    (["--price", "-2"], "--price must be > 0"),
    (["--tokens-per-s", "10", "10", "--price", "0"], "--price must be > 0"),
    (["--accelerator", "A100"], "unknown accelerator 'A100'; known: H800, H100, H200"),
    (["--mtp-accept", "1"], "--mtp-accept must lie in [0, 1)"),
    (["--batch", "0"], "--batch (batch) must be an integer >= 1"),
    (["--accelerators", "0"], "--accelerators (gpus_per_node) must be an integer >= 1"),
    (["--tokens-per-s", "0", "10"], "input tokens/s must be > 0"),
])
def test_bad_requests_are_named(argv, message):
    with pytest.raises(SystemExit, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        main(argv)


def test_bad_benchmark_files_are_named(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SystemExit, match=f"{bad}: not valid JSON"):
        main(["--bench", str(bad)])
    with pytest.raises(SystemExit, match="nope.json: no such benchmark file"):
        main(["--bench", str(tmp_path / "nope.json")])
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"wall_s": 3, "note": "x"}))
    with pytest.raises(SystemExit, match=f"{empty}: no throughput figures found"):
        main(["--bench", str(empty)])
    with pytest.raises(SystemExit, match="no key 'x.y'"):
        main(["--bench", str(empty), "--output-key", "x.y"])
    with pytest.raises(CostError, match="not a number"):
        read_bench(str(empty), input_key="note")


def test_accelerator_overrides():
    a = accelerator("h200", hbm_bytes_s=5e12)
    assert a.name == "H200" and a.hbm_bytes_s == 5e12 and a.memory_bytes == 141e9
    with pytest.raises(CostError, match="must be > 0"):
        accelerator("H100", bf16_flops=0)

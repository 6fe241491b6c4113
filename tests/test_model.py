"""The model against transformers and against its own slow references."""

import warnings

import pytest
import torch

import minke
from minke.inference.kv_cache import LatentCache
from minke.model.moe import grouped_moe, looped_moe

TOL = 1e-4


def ids(vocab, B=2, T=24, seed=0):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def load_quiet(path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers drops MTP weights; minke says so
        return minke.load(path, **kw)


def test_v3_logits_match_transformers(hf_v3_dir):
    d, hf = hf_v3_dir
    cfg = minke.ModelConfig.load(d)
    assert cfg.topk_method == "noaux_tc" and cfg.n_group > 1 and cfg.q_lora_rank and cfg.yarn
    model = load_quiet(d, dtype=torch.float32)
    x = ids(cfg.vocab_size)
    with torch.no_grad():
        diff = (model(x).logits - hf(x).logits).abs().max().item()
    assert diff <= TOL, diff
    gate = model.layers[1].mlp.gate
    assert gate.e_score_correction_bias.abs().min() > 0  # the random routing bias was loaded and used


def test_v2_lite_logits_match_transformers(hf_v2_dir):
    d, hf = hf_v2_dir
    cfg = minke.ModelConfig.load(d)
    assert cfg.q_lora_rank is None and cfg.topk_method == "greedy" and cfg.scoring_func == "softmax"
    model = load_quiet(d, dtype=torch.float32)
    assert hasattr(model.layers[0].self_attn, "q_proj")
    x = ids(cfg.vocab_size, seed=1)
    with torch.no_grad():
        diff = (model(x).logits - hf(x).logits).abs().max().item()
    assert diff <= TOL, diff


def test_v2_group_limited_greedy_matches_transformers(tmp_path):
    from transformers import DeepseekV2ForCausalLM

    from conftest import hf_v2_lite_config, randomize_hf
    torch.manual_seed(0)
    hf = randomize_hf(DeepseekV2ForCausalLM(hf_v2_lite_config(topk_method="group_limited_greedy", n_group=4,
                                                               topk_group=2)), seed=2)
    hf.save_pretrained(tmp_path)
    model = load_quiet(tmp_path, dtype=torch.float32)
    x = ids(256, seed=2)
    with torch.no_grad():
        assert (model(x).logits - hf(x).logits).abs().max().item() <= TOL


def test_roundtrip_transformers_minke_transformers(hf_v3_dir, tmp_path):
    from transformers import DeepseekV3ForCausalLM

    d, hf = hf_v3_dir
    model = load_quiet(d, dtype=torch.float32)
    minke.save(model, tmp_path)
    hf2 = DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    x = ids(256, seed=3)
    with torch.no_grad():
        assert torch.equal(hf2(x).logits, hf(x).logits)


def test_mtp_weights_survive_save_load_bitwise(tmp_path):
    cfg = minke.preset("tiny", num_nextn_predict_layers=2)
    model = minke.build(cfg, seed=3)
    with torch.no_grad():
        for p in model.mtp.parameters():
            p.add_(torch.randn_like(p))
    minke.save(model, tmp_path)
    back = minke.load(tmp_path, dtype=torch.float32)
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and any(k.startswith("mtp.1.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    x = ids(cfg.vocab_size)
    with torch.no_grad():
        o1, o2 = model(x, mtp=True), back(x, mtp=True)
    assert len(o1.mtp_logits) == 2 and all(torch.equal(p, q) for p, q in zip(o1.mtp_logits, o2.mtp_logits))


def test_mtp_shapes_and_dependence():
    cfg = minke.preset("tiny")
    model = minke.build(cfg).eval()
    x = ids(cfg.vocab_size, T=12)
    with torch.no_grad():
        out = model(x, mtp=True)
        assert out.mtp_logits[0].shape == (2, 11, cfg.vocab_size)
        # position i of MTP module 1 reads token i+1: changing the last token moves only the last position
        y = x.clone()
        y[:, -1] = (y[:, -1] + 1) % cfg.vocab_size
        out2 = model(y, mtp=True)
    same = (out.mtp_logits[0] - out2.mtp_logits[0]).abs().amax(dim=(0, 2))
    assert same[:-1].max() < 1e-5 and same[-1] > 1e-3


@pytest.mark.parametrize("yarn", [False, True])
def test_absorbed_decode_matches_mha_forward(yarn):
    over = dict(v_head_dim=12)
    if yarn:
        over["rope_scaling"] = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                "mscale": 1.0, "mscale_all_dim": 0.8}
    cfg = minke.preset("tiny", **over)
    model = minke.build(cfg, seed=1).eval()
    x = ids(cfg.vocab_size, B=2, T=20)
    with torch.no_grad():
        full = model(x).logits
        cache = LatentCache(cfg, batch=2, max_len=32)
        steps = []
        for t in range(x.shape[1]):  # one token at a time, every step absorbed over the latent cache
            steps.append(model(x[:, t:t + 1], cache=cache, absorb=True).logits)
            cache.advance()
        inc = torch.cat(steps, dim=1)
    assert (inc - full).abs().max().item() <= TOL
    # the cache holds exactly kv_lora_rank + qk_rope_head_dim numbers per token and layer
    assert cache.c_kv.shape[-1] + cache.k_pe.shape[-1] == cfg.kv_lora_rank + cfg.qk_rope_head_dim


def test_prefill_then_absorbed_decode_matches():
    cfg = minke.preset("tiny")
    model = minke.build(cfg, seed=2).eval()
    x = ids(cfg.vocab_size, B=1, T=16)
    with torch.no_grad():
        full = model(x).logits
        cache = LatentCache(cfg, batch=1, max_len=16)
        pre = model(x[:, :10], cache=cache).logits  # MHA mode over an empty cache
        cache.advance()
        rest = []
        for t in range(10, 16):
            rest.append(model(x[:, t:t + 1], cache=cache).logits)  # auto: absorbed
            cache.advance()
    assert (torch.cat([pre] + rest, 1) - full).abs().max().item() <= TOL


@pytest.mark.parametrize("method", ["noaux_tc", "greedy", "group_limited_greedy"])
def test_grouped_moe_equals_looped_reference(method):
    over = {"noaux_tc": {}, "greedy": dict(topk_method="greedy", scoring_func="softmax", n_group=1, topk_group=1),
            "group_limited_greedy": dict(topk_method="group_limited_greedy", scoring_func="softmax")}[method]
    cfg = minke.preset("tiny", **over)
    model = minke.build(cfg, seed=4)
    moe = model.layers[1].mlp
    x = torch.randn(37, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        w, idx, _ = moe.gate(x)
        fast, load = grouped_moe(moe.experts, x, w, idx, cfg.n_routed_experts)
        slow = looped_moe(moe.experts, x, w, idx)
    assert (fast - slow).abs().max().item() <= 1e-5
    assert load.sum().item() == 37 * cfg.num_experts_per_tok


def test_gate_noaux_tc_uses_bias_for_selection_only():
    cfg = minke.preset("tiny", n_group=1, topk_group=1)
    moe = minke.build(cfg).layers[1].mlp
    x = torch.randn(64, cfg.hidden_size)
    with torch.no_grad():
        moe.gate.e_score_correction_bias.zero_()
        moe.gate.e_score_correction_bias[5] = 10.0  # expert 5 always chosen...
        w, idx, scores = moe.gate(x)
    assert (idx == 5).any(dim=1).all()
    pos = (idx == 5).nonzero()
    # ...but its gate value is its unbiased score, normalized over the chosen experts
    chosen = scores.gather(1, idx)
    expect = chosen / chosen.sum(-1, keepdim=True) * cfg.routed_scaling_factor
    assert torch.allclose(w, expect) and (w[pos[:, 0], pos[:, 1]] < 10).all()


def test_group_limit_restricts_experts_to_top_groups():
    cfg = minke.preset("tiny", n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3)
    moe = minke.build(cfg, seed=5).layers[1].mlp
    x = torch.randn(200, cfg.hidden_size)
    with torch.no_grad():
        _, idx, _ = moe.gate(x)
    groups = idx // 2
    assert all(len(set(g.tolist())) <= 2 for g in groups)


def test_sequence_balance_loss_is_one_when_uniform():
    from minke.model.moe import sequence_balance_loss
    E, K, T = 4, 2, 8
    scores = torch.full((T, E), 0.5)
    idx = torch.tensor([[0, 1], [2, 3]] * (T // 2))
    assert sequence_balance_loss(scores, idx, 1, E, K).item() == pytest.approx(1.0)


def test_meta_device_builds_v3_671b():
    cfg = minke.preset("v3-671b")
    model = minke.build(cfg, device="meta")
    n = sum(p.numel() for p in model.parameters())
    pc = cfg.param_counts()
    assert n == pc["total"] + pc["mtp_unique"]
    assert 670e9 < pc["total"] < 672e9 and 36e9 < pc["active"] < 38e9
    assert cfg.kv_cache_bytes_per_token(2)["latent"] == 70272


@pytest.mark.parametrize("name", ["tiny", "small", "v2-lite"])
def test_param_counts_match_built_model(name):
    cfg = minke.preset(name)
    model = minke.build(cfg, device="meta")
    pc = cfg.param_counts()
    assert sum(p.numel() for p in model.parameters()) == pc["total"] + pc["mtp_unique"]


def test_small_preset_size():
    pc = minke.preset("small").param_counts()
    assert 100e6 <= pc["total"] <= 300e6


def test_bf16_forward_close_to_fp32():
    cfg = minke.preset("tiny")
    m32 = minke.build(cfg, seed=6).eval()
    m16 = minke.build(cfg, seed=6, dtype=torch.bfloat16).eval()
    assert m16.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    x = ids(cfg.vocab_size)
    with torch.no_grad():
        a, b = m32(x).logits, m16(x).logits.float()
    assert (a - b).abs().max() < 0.05 * a.abs().max()


def test_yarn_rotary_matches_transformers_beyond_the_original_context(hf_v3_dir):
    """cos/sin at every position up to max_position_embeddings (512), 8x past
    original_max_position_embeddings (64), against transformers' YaRN rotary embedding."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding

    from minke.model.layers import Rotary
    d, hf = hf_v3_dir
    cfg = minke.ModelConfig.load(d)
    assert cfg.yarn["original_max_position_embeddings"] == 64 and cfg.max_position_embeddings == 512
    pos = torch.arange(512)[None]
    hcos, hsin = DeepseekV3RotaryEmbedding(hf.config)(torch.zeros(1, dtype=torch.float32), pos)
    cos, sin = Rotary(cfg)(pos)
    R2 = cfg.qk_rope_head_dim // 2  # transformers repeats the R/2 frequencies: (cos, cos)
    torch.testing.assert_close(cos, hcos[..., :R2], atol=1e-5, rtol=0)
    torch.testing.assert_close(sin, hsin[..., :R2], atol=1e-5, rtol=0)


def test_v3_logits_match_transformers_beyond_the_original_context(hf_v3_dir):
    """Logits of a 512-token sequence against transformers: RoPE is relative, so only query-key
    distances past original_max_position_embeddings (64) exercise YaRN's interpolated frequencies."""
    d, hf = hf_v3_dir
    model = load_quiet(d, dtype=torch.float32)
    x = ids(256, B=1, T=512, seed=5)
    with torch.no_grad():
        assert (model(x).logits - hf(x).logits).abs().max().item() <= TOL


def test_rmsnorm_computes_in_fp32_for_bf16_inputs():
    """bf16 in, bf16 out, the statistics and the scaling in fp32: bitwise transformers' DeepseekV3RMSNorm,
    and within one bf16 rounding of the float64 result. Catches: the norm computed in bf16 (the model's
    bf16-vs-fp32 logits test allows 5% and cannot see it)."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RMSNorm

    from minke.model.layers import RMSNorm
    g = torch.Generator().manual_seed(0)
    D = 2048
    x = (torch.randn(8, D, generator=g) * torch.rand(8, 1, generator=g) * 50).to(torch.bfloat16)
    w = (torch.rand(D, generator=g) + 0.5).to(torch.bfloat16)
    norm, ref = RMSNorm(D, eps=1e-6).to(torch.bfloat16), DeepseekV3RMSNorm(D, eps=1e-6).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(w)
        ref.weight.copy_(w)
        y = norm(x)
        assert y.dtype == torch.bfloat16 and torch.equal(y, ref(x))
    x64 = x.double()
    exact = (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16).double() * w.double()
    # y = w · bf16(x̂): one rounding of x̂ (exact up to fp32 noise) and one of the product, ≤ 2^-8 relative
    assert ((y.double() - exact).abs() <= exact.abs() * 2 ** -8).all()

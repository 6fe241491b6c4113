"""DeepSeek Sparse Attention (V3.2): the lightning indexer, top-k sparse MLA, the indexer cache.

The parity reference is transformers' DeepseekV32ForCausalLM on random checkpoints it writes, with
index_topk below the sequence length so the selection decides the logits."""

import json
import warnings

import pytest
import torch

import minke
import minke.kernels.attention as att
import minke.model.dsa as dsa_mod
from minke.config import ConfigError
from minke.inference.dsa_cache import DSALatentCache, DSAPagedCache
from minke.inference.engine import Engine
from minke.inference.sampling import SamplingParams
from conftest import KernelSpy

TOL = 1e-4
TOPK = 5
GREEDY = dict(temperature=0.0, stop_token_ids=[])

pytestmark = pytest.mark.usefixtures("one_thread")


def hf_v32_config(**over):
    from transformers import DeepseekV32Config

    from conftest import hf_v3_config
    kw = hf_v3_config().to_dict()
    kw = {k: kw[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                             "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "q_lora_rank",
                             "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                             "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "n_group",
                             "topk_group", "first_k_dense_replace", "routed_scaling_factor",
                             "max_position_embeddings", "rope_parameters")}
    kw.update(index_n_heads=8, index_head_dim=16, index_topk=TOPK)
    kw.update(over)
    return DeepseekV32Config(**kw)


@pytest.fixture(scope="module")
def hf_v32_dir(tmp_path_factory):
    from transformers import DeepseekV32ForCausalLM

    from conftest import randomize_hf
    torch.manual_seed(0)
    model = randomize_hf(DeepseekV32ForCausalLM(hf_v32_config()), seed=4)
    d = tmp_path_factory.mktemp("hf_v32")
    model.save_pretrained(d)
    return d, model


def load(d, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return minke.load(d, dtype=torch.float32, **kw)


def ids(vocab, B=2, T=24, seed=0):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def dsa_preset(**over):
    kw = dict(model_type="deepseek_v32", architectures=["DeepseekV32ForCausalLM"], index_n_heads=4,
              index_head_dim=16, index_topk=6)
    kw.update(over)
    return minke.preset("tiny", **kw)


def densify(model):
    """The same weights with every indexer selecting all tokens: dense MLA."""
    for m in list(model.layers) + list(model.mtp):
        m.self_attn.indexer.topk = 10 ** 9
    return model


# ---- parity with transformers ------------------------------------------------------------------
def test_v32_logits_match_transformers(hf_v32_dir):
    """Both of minke's modes (MHA under the selection's mask; absorbed over the gathered latents) give
    transformers' logits with index_topk 5 < 24 tokens; dense MLA on the same weights does not (the
    selection matters). Fails with the indexer's RoPE interleaved, or its causal mask dropped."""
    d, hf = hf_v32_dir
    cfg = minke.ModelConfig.load(d)
    assert cfg.dsa and cfg.index_topk == TOPK and cfg.model_type == "deepseek_v32" and cfg.yarn
    model = load(d)
    x = ids(cfg.vocab_size)
    with torch.no_grad():
        ref = hf(x).logits
        for absorb in (None, True):
            assert (model(x, absorb=absorb).logits - ref).abs().max().item() <= TOL, absorb
        assert (densify(model)(x).logits - ref).abs().max().item() > 1e-2


def test_indexer_selects_what_transformers_selects(hf_v32_dir):
    """Layer 0's top-k sets, query by query, against transformers' DeepseekV32Indexer on the same input
    (from index_topk - 1 on: before that transformers pads its k slots with masked keys)."""
    d, hf = hf_v32_dir
    model = load(d)
    x = ids(256, seed=5)
    T = x.shape[1]
    with torch.no_grad():
        h = model.layers[0].input_layernorm(model.embed_tokens(x))
        attn = model.layers[0].self_attn
        q_lat = attn.q_a_layernorm(attn.q_a_proj(h))
        cos, sin = model.rotary(torch.arange(T).expand(2, T))
        idx, valid = attn.indexer(h, q_lat, cos, sin, attn.indexer.key(h, cos, sin), None)
        pe = hf.model.rotary_emb(h, torch.arange(T)[None])
        causal = torch.ones(T, T, dtype=torch.bool).tril().expand(2, T, T)
        ref = hf.model.layers[0].self_attn.indexer(h, q_lat, pe, causal, None)
    assert idx.shape == ref.shape == (2, T, TOPK)
    for t in range(TOPK - 1, T):
        assert valid[:, t].all()
        assert torch.equal(idx[:, t].sort(-1).values, ref[:, t].long().sort(-1).values), t


def test_roundtrip_both_ways(hf_v32_dir, tmp_path):
    """transformers → minke → transformers: bitwise the same logits and the same config.json keys;
    minke → transformers: a V3.2 model minke builds loads in transformers with minke's logits."""
    from transformers import DeepseekV32ForCausalLM

    d, hf = hf_v32_dir
    model = load(d)
    minke.save(model, tmp_path / "a")
    hf2 = DeepseekV32ForCausalLM.from_pretrained(tmp_path / "a", dtype=torch.float32).eval()
    x = ids(256, seed=3)
    with torch.no_grad():
        assert torch.equal(hf2(x).logits, hf(x).logits)
    src, out = (json.loads((p / "config.json").read_text()) for p in (d, tmp_path / "a"))
    for k in ("mlp_layer_types", "layer_types", "index_topk", "index_n_heads", "index_head_dim", "model_type",
              "architectures", "rope_parameters"):
        assert out[k] == src[k], k

    # 16 index heads: a score is exactly 0 only when all 16 ReLUs are, so no tie sits at the top-k
    # boundary (transformers' torch.topk and minke's earliest-first rule break ties differently).
    cfg = dsa_preset(index_topk=4, index_n_heads=16)
    mine = minke.build(cfg, seed=7)
    with torch.no_grad():
        for p in mine.parameters():  # norms and the indexer's LayerNorm bias away from their init
            p.add_(torch.randn_like(p) * 0.05)
    minke.save(mine, tmp_path / "b")
    hf3 = DeepseekV32ForCausalLM.from_pretrained(tmp_path / "b", dtype=torch.float32).eval()
    x = ids(cfg.vocab_size, T=20, seed=4)
    with torch.no_grad():
        assert (mine(x).logits - hf3(x).logits).abs().max().item() <= TOL
    back = load(tmp_path / "b")
    assert all(torch.equal(a, b) for a, b in zip(mine.state_dict().values(), back.state_dict().values()))


# ---- sparse vs dense, causality -----------------------------------------------------------------
def test_topk_covering_the_sequence_equals_dense_mla():
    """index_topk >= the sequence: every query selects every token it sees, so DSA is dense MLA; the
    gather-attend kernel itself, all tokens selected, equals dense absorbed attention."""
    cfg = dsa_preset(index_topk=32)
    model = minke.build(cfg, seed=1)
    dense = minke.build(cfg, seed=1)
    for m in list(dense.layers) + list(dense.mtp):
        m.self_attn.indexer = None
    x = ids(cfg.vocab_size, T=24)
    with torch.no_grad():
        for absorb in (None, True):
            assert (model(x, absorb=absorb).logits - dense(x, absorb=absorb).logits).abs().max().item() <= TOL
    g = torch.Generator().manual_seed(0)
    B, H, T, S, C, R = 2, 3, 4, 9, 12, 4
    q_lat, q_pe = torch.randn(B, H, T, C, generator=g), torch.randn(B, H, T, R, generator=g)
    c_kv, k_pe = torch.randn(B, S, C, generator=g), torch.randn(B, S, R, generator=g)
    idx = torch.arange(S).expand(B, T, S)
    valid = idx <= torch.arange(S - T, S)[:, None]  # causal, queries the last T tokens
    o = rows_attention(q_lat, q_pe, c_kv, k_pe, idx, valid, 0.3)
    assert (o - att.absorbed_attention(q_lat, q_pe, c_kv, k_pe, None, 0.3)).abs().max().item() <= 1e-5


def random_selection(seed, B=2, H=4, T=3, S=11, K=5, C=8, R=4):
    """Queries, latents, and per query a shuffled subset of K of the S tokens, about 30% of its slots
    invalid (never the first): (q_lat, q_pe, c_kv, k_pe, idx, valid)."""
    g = torch.Generator().manual_seed(seed)
    q_lat, q_pe = torch.randn(B, H, T, C, generator=g), torch.randn(B, H, T, R, generator=g)
    c_kv, k_pe = torch.randn(B, S, C, generator=g), torch.randn(B, S, R, generator=g)
    idx = torch.stack([torch.randperm(S, generator=g)[:K] for _ in range(B * T)]).view(B, T, K)
    valid = torch.rand(B, T, K, generator=g) < 0.7
    valid[..., 0] = True
    return q_lat, q_pe, c_kv, k_pe, idx, valid


def rows_attention(q_lat, q_pe, c_kv, k_pe, idx, valid, scale, buf=None):
    """sparse_rows_attention as MLA calls it: queries [q_lat ‖ q_pe] (B, H, T, ·) scaled, each query's
    selected rows [c_kv ‖ k_pe] gathered (into ``buf`` when given) → o_lat (B, H, T, C)."""
    (B, H, T, C), R = q_lat.shape, q_pe.shape[-1]
    rows = att.gather_tokens(torch.cat([c_kv, k_pe], -1), idx, buf)
    q = (torch.cat([q_lat, q_pe], -1) * scale).transpose(1, 2).reshape(B * T, H, C + R)
    return att.sparse_rows_attention(q, rows.flatten(0, 1), valid.flatten(0, 1), C).view(B, T, H, C).transpose(1, 2)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("B, T", [(2, 3), (1, 1)])
def test_sparse_kernel_matches_its_reference(dtype, tol, B, T):
    """Queries [q_lat ‖ q_pe] scaled over gathered rows [c_kv ‖ k_pe], random selections (a shuffled
    subset per query, some slots invalid), against dense absorbed attention under the selection's mask;
    several queries (bmm) and one (2-D GEMMs), the rows gathered into a larger buffer (prefill's) or
    alone; in bf16 (its values bmm over all C+R columns, then sliced) against the fp32 reference of the
    same bf16 values, relative to the output's size. Fails with the validity mask ignored."""
    q_lat, q_pe, c_kv, k_pe, idx, valid = random_selection(2, B=B, T=T)
    valid[0, 0, -1] = False  # every case masks a slot
    C, R, K = q_lat.shape[-1], q_pe.shape[-1], idx.shape[-1]
    q_lat, q_pe, c_kv, k_pe = (t.to(dtype) for t in (q_lat, q_pe, c_kv, k_pe))
    ref = att.sparse_absorbed_attention_reference(q_lat, q_pe, c_kv, k_pe, idx, valid, 0.3)
    for buf in (None, torch.empty(B * T * K * (C + R) + 3, dtype=dtype)):
        o = rows_attention(q_lat, q_pe, c_kv, k_pe, idx, valid, 0.3, buf)
        assert o.dtype == dtype and (o.float() - ref).abs().max().item() <= tol * ref.abs().max().item()


def test_blocked_sparse_prefill_equals_the_masked_mha_mode(monkeypatch):
    """Prefill's blocked absorbed path, with blocks small enough that a block sees at most index_topk
    keys (dense), later blocks select, sub-blocks split a block's gathers (one buffer reused) and the
    indexer's dot products come in key tiles, equals MHA mode under the selection's mask, batch 2."""
    import minke.model.mla as mla
    cfg = dsa_preset(index_topk=6)
    model = minke.build(cfg, seed=3)
    x = ids(cfg.vocab_size, B=2, T=300, seed=5)
    with torch.no_grad():
        ref = model(x).logits  # MHA mode under the selection's mask
        monkeypatch.setattr(mla, "SPARSE_QUERY_BLOCK", 4)  # block 0 sees 4 <= 6 keys
        monkeypatch.setattr(mla, "SPARSE_GATHER_BYTES", 1)  # one query per gather
        monkeypatch.setattr(att, "DOTS_TILE_ELEMENTS", 1)
        monkeypatch.setattr(att, "DOTS_TILE_MIN_KEYS", 7)  # tiles of 7 keys
        assert (model(x, absorb=True).logits - ref).abs().max().item() <= TOL
        monkeypatch.setattr(mla, "SPARSE_QUERY_BLOCK", 37)
        monkeypatch.setattr(mla, "SPARSE_GATHER_BYTES", 5 * 6 * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4 * 2)
        assert (model(x, absorb=True).logits - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("B,T,J,E,S,threads", [(1, 3, 5, 16, 37, 1), (2, 1, 64, 128, 1000, 2), (1, 5, 20, 10, 9, 1),
                                               (1, 2, 80, 32, 131, 2)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_index_scores_match_their_reference(B, T, J, E, S, threads, dtype, monkeypatch):
    """The lightning indexer's scores for bf16 and fp32 inputs against fp64: torch's path in key tiles,
    and decode.cpp's kernels where they are built (bf16: AVX512-BF16; heads not a multiple of 16, key
    tails, keys split over 2 threads at chunk starts that are not multiples of their 4 keys a pass; on a
    CPU without AVX512-BF16 only torch's path is checked in bf16). The kernel is what a model runs outside
    autograd, and a key's score does not depend on which other queries and keys share the call, so
    decode and prefill select alike."""
    from minke.kernels.cpp import cpp_kernels
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check_index_scores(B, T, J, E, S, dtype, monkeypatch, cpp_kernels())
    finally:
        torch.set_num_threads(before)


def _check_index_scores(B, T, J, E, S, dtype, monkeypatch, cpp):
    g = torch.Generator().manual_seed(B * T + S)
    q, keys = torch.randn(B, T, J, E, generator=g).to(dtype), torch.randn(B, S, E, generator=g).to(dtype)
    w = torch.randn(B, T, J, generator=g)
    ref = att.index_scores_reference(q, w, keys)
    # fp32 sums of J·E products: bounded by a few units of fp32 rounding of the absolute sum
    bound = 1e-5 * torch.einsum("btj,btjs->bts", w.double().abs(),
                                torch.einsum("btje,bse->btjs", q.double().abs(), keys.double().abs()))
    calls = []
    if cpp is not None and (dtype == torch.float32 or cpp.has_bf16_dot()):
        class Spy:
            has_bf16_dot = staticmethod(cpp.has_bf16_dot)

            @staticmethod
            def index_scores(*a):
                calls.append(1)
                return cpp.index_scores(*a)
        monkeypatch.setattr(att, "cpp_kernels", lambda: Spy)
        with torch.no_grad():
            o = att.index_scores(q, w, keys)
            assert calls and ((o.double() - ref).abs() <= bound).all()
            part = att.index_scores(q[:, -1:], w[:, -1:], keys[:, 1:S - 1])
            assert torch.equal(part, o[:, -1:, 1:S - 1])
    monkeypatch.setattr(att, "cpp_kernels", lambda: None)
    monkeypatch.setattr(att, "DOTS_TILE_ELEMENTS", 1)
    monkeypatch.setattr(att, "DOTS_TILE_MIN_KEYS", 7)
    n = len(calls)
    assert ((att.index_scores(q, w, keys).double() - ref).abs() <= bound).all() and len(calls) == n


@pytest.mark.parametrize("which", ["top_k", "top_k_torch"])
def test_top_k_breaks_ties_towards_earlier_tokens(which):
    """Exact ties (the ReLU's zeros) go to the earlier token, whatever the row's length: a decode step
    over S keys and a full forward's row of the same S scores plus masked ones pick the same tokens.
    Both paths: decode.cpp's (where built) and torch's."""
    top_k = getattr(att, which)
    s = torch.tensor([[0.0, 0.5, 0.0, 0.0, 0.7, 0.0]])
    assert top_k(s, 3).tolist() == [[0, 1, 4]]
    assert top_k(torch.cat([s, torch.full((1, 5), float("-inf"))], -1), 3).tolist() == [[0, 1, 4]]
    assert top_k(torch.tensor([[float("-inf"), 2.0, float("-inf")]]), 2).tolist() == [[0, 1]]


def test_top_k_kernel_equals_torch_path(monkeypatch):
    """decode.cpp's top_k (nth_element, then one ordered pass) against the torch path on rows full of
    ties (scores on a coarse grid) and masked -inf, for K from 1 to S, over (B, T, S) rows; autograd and
    other dtypes stay on torch's path."""
    from minke.kernels import cpp as kcpp
    built = kcpp.cpp_kernels()
    spy = KernelSpy(built)
    calls = spy.calls
    if built is not None:
        monkeypatch.setattr(kcpp, "_built", spy)
    g = torch.Generator().manual_seed(0)
    for S in (1, 7, 300):
        s = torch.randint(-3, 4, (2, 3, S), generator=g).float() / 2
        s[torch.rand(s.shape, generator=g) < 0.3] = float("-inf")
        for K in sorted({1, min(2, S), S // 2 + 1, S}):
            assert torch.equal(att.top_k(s, K), att.top_k_torch(s, K)), (S, K)
    assert calls.count("top_k") == (0 if built is None else 9)
    calls.clear()
    assert torch.equal(att.top_k(s.double(), 5), att.top_k_torch(s.double(), 5)) and "top_k" not in calls


def test_selection_is_causal():
    """Every valid selected token is at or before its query; a query that sees fewer than index_topk
    tokens selects all of them; changing later tokens leaves earlier logits unchanged (both modes)."""
    cfg = dsa_preset(index_topk=4)
    model = minke.build(cfg, seed=2)
    x = ids(cfg.vocab_size, B=1, T=20)
    T = x.shape[1]
    attn = model.layers[0].self_attn
    with torch.no_grad():
        h = model.layers[0].input_layernorm(model.embed_tokens(x))
        cos, sin = model.rotary(torch.arange(T)[None])
        idx, valid = attn.indexer(h, attn.q_a_layernorm(attn.q_a_proj(h)), cos, sin, attn.indexer.key(h, cos, sin),
                                  None)
        t = torch.arange(T)[None, :, None]
        assert (idx[valid] <= t.expand_as(idx)[valid]).all()
        assert torch.equal(valid.sum(-1)[0], torch.arange(1, T + 1).clamp(max=4))
        y = x.clone()
        y[:, 12:] = (y[:, 12:] + 7) % cfg.vocab_size
        for absorb in (None, True):
            a, b = model(x, absorb=absorb).logits, model(y, absorb=absorb).logits
            assert (a[:, :12] - b[:, :12]).abs().max().item() <= 1e-5
            assert (a[:, 12:] - b[:, 12:]).abs().max().item() > 1e-3


# ---- config --------------------------------------------------------------------------------------
@pytest.mark.parametrize("over,field", [
    (dict(index_topk=0), "index_topk"), (dict(index_topk=-3), "index_topk"),
    (dict(index_n_heads=None), "index_n_heads"), (dict(q_lora_rank=None), "q_lora_rank"),
    (dict(model_type="deepseek_v3"), "model_type"), (dict(index_head_dim=4), "index_head_dim"),
])
def test_bad_dsa_config_names_the_field(over, field):
    with pytest.raises(ConfigError, match=field):
        dsa_preset(**over)


def test_v32_layer_type_lists_are_checked(hf_v32_dir):
    d, _ = hf_v32_dir
    src = json.loads((d / "config.json").read_text())
    cfg = minke.ModelConfig.from_dict(src)
    assert cfg.to_dict()["mlp_layer_types"] == src["mlp_layer_types"] == ["dense", "sparse", "sparse"]
    with pytest.raises(ConfigError, match="mlp_layer_types"):
        minke.ModelConfig.from_dict({**src, "mlp_layer_types": ["dense", "dense", "sparse"]})
    with pytest.raises(ConfigError, match="layer_types"):
        minke.ModelConfig.from_dict({**src, "layer_types": ["full_attention"] * 3})
    p = cfg.param_counts()["total"]
    assert p == sum(t.numel() for t in load(d).parameters())


# ---- caches and the engine -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def model():
    return minke.build(dsa_preset(), seed=0, dtype=torch.float64)


_REF: dict = {}


@torch.no_grad()
def reference(model, prompt, n):
    """Greedy by full recompute with DSA, no cache."""
    key = (id(model), tuple(prompt), n)
    if key not in _REF:
        seq = list(prompt)
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
        _REF[key] = seq[len(prompt):]
    return _REF[key]


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 1024, (n,), generator=g).tolist() for n in lengths]


def test_contiguous_cache_decode_matches_full_forward(model):
    """Token-by-token decode through DSALatentCache (absorbed, sparse once past index_topk) against one
    full forward, rows of different lengths."""
    x = ids(1024, B=2, T=16, seed=6)
    cache = DSALatentCache(model.config, 2, 32, dtype=torch.float64)
    with torch.no_grad():
        full = model(x).logits
        model(x[:, :3], cache=cache)
        cache.advance()
        for t in range(3, 16):
            out = model(x[:, t:t + 1], cache=cache).logits[:, 0]
            cache.advance()
            assert (out - full[:, t]).abs().max().item() <= 1e-6, t  # norms and RoPE round through fp32


def tipped_near_tie(dec, full, t) -> bool:
    """Whether a decode step's indexers (``dec``: (scores (B, 1, S), selection) per layer) selected other
    keys than the full forward's at query t (``full``: (scores (B, T, S), selection) per layer); asserts
    that each such difference is a near-tie: in the full forward's scores, the keys only it selected beat
    the keys only the decode selected by at most twice the two modes' largest score difference there."""
    tipped = False
    for (sd, idd), (sf, idf) in zip(dec, full):
        for b in range(sd.shape[0]):
            a, f = sd[b, -1], sf[b, t]
            mine = {i for i in idd[b, -1].tolist() if a[i] > -float("inf")}  # the valid picks: keys it may see
            theirs = {i for i in idf[b, t].tolist() if f[i] > -float("inf")}
            if mine == theirs:
                continue
            tipped = True
            seen = torch.isfinite(f)
            noise = (a[seen] - f[seen]).abs().max().item()
            gap = min(f[i].item() for i in theirs - mine) - max(f[i].item() for i in mine - theirs)
            assert gap <= 2 * noise, (t, b, sorted(mine), sorted(theirs), gap, noise)
    return tipped


@pytest.mark.parametrize("dsa, B, fp8", [(False, 1, False), (False, 2, False), (True, 1, False), (True, 2, False),
                                         (False, 1, True), (False, 2, True), (False, 1, "heads"), (False, 2, "heads")])
def test_bf16_paged_decode_matches_full_forward(dsa, B, fp8, tmp_path, monkeypatch):
    """bf16 as the engine serves it (paged cache, laid-out decode weights; decode.cpp's bf16 folds,
    indexer and row gathers where the CPU has AVX512-BF16; ``fp8``: the linears held in E4M3, which
    decode multiplies as stored with decode.cpp's fp8_linear and the full forward dequantizes, each
    weight then rounded to bf16 once more; without DSA, whose selection that rounding tipped at a near-tie,
    10% off at that step, measured): token-by-token decode in the absorbed mode
    (with DSA sparse once past index_topk, over the selected rows gathered from the pools) against one
    full forward of the same model in MHA mode. One row (a zero-copy slice of the pool) and two (the
    gathered histories, attention row by row). Widths where both folds take the kernel (32-wide
    chunks). The two modes round differently in bf16: 0.4-1% of the largest logit a step, measured, and
    up to 16% with DSA at a step where the rounding tips a near-tie of the selection (kernels on or off
    alike; which step, if any, depends on the CPU's bf16 GEMMs): such a step is checked instead to be a
    near-tie, the keys swapped in or out scoring within the two modes' rounding difference of each other
    in the full forward; a wrong fold, mask or gather is off by far more. ``fp8 == "heads"``: kv_b_proj's 128×128 blocks lie
    within heads (nope, v and kv_lora_rank of 128), so one row's folds read its E4M3 weight as stored
    (decode.cpp's fp8_fold) where the CPU has the FP8 kernels."""
    from minke.inference.engine import decode_weights
    from minke.inference.paged import PagedLatentCache
    from minke.kernels import cpp as kcpp
    over = dict(qk_nope_head_dim=32, kv_lora_rank=64)
    if fp8 == "heads":
        over = dict(qk_nope_head_dim=128, v_head_dim=128, kv_lora_rank=128)
    cfg = dsa_preset(**over) if dsa else minke.preset("tiny", **over)
    model = minke.build(cfg, seed=0, dtype=torch.bfloat16).eval()
    if fp8:
        minke.save(model, tmp_path)
        model = minke.load(tmp_path, dtype=torch.bfloat16, fp8=True)
    cache = (DSAPagedCache if dsa else PagedLatentCache)(cfg, num_blocks=16, block_size=4, dtype=torch.bfloat16)
    x = ids(cfg.vocab_size, B=B, T=14, seed=3)
    rows = list(range(B))
    errors = []
    built = kcpp.cpp_kernels()
    spy = KernelSpy(built)
    if built is not None:
        monkeypatch.setattr(kcpp, "_built", spy)
    tipped, picks = [], []  # each indexer's (scores, selection) in call order: one per layer and forward
    top_k = att.top_k
    monkeypatch.setattr(dsa_mod, "top_k", lambda sc, k: picks.append((sc, top_k(sc, k))) or picks[-1][1])
    with torch.no_grad(), decode_weights(model):
        full = model(x).logits.float()
        full_picks, picks[:] = picks[:], []
        for r in rows:
            assert cache.reserve(r, 14)
        cache.begin(rows, 3)
        model(x[:, :3], positions=cache.positions(3), cache=cache)
        cache.advance()
        for t in range(3, 14):
            picks.clear()
            cache.begin(rows, 1)
            out = model(x[:, t:t + 1], positions=cache.positions(1), cache=cache).logits[:, 0].float()
            cache.advance()
            if dsa and tipped_near_tie(picks, full_picks, t):
                tipped.append(t)
            else:
                errors.append(((out - full[:, t]).abs().max() / full[:, t].abs().max()).item())
    assert len(tipped) <= 1, tipped  # measured: step 13 on an AVX2 CPU (AMD EPYC)
    assert max(errors) <= 0.06 and sorted(errors)[len(errors) // 2] <= 0.015, errors
    folds = spy.calls.count("fp8_fold")  # two a layer and decode step for one row, none for two
    kernel = built is not None and built.has_fp8_dot()
    assert folds == (2 * cfg.num_hidden_layers * 11 if fp8 == "heads" and B == 1 and kernel else 0)


@pytest.mark.parametrize("max_batch,block_size", [(1, 4), (3, 4), (8, 16)])
def test_engine_greedy_matches_full_recompute_with_dsa(model, max_batch, block_size):
    """The engine (paged latents + indexer keys, absorbed sparse decode) gives the greedy tokens of a
    full recompute with DSA, for contexts below and well past index_topk (6), across batch mixes; its
    decode steps past index_topk read only the selected tokens' latents (no full-history ``update``)."""
    ps = prompts([1, 3, 7, 12, 25, 5, 16, 2])
    n = [12, 5, 16, 9, 3, 14, 7, 10]
    e = Engine(model, max_batch=max_batch, block_size=block_size, num_blocks=128, max_prefill_tokens=16)
    assert isinstance(e.cache, DSAPagedCache)
    full_reads = []
    update = e.cache.update

    def spy(layer, c_kv, k_pe):
        out = update(layer, c_kv, k_pe)
        if c_kv.shape[1] == 1:
            full_reads.append(out[0].shape[1])
        return out
    e.cache.update = spy
    reads = []  # (keys read back, history S): only when there is something to select from
    update_indexer = e.cache.update_indexer

    def spy_keys(layer, keys, read=True):
        out = update_indexer(layer, keys, read)
        reads.append((out[0] is not None, e.cache._view.S))
        return out
    e.cache.update_indexer = spy_keys
    cs = e.generate(ps, [SamplingParams(max_tokens=k, **GREEDY) for k in n])
    for c, p, k in zip(cs, ps, n):
        assert c.token_ids == reference(model, p, k), len(p)
    assert full_reads and max(full_reads) <= model.config.index_topk
    assert {(S > model.config.index_topk) for read, S in reads if read} == {True}
    assert {(S > model.config.index_topk) for read, S in reads if not read} == {False}
    assert e.cache.num_free_blocks == e.cache.num_blocks


def test_speculative_with_dsa_equals_plain_greedy(model):
    """MTP drafting with DSA (the MTP layer has its own indexer and cache layer): rejected drafts roll
    the latents and indexer keys back; the tokens equal plain greedy decoding."""
    ps = prompts([4, 9, 17, 2], seed=2)
    n = [14, 9, 11, 16]
    outs = []
    for spec in (False, True):
        e = Engine(model, max_batch=4, block_size=4, num_blocks=96, speculative=spec, num_draft=2)
        outs.append(e.generate(ps, [SamplingParams(max_tokens=k, **GREEDY) for k in n]))
        if spec:
            assert e.stats.draft_proposed > e.stats.draft_accepted  # some drafts were rolled back
    for a, b, p, k in zip(*outs, ps, n):
        assert a.token_ids == b.token_ids == reference(model, p, k)


def test_forked_samples_share_the_prompt_with_dsa(model):
    """Parallel sampling forks the prompt's blocks (indexer keys included) and copies the shared last
    block before writing into it: every greedy child equals the full recompute."""
    ps = prompts([10, 13], seed=3)
    e = Engine(model, max_batch=6, block_size=4, num_blocks=96)
    cs = e.generate(ps, SamplingParams(max_tokens=9, **GREEDY), n=3)
    for i, c in enumerate(cs):
        assert c.token_ids == reference(model, ps[i // 3], 9)


def test_paged_copy_on_write_copies_indexer_keys():
    cfg = dsa_preset()
    cache = DSAPagedCache(cfg, num_blocks=8, block_size=4)
    assert cache.reserve("a", 6)
    cache.begin(["a"], 6)
    keys = torch.randn(1, 6, cfg.index_head_dim)
    cache.update_indexer(0, keys)
    cache.advance(6)
    cache.fork("a", "b")
    assert cache.reserve("b", 8)  # b writes into the shared second block: copied, keys included
    assert cache.tables["b"][1] != cache.tables["a"][1]
    cache.begin(["b"], 1)
    got, _ = cache.update_indexer(0, torch.zeros(1, 1, cfg.index_head_dim))
    assert torch.equal(got[0, :6], keys[0]) and cache.nbytes > cache.c_kv.numel() * 4 + cache.k_pe.numel() * 4


def test_fp8_checkpoint_quantizes_the_indexer_as_deepseek(tmp_path):
    """DeepSeek's V3.2 FP8 checkpoints hold the indexer's wq_b and wk in E4M3 with weight_scale_inv and
    weights_proj in BF16; such a checkpoint loads dequantized and with fp8=True (E4M3 kept in memory)."""
    from safetensors import safe_open
    cfg = dsa_preset(index_topk=4)
    model = minke.build(cfg, seed=3)
    minke.save(model, tmp_path, fp8=True)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        p = "model.layers.0.self_attn.indexer."
        assert f.get_tensor(p + "wq_b.weight").dtype == f.get_tensor(p + "wk.weight").dtype == torch.float8_e4m3fn
        assert {p + "wq_b.weight_scale_inv", p + "wk.weight_scale_inv"} <= keys
        assert p + "weights_proj.weight_scale_inv" not in keys and f.get_tensor(p + "weights_proj.weight").is_floating_point()
    x = ids(cfg.vocab_size, B=1, T=12)
    with torch.no_grad():
        a = load(tmp_path)(x).logits
        b = load(tmp_path, fp8=True)(x).logits
    assert torch.isfinite(a).all() and (a - b).abs().max().item() <= 1e-2


def test_long_context_benchmark_runs(tmp_path):
    """benchmarks/long_context.py end to end at toy size (its figures are read by people, not checked)."""
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location(
        "long_context", Path(__file__).resolve().parent.parent / "benchmarks" / "long_context.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "lc.json"
    report = bench.main(["--contexts", "48", "96", "--batches", "1", "2", "--topk", "32", "--heads", "4",
                         "--hidden", "64", "--max-prefill", "96", "--steps", "1", "--block-size", "16",
                         "--out", str(out)])
    assert json.loads(out.read_text()) == report
    assert [(r["context"], r["batch"]) for r in report["decode"]] == [(48, 1), (48, 2), (96, 1), (96, 2)]
    last = report["decode"][-1]
    assert last["sparse"]["cache_bytes_read"] < last["dense"]["cache_bytes_read"]
    assert all(r["sparse"]["tok_s"] > 0 and r["dense"]["tok_s"] > 0 for r in report["decode"])
    assert [r["context"] for r in report["prefill"]] == [48, 96]


# ---- training the indexer (V3.2 §2.1.1) ---------------------------------------------------------------
def _kl_by_hand(model, x):
    """Layer 0's warm-up KL from first principles: per-head softmax over the decompressed MHA keys,
    averaged over heads, against the softmax of the index scores, each query over its causal prefix."""
    attn = model.layers[0].self_attn
    T = x.shape[1]
    h = model.layers[0].input_layernorm(model.embed_tokens(x))
    cos, sin = model.rotary(torch.arange(T).expand(x.shape[0], T))
    q_nope, q_pe = attn.query(h, cos, sin)
    c, r = attn.latent(h, cos, sin)
    k_nope, _ = attn.kv_b_proj(c).unflatten(-1, (attn.n_heads, -1)).split([attn.nope, attn.v_dim], -1)
    scores = torch.einsum("bthd,bshd->bhts", q_nope, k_nope) + torch.einsum("bthd,bsd->bhts", q_pe, r)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    p = (scores * attn.scale).masked_fill(~causal, float("-inf")).softmax(-1).mean(1)  # (B, T, S)
    ix = attn.indexer
    index = ix.scores(h, attn.q_a_layernorm(attn.q_a_proj(h)), cos, sin, ix.key(h, cos, sin))
    logq = index.masked_fill(~causal, float("-inf")).log_softmax(-1)
    return (torch.xlogy(p, p) - p * logq.masked_fill(~causal, 0)).sum(-1).mean()


def test_dense_warmup_distils_attention_into_the_indexer():
    """Warm-up: only the indexers train (everything else frozen), on KL(main attention ‖ softmax(I))
    computed as by hand for layer 0; a few AdamW steps lower it; logits are dense MLA's throughout."""
    from minke.model import dsa
    cfg = dsa_preset(index_topk=4)
    model = minke.build(cfg, seed=5)
    dense = minke.build(cfg, seed=5)
    densify(dense)
    dsa.set_training(model, "warmup")
    model.train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if ".indexer." not in n}
    assert all(p.requires_grad == (".indexer." in n) for n, p in model.named_parameters())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = ids(cfg.vocab_size, B=2, T=24, seed=7)
    with torch.no_grad():
        model(x)
        assert abs(model.layers[0].self_attn.indexer.loss.item() - _kl_by_hand(model, x).item()) <= 1e-5
        dsa.indexer_loss(model)
    kls = []
    for _ in range(15):
        out = model(x)
        kl = dsa.indexer_loss(model)
        assert kl is not None and dsa.indexer_loss(model) is None  # collected once
        opt.zero_grad()
        kl.backward()
        opt.step()
        kls.append(kl.item())
    assert kls[-1] < 0.8 * kls[0], kls
    with torch.no_grad():
        assert (out.logits - dense(x).logits).abs().max().item() <= 1e-4  # attention stayed dense (weights frozen)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_sparse_stage_trains_the_indexer_only_by_its_kl():
    """Sparse stage: attention over the selected tokens (the model's usual sparse logits); the LM loss
    reaches everything but the indexers, the KL only the indexers."""
    from minke.model import dsa
    cfg = dsa_preset(index_topk=4)
    model = minke.build(cfg, seed=6).train()
    dsa.set_training(model, "sparse")
    x = ids(cfg.vocab_size, B=2, T=24, seed=8)
    out = model(x)
    kl = dsa.indexer_loss(model)
    with torch.no_grad():
        dsa.set_training(model, None)
        assert (out.logits - model(x).logits).abs().max().item() <= 1e-5
    lm = out.logits.float().logsumexp(-1).mean()
    params = dict(model.named_parameters())
    g_lm = torch.autograd.grad(lm, list(params.values()), retain_graph=True, allow_unused=True)
    g_kl = torch.autograd.grad(kl, list(params.values()), allow_unused=True)
    for (n, _), a, b in zip(params.items(), g_lm, g_kl):
        if n.startswith("mtp."):  # not run (mtp=False)
            assert a is None and b is None
        elif ".indexer." in n:
            assert a is None and b is not None and b.abs().sum() > 0, n
        else:
            assert b is None, n
    assert g_lm[list(params).index("layers.0.self_attn.q_a_proj.weight")].abs().sum() > 0
    with pytest.raises(ValueError, match="no indexers"):
        dsa.set_training(minke.build(minke.preset("tiny"), seed=0), "warmup")


def test_pretrain_dsa_warmup_then_sparse(tmp_path):
    """`minke pretrain --dsa warmup` on a DSA config changes only the indexers (the routing bias kept
    with --bias-gamma 0) and logs the KL; `--dsa sparse` from that checkpoint trains everything."""
    from safetensors.torch import load_file

    from minke.data.tokenizer import train_tokenizer
    from minke.tasks import corpus
    from minke.train import pretrain
    tok = tmp_path / "tok"
    train_tokenizer(corpus(100, seed=0), vocab_size=320, out_dir=tok)
    dsa_set = ['model_type="deepseek_v32"', 'architectures=["DeepseekV32ForCausalLM"]', "index_n_heads=4",
               "index_head_dim=16", "index_topk=16"]

    def run(out, *extra):
        return pretrain.main(["--out", str(out), "--docs", "100", "--eval-docs", "20", "--seq-len", "32",
                              "--batch-size", "4", "--steps", "4", "--warmup", "1", "--lr", "1e-2",
                              "--eval-every", "4", "--save-every", "2", "--eval-batches", "1", "--eval-problems", "0",
                              "--log-every", "100", "--bias-gamma", "0", *extra])
    assert run(tmp_path / "w", "--tokenizer", str(tok), "--set", *dsa_set, "--dsa", "warmup") == 0
    a, b = (load_file(tmp_path / "w" / d / "model.safetensors") for d in ("step-000002", "step-000004"))
    assert any(not torch.equal(a[k], b[k]) for k in a if ".indexer." in k)
    assert all(torch.equal(a[k], b[k]) for k in a if ".indexer." not in k)
    records = [json.loads(line) for line in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    kls = [r["indexer_kl"] for r in records if r["kind"] == "train"]
    assert len(kls) == 4 and all(k > 0 for k in kls)
    assert run(tmp_path / "s", "--model", str(tmp_path / "w" / "final"), "--dsa", "sparse") == 0
    c = load_file(tmp_path / "s" / "final" / "model.safetensors")
    assert not torch.equal(c["model.layers.0.self_attn.q_a_proj.weight"], b["model.layers.0.self_attn.q_a_proj.weight"])
    assert pretrain.main(["--out", str(tmp_path / "x"), "--tokenizer", str(tok), "--docs", "50", "--steps", "1",
                          "--dsa", "warmup"]) != 0  # tiny preset: no indexers


def test_v32_671b_preset_counts_its_indexers():
    """DeepSeek-V3.2-Exp's shape on the meta device: V3 plus 61 + 1 (MTP) indexers of
    1536·64·128 + 7168·128 + 2·128 + 7168·64 parameters; the indexer keys' cache bytes beside the latents."""
    cfg = minke.preset("v3.2-671b")
    model = minke.build(cfg, device="meta")
    pc, v3 = cfg.param_counts(), minke.preset("v3-671b").param_counts()
    assert sum(p.numel() for p in model.parameters()) == pc["total"] + pc["mtp_unique"]
    per_layer = 1536 * 64 * 128 + 7168 * 128 + 2 * 128 + 7168 * 64
    assert pc["total"] - v3["total"] == 61 * per_layer and pc["mtp_unique"] - v3["mtp_unique"] == per_layer
    b = cfg.kv_cache_bytes_per_token(2)
    assert b["latent"] == 70272 and b["indexer"] == 128 * 61 * 2
    assert cfg.to_dict()["mlp_layer_types"][:4] == ["dense", "dense", "dense", "sparse"]


def test_prefix_cache_hit_with_dsa(model):
    """A request whose prompt extends an earlier one's adopts its published blocks (latents and indexer
    keys in the same slots) and prefills only the rest: the greedy tokens still equal the recompute."""
    a = prompts([21], seed=9)[0]
    b = a + prompts([7], seed=10)[0]
    e = Engine(model, max_batch=2, block_size=4, num_blocks=64)
    first = e.generate([a], SamplingParams(max_tokens=6, **GREEDY))[0]
    second = e.generate([b], SamplingParams(max_tokens=10, **GREEDY))[0]
    assert e.stats.prefix_hit_tokens >= 16
    assert first.token_ids == reference(model, a, 6) and second.token_ids == reference(model, b, 10)

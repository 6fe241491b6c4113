"""Fast paths of the training step against their plain versions: forward and gradients."""

import pytest
import torch

import minke
import minke.model.moe as moe


def _moe_outputs(experts, x, w, idx, E, grouped_moe=moe.grouped_moe):
    x = x.clone().requires_grad_()
    out, _ = grouped_moe(experts, x, w, idx, E)
    experts.zero_grad()
    out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
    return out.detach(), x.grad, [p.grad.clone() for p in experts.parameters()]


@pytest.mark.parametrize("inter", [32, 6])  # 6: rows of 24 bytes, not 16-byte aligned → per-expert path
def test_grouped_mm_and_per_expert_paths_agree(monkeypatch, inter):
    cfg = minke.preset("tiny", moe_intermediate_size=inter)
    m = minke.build(cfg, seed=7).layers[1].mlp
    x = torch.randn(53, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        w, idx, _ = m.gate(x)
    assert moe.grouped_mm_ok(x, m.experts.gate_proj, m.experts.down_proj) == (
        hasattr(torch.nn.functional, "grouped_mm") and inter == 32)
    fast = _moe_outputs(m.experts, x, w, idx, cfg.n_routed_experts)
    monkeypatch.setattr(moe, "grouped_mm_ok", lambda *a: False)
    slow = _moe_outputs(m.experts, x, w, idx, cfg.n_routed_experts)
    for a, b in zip([fast[0], fast[1], *fast[2]], [slow[0], slow[1], *slow[2]]):
        assert (a - b).abs().max().item() <= 1e-5
    with torch.no_grad():
        assert (fast[0] - moe.looped_moe(m.experts, x, w, idx)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("grouped_mm", [True, False])
def test_experts_compute_in_the_autocast_dtype(monkeypatch, grouped_mm):
    """Under bf16 autocast the experts run in bf16 (torch's autocast list lacks grouped_mm; gate and up
    share one GEMM there) and agree with fp32 to bf16 precision: the output with the looped
    reference, the gradients of the input and of every expert weight with the fp32 path."""
    cfg = minke.preset("tiny", moe_intermediate_size=32)
    m = minke.build(cfg, seed=7).layers[1].mlp
    x = torch.randn(53, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    if not grouped_mm:
        monkeypatch.setattr(moe, "grouped_mm_ok", lambda *a: False)
    with torch.no_grad():
        w, idx, _ = m.gate(x)
        ref = moe.looped_moe(m.experts, x, w, idx)
    fp32 = _moe_outputs(m.experts, x, w, idx, cfg.n_routed_experts)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = _moe_outputs(m.experts, x, w, idx, cfg.n_routed_experts)
    assert bf16[0].dtype == torch.bfloat16
    assert (bf16[0].float() - ref).abs().max().item() <= 2e-2 * ref.abs().max().item()
    for a, b in zip([bf16[1], *bf16[2]], [fp32[1], *fp32[2]]):
        assert a.dtype == b.dtype == torch.float32  # gradients reach the fp32 weights and input
        assert (a - b).abs().max().item() <= 2e-2 * b.abs().max().item()


def test_padded_rows_layout():
    counts = torch.tensor([3, 0, 17, 16, 1])
    rows, ends, total = moe.padded_rows(counts, 16, int(counts.sum()))
    assert ends.tolist() == [16, 16, 48, 64, 80] and total == 80
    starts = (ends - (counts + 15) // 16 * 16).tolist()
    expect = [starts[e] + j for e, c in enumerate(counts.tolist()) for j in range(c)]
    assert rows.tolist() == expect


def test_gather_rows_gradient():
    """gather_rows' own backward (index_copy, then a sum over fan) against indexing's scatter-add."""
    g = torch.Generator().manual_seed(0)
    src = torch.randn(5, 3, generator=g, requires_grad=True)
    for index, fan in ((torch.randperm(10, generator=g), 2), (torch.tensor([4, 0, 2]), 1)):
        go = torch.randn(len(index), 3, generator=g)
        ours = torch.autograd.grad(moe.gather_rows(src, index, fan), src, go)[0]
        ref = torch.autograd.grad(src[index // fan], src, go)[0]
        assert torch.equal(moe.gather_rows(src, index, fan), src[index // fan])
        assert (ours - ref).abs().max().item() <= 1e-6


@pytest.mark.skipif(not hasattr(torch.nn.functional, "grouped_mm"), reason="needs F.grouped_mm (torch >= 2.10)")
def test_padded_experts_compiled_and_eager_agree(monkeypatch):
    """bf16 experts on CPU pad each expert's rows to ROW_MULTIPLE (eager: exactly; compiled: a static bound,
    rows past the last expert unused). Against unpadded bf16 and each other: output and gradients."""
    cfg = minke.preset("tiny", moe_intermediate_size=32)
    m = minke.build(cfg, seed=7).layers[1].mlp
    x = torch.randn(53, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        w, idx, _ = m.gate(x)

    def run(fn):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _moe_outputs(m.experts, x, w, idx, cfg.n_routed_experts, fn)
    padded = run(moe.grouped_moe)
    compiled = run(torch.compile(moe.grouped_moe, fullgraph=True))
    monkeypatch.setattr(moe, "ROW_MULTIPLE", 1)
    unpadded = run(moe.grouped_moe)
    for other in (compiled, unpadded):  # compiled: bf16 rounding in other places, up to ~0.9% measured
        for a, b in zip([padded[0], padded[1], *padded[2]], [other[0], other[1], *other[2]]):
            assert (a.float() - b.float()).abs().max().item() <= 2e-2 * b.float().abs().max().item()


def test_experts_with_no_tokens(monkeypatch):
    cfg = minke.preset("tiny")
    m = minke.build(cfg).layers[1].mlp
    x = torch.randn(0, cfg.hidden_size)
    counts = torch.zeros(cfg.n_routed_experts, dtype=torch.long)
    w, idx = torch.zeros(0, cfg.num_experts_per_tok), torch.zeros(0, cfg.num_experts_per_tok, dtype=torch.long)
    for amp in (False, True):  # bf16 takes the padded layout
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            assert m.experts.grouped(x, counts).shape == (0, cfg.hidden_size)
            assert moe.grouped_moe(m.experts, x, w, idx, cfg.n_routed_experts)[0].shape == (0, cfg.hidden_size)
    monkeypatch.setattr(moe, "grouped_mm_ok", lambda *a: False)
    assert m.experts.grouped(x, counts).shape == (0, cfg.hidden_size)


def test_training_step_gradients_match_transformers(hf_v3_dir):
    """The training path (grouped GEMM experts, padded-v fused attention) against transformers' gradients."""
    import warnings

    import torch.nn.functional as F
    from transformers import DeepseekV3ForCausalLM

    d, _ = hf_v3_dir
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = minke.load(d, dtype=torch.float32).train()
    hf = DeepseekV3ForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="sdpa").train()
    x = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(4))
    F.cross_entropy(model(x).logits.flatten(0, 1), x.flatten()).backward()
    F.cross_entropy(hf(input_ids=x).logits.flatten(0, 1), x.flatten()).backward()
    I = model.config.moe_intermediate_size
    ours, theirs = model.layers[1], hf.model.layers[1]
    pairs = [(ours.self_attn.q_a_proj.weight.grad, theirs.self_attn.q_a_proj.weight.grad),
             (ours.self_attn.kv_b_proj.weight.grad, theirs.self_attn.kv_b_proj.weight.grad),
             (ours.mlp.experts.gate_proj.grad, theirs.mlp.experts.gate_up_proj.grad[:, :I]),
             (ours.mlp.experts.up_proj.grad, theirs.mlp.experts.gate_up_proj.grad[:, I:]),
             (ours.mlp.experts.down_proj.grad, theirs.mlp.experts.down_proj.grad),
             (model.embed_tokens.weight.grad, hf.model.embed_tokens.weight.grad)]
    for a, b in pairs:
        assert (a - b).abs().max() <= 1e-4 * b.abs().max()


# ---- decode: packed GEMM weights (kernels/linear.py) -------------------------------------------
from minke.kernels import cpp as kcpp  # noqa: E402
from minke.kernels import linear as kl  # noqa: E402
from minke.model.layers import MLP  # noqa: E402

needs_onednn = pytest.mark.skipif(not kl.packed_available(torch.float32), reason="needs torch built with oneDNN")
needs_bf16 = pytest.mark.skipif(not kl.packed_available(torch.bfloat16), reason="needs a CPU with native bf16")


no_cpp = pytest.param(False, id="mkl")  # the C++ GEMV not built: MKL multiplies the "t" layout
needs_cpp = pytest.mark.skipif(kcpp.cpp_kernels() is None, reason="the C++ decode kernels could not be built here")


@needs_onednn
@pytest.mark.parametrize("cpp", [pytest.param(True, id="cpp", marks=needs_cpp), no_cpp])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["packed", "t", None])
def test_laid_out_linear_matches_f_linear(monkeypatch, dtype, kind, cpp):
    """Each decode layout (oneDNN packed, Wᵀ stored contiguous, plain) computes F.linear, with and
    without a bias, for decode's one and two rows (the C++ GEMV where built) and a batch (the packed
    copy "t" makes for it), any leading dims."""
    if not kl.packed_available(dtype):
        pytest.skip("no native bf16 on this CPU")
    if not cpp:
        monkeypatch.setattr(kcpp, "_built", False)
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(48, 40, generator=g).to(dtype), torch.randn(48, generator=g).to(dtype)
    prepared = kl.Prepared(w, kind)
    for shape in ((1, 40), (2, 40), (1, 1, 40), (3, 5, 40)):
        x = torch.randn(*shape, generator=g).to(dtype)
        for bias in (b, None):
            ref = torch.nn.functional.linear(x.double(), w.double(), None if bias is None else bias.double())
            out = prepared(x, bias)
            assert out.shape == ref.shape and out.dtype == dtype
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            assert (out.double() - ref).abs().max().item() <= tol * ref.abs().max().item()
    assert (prepared.batched is not None) == (kind == "t")  # the 15-row call made the packed copy


@needs_cpp
@pytest.mark.parametrize("threads", [1, 2])
def test_cpp_gemv_matches_matmul(threads):
    """kernels/decode.cpp's linear_t against x @ wt in float64 on the shapes decode has and their edges: outputs on
    both sides of its narrow/wide split (768), widths that are not a multiple of the vector or of its 8
    rows per pass, K split across threads, a bias, x rows with a stride."""
    cpp = kcpp.cpp_kernels()
    g = torch.Generator().manual_seed(0)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for K, O in ((768, 384), (384, 768), (768, 769), (1027, 1152), (13, 5), (2048, 3000)):
            wt = torch.randn(K, O, generator=g)
            bias = torch.randn(O, generator=g)
            for M in (1, 2):
                x = torch.randn(M, K + 3, generator=g)[:, :K]  # rows 3 floats apart
                ref = x.double() @ wt.double()
                for bb in (None, bias):
                    out = cpp.linear_t(x, wt, bb)
                    want = ref if bb is None else ref + bb.double()
                    assert out.shape == (M, O)
                    assert (out.double() - want).abs().max().item() <= 1e-5 * want.abs().max().item(), (K, O, M)
    finally:
        torch.set_num_threads(old)
    with pytest.raises(RuntimeError, match="fp32 on the CPU only"):
        cpp.linear_t(torch.ones(1, 4, dtype=torch.float64), torch.ones(4, 2, dtype=torch.float64), None)


@needs_onednn
def test_layout_rule(monkeypatch):
    """The layouts kernels/linear.py picks (benchmarks/README.md has the measurements): with the C++
    GEMV, fp32 Wᵀ from MIN_CPP_ELEMENTS; with MKL instead, Wᵀ for outputs at least as wide as the input
    or past WIDE_OUTPUT and oneDNN packed for the other large fp32 matrices; packed for every large bf16
    one; plain below the thresholds or off the CPU."""
    t = lambda *shape, dtype=torch.float32: kl.layout(torch.empty(*shape, dtype=dtype))  # noqa: E731
    if kcpp.cpp_kernels() is not None:
        assert t(32000, 768) == t(768, 2048) == t(384, 768) == t(288, 768) == t(4, 768, 384) == "t"
        assert t(16, 768) is None  # the router's size: too small to gain
    monkeypatch.setattr(kcpp, "_built", False)
    assert t(32000, 768) == "t"  # the LM head
    assert t(768, 384) == "t"  # an expert's down projection
    assert t(1152, 384) == "t"
    assert t(768, 2048) == "packed"  # a dense MLP's down projection
    assert t(384, 768) == "packed"
    assert t(288, 768) is None
    assert t(4, 768, 384) == "t"  # per-expert stacks: each matrix
    if kl.packed_available(torch.bfloat16):
        assert t(32000, 768, dtype=torch.bfloat16) == "packed"
    assert t(32000, 768, dtype=torch.float64) is None


def _greedy(model, prompts, n, packed, **kw):
    from minke.inference.engine import Engine
    from minke.inference.sampling import SamplingParams
    e = Engine(model, max_batch=3, block_size=8, packed_decode=packed, **kw)
    out = e.generate(prompts, SamplingParams(max_tokens=n, temperature=0.0, stop_token_ids=[]))
    return [c.token_ids for c in out], e


@needs_onednn
@pytest.mark.parametrize("cpp", [pytest.param(True, id="cpp", marks=needs_cpp), no_cpp])
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=needs_bf16)])
def test_engine_packed_decode_matches_plain(monkeypatch, dtype, cpp):
    """Greedy decode with the fast paths (laid-out GEMM weights; with the C++ build, its kernels for
    attention, router, experts and norms too) gives the tokens of the model's own forward with none of
    them, over a batch mix (three prompts of other lengths, one of them joining as another leaves, the
    last decoding alone) and a lone prompt, dense and MoE layers, the MTP module's weights laid out but
    unused. Rope dims 16, so the attention kernel applies. Fails when the packed experts skip an
    expert's rows."""
    model = minke.build(minke.preset("tiny", qk_rope_head_dim=16), seed=3, dtype=dtype).eval()
    assert [p.module for p in kl.DecodeWeights(model)._all()] in ([], [model.lm_head])  # by default the rest is too small to gain
    monkeypatch.setattr(kl, "MIN_PACK_ELEMENTS", {torch.float32: 0, torch.bfloat16: 0})
    monkeypatch.setattr(kl, "MIN_CPP_ELEMENTS", 0)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 1024, (n,), generator=g).tolist() for n in (5, 17, 9, 30)]
    built = kcpp._built
    monkeypatch.setattr(kcpp, "_built", False)  # the reference: torch's paths only
    plain, _ = _greedy(model, prompts, 12, False)
    alone, _ = _greedy(model, prompts[1:2], 12, False)
    calls = []
    if cpp:
        class Spy:
            def __getattr__(self, name):
                calls.append(name)
                return getattr(built, name)
        monkeypatch.setattr(kcpp, "_built", Spy())
    assert _greedy(model, prompts[1:2], 12, True)[0] == alone
    packed, e = _greedy(model, prompts, 12, True)
    if cpp and dtype == torch.float32:
        assert {"linear_t", "latent_attention", "absorb_query", "moe_tokens", "sigmoid_gate", "rms_norm"} <= set(calls)
    dw = e.decode_weights
    assert len(dw.linears) > 0 and len(dw.experts) == len(model.moe_layers())
    assert len(dw.mlps) == sum(type(m) is MLP for m in model.modules())  # dense layers' and shared experts'
    kinds = {p.w.kind for p in dw.linears if p.ready} | {p.gate_up.kind for p in dw.mlps if p.ready} | \
        {p.down[0].kind for p in dw.experts if p.ready}
    # laid out at first use: absorbed decode never runs kv_b_proj's forward, nor anything of the MTP module
    idle = [p for p in dw._all() if not p.ready and p.copies]
    kv_b = [layer.self_attn.kv_b_proj for layer in model.layers]
    assert {p.module for p in idle} >= set(kv_b) and all(p.module not in kv_b for p in dw._all() if p.ready)
    assert all(getattr(p, c) is None for p in idle for c in p.copies if hasattr(p, c))
    if dtype == torch.float32:
        assert kinds == ({"t"} if cpp else {"t", "packed"})  # the C++ GEMV takes every fp32 matrix
    assert packed == plain
    assert "forward" not in vars(model.lm_head)  # the modules are as they were after the step


@needs_onednn
def test_packed_weights_follow_in_place_updates(monkeypatch):
    """An optimizer step (in place) or load_state_dict changes the weights; the next packed forward
    sees it (fails when packs are made once and kept)."""
    monkeypatch.setattr(kl, "MIN_PACK_ELEMENTS", {torch.float32: 0, torch.bfloat16: 0})
    model = minke.build(minke.preset("tiny"), seed=0).eval()
    dw = kl.DecodeWeights(model, (moe.Experts,), (MLP,))
    assert dw.mlps and dw.experts and dw.linears
    x = torch.randint(0, 1024, (1, 6))
    with torch.inference_mode(), dw:
        before = model(x).logits
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(x).logits.square().mean().backward()
    opt.step()
    with torch.inference_mode():
        plain = model(x).logits
        with dw:
            packed = model(x).logits
    assert (plain - before).abs().max() > 1e-3
    assert (packed - plain).abs().max().item() <= 1e-5 * plain.abs().max().item()
    # the absorbed MLA halves mla.py keeps as copies (bf16 on CPU) follow too
    attn = minke.build(minke.preset("tiny"), seed=0, dtype=torch.bfloat16).layers[0].self_attn
    with torch.no_grad():
        attn._absorbed_weights()
        attn.kv_b_proj.weight.mul_(2)
        w = attn._kv_b()
        w_uk, w_uv_t = attn._absorbed_weights()
    assert torch.equal(w_uk, w[:, :attn.nope]) and torch.equal(w_uv_t, w[:, attn.nope:].transpose(1, 2))
    assert w_uk.mT.is_contiguous() and w_uv_t.is_contiguous()  # the kept copies ((H, C, N) for the key half), not views


@needs_onednn
def test_packed_forward_falls_back_outside_inference(monkeypatch):
    """With grad enabled (training, the trainer sharing the model) or another dtype the modules run
    their own forward even inside the context: gradients still reach the weights."""
    monkeypatch.setattr(kl, "MIN_PACK_ELEMENTS", {torch.float32: 0, torch.bfloat16: 0})
    model = minke.build(minke.preset("tiny"), seed=0)
    x = torch.randint(0, 1024, (1, 4))
    with kl.DecodeWeights(model, (moe.Experts,), (MLP,)):
        model(x).logits.sum().backward()
    assert model.lm_head.weight.grad is not None and model.layers[1].mlp.experts.gate_proj.grad is not None
    assert model.layers[0].mlp.gate_proj.weight.grad is not None  # a fused MLP's own forward ran

    class OwnForward(torch.nn.Linear):  # e.g. an FP8 linear: its forward is the point, never replaced
        pass
    model.lm_head.__class__ = OwnForward
    assert all(p.module is not model.lm_head for p in kl.DecodeWeights(model).linears)


@needs_onednn
@needs_cpp
def test_moe_few_tokens_kernel_matches_grouped(monkeypatch):
    """decode.cpp's moe_tokens (grouped_moe's path for one or two fp32 tokens under DecodeWeights)
    against the sorted grouped path and the looped reference, the expert loads included; more tokens
    than FEW_TOKENS keep the grouped path; an expert id out of range is an error naming it."""
    monkeypatch.setattr(kl, "MIN_CPP_ELEMENTS", 0)
    model = minke.build(minke.preset("tiny"), seed=5).eval()
    layer = model.moe_layers()[0]
    dw = kl.DecodeWeights(model, (moe.Experts,), (MLP,))
    g = torch.Generator().manual_seed(6)
    with torch.inference_mode():
        for n in (1, 2, 3):
            x = torch.randn(n, model.config.hidden_size, generator=g)
            w, idx, _ = layer.gate(x)
            ref = moe.looped_moe(layer.experts, x, w, idx)
            with dw:
                ours = dw.experts[0].few_tokens(x, w, idx)
                out, load = moe.grouped_moe(layer.experts, x, w, idx, layer.n_experts)
            assert (ours is None) == (n > kl.FEW_TOKENS)
            if ours is not None:
                assert (ours - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
            assert (out - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
            assert torch.equal(load, torch.bincount(idx.flatten(), minlength=layer.n_experts))
        with dw, pytest.raises(RuntimeError, match="expert id 99"):
            dw.experts[0].few_tokens(x[:1], w[:1], torch.full_like(idx[:1], 99))


@needs_cpp
def test_rms_norm_kernel_matches_module():
    """DecodeWeights' RMSNorm (decode.cpp's rms_norm for up to NORM_ROWS fp32 rows) against the
    module's own forward; more rows, a bf16 norm and grad mode keep the module's forward."""
    from minke.model.layers import RMSNorm
    model = torch.nn.Sequential(RMSNorm(48, eps=1e-5), RMSNorm(48).to(torch.bfloat16))
    with torch.no_grad():
        model[0].weight.normal_()
    dw = kl.DecodeWeights(model, norms=(RMSNorm,))
    assert [p.module for p in dw.norms] == [model[0]]  # fp32 only
    g = torch.Generator().manual_seed(7)
    for shape in ((1, 1, 48), (2, 3, 48), (9, 48)):
        x = torch.randn(*shape, generator=g) * 3
        with torch.inference_mode():
            ref = model[0](x)
            with dw:
                out = model[0](x)
        assert out.shape == ref.shape and (out - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    with dw:
        x = torch.randn(1, 48, requires_grad=True)
        model[0](x).sum().backward()
    assert x.grad is not None and model[0].weight.grad is not None


@needs_cpp
@pytest.mark.parametrize("groups", [(1, 1), (4, 2), (8, 3)])
@pytest.mark.parametrize("norm", [True, False])
def test_sigmoid_gate_kernel_matches_gate(groups, norm):
    """decode.cpp's sigmoid_gate (DecodeWeights' router for one or two fp32 tokens) against Gate's own
    forward: the same experts in the same order, weights (times 2.5) within 5e-6 and scores within 1e-6, with and without
    groups and normalization, a nonzero routing bias that changes the choice; other routers and more
    tokens keep the module's forward."""
    n_group, topk_group = groups
    cfg = minke.preset("tiny", n_routed_experts=16, num_experts_per_tok=4, n_group=n_group, topk_group=topk_group,
                       norm_topk_prob=norm, routed_scaling_factor=2.5)
    gate = moe.Gate(cfg)
    g = torch.Generator().manual_seed(n_group * 2 + norm)
    with torch.no_grad():
        gate.weight.normal_(generator=g)
        gate.e_score_correction_bias.normal_(generator=g).mul_(0.3)
    dw = kl.DecodeWeights(torch.nn.ModuleList([gate]), gates=(moe.Gate,))
    assert [p.module for p in dw.gates] == [gate]
    with torch.inference_mode():
        for n in (1, 2, 3):
            for _ in range(20):
                x = torch.randn(n, cfg.hidden_size, generator=g)
                ref = gate(x)
                with dw:
                    out = gate(x)
                assert torch.equal(out[1], ref[1])
                assert (out[0] - ref[0]).abs().max().item() <= 5e-6 and (out[2] - ref[2]).abs().max().item() <= 1e-6

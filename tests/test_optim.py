"""AdamW parameter groups and the LR schedule (minke/train/optim.py) against values worked out by hand."""

import math

import pytest
import torch

import minke
from minke.train import pretrain
from minke.train.optim import build_optimizer, build_scheduler, param_groups


def lrs(total, warmup, decay_from, min_ratio=0.1, peak=1.0):
    """The LR each optimizer step runs at, read from a real optimizer driven by the scheduler."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    sched = build_scheduler(opt, total, warmup, decay_from, min_ratio)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_schedule_warmup_constant_cosine_floor():
    """10 steps, 4 of warmup, cosine from step 6 (0.6 of 10) to 10% at the last step."""
    got = lrs(10, warmup=4, decay_from=0.6, peak=2e-3)
    cos = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t / 3)) for t in range(4)]  # steps 6..9, t = 0..1
    want = [0.25, 0.5, 0.75, 1.0, 1.0, 1.0] + cos
    assert got == pytest.approx([2e-3 * w for w in want], rel=1e-12)
    assert cos == pytest.approx([1.0, 0.775, 0.325, 0.1])  # by hand: cos(π/3) = 1/2, cos(2π/3) = -1/2
    # the floor is the last step's value and never undershot
    assert got[-1] == pytest.approx(2e-4) and min(got) == pytest.approx(2e-4)


def test_schedule_without_decay_and_with_warmup_past_the_end():
    assert lrs(5, warmup=2, decay_from=1.0) == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0])
    assert lrs(3, warmup=10, decay_from=0.5) == pytest.approx([1 / 3, 2 / 3, 1.0])  # warmup clipped to the run


def named_groups(model, wd):
    names = {id(p): n for n, p in model.named_parameters()}
    return [({names[id(p)] for p in g["params"]}, g["weight_decay"]) for g in param_groups(model, wd)]


def test_weight_decay_on_matrices_only():
    """Matrices (linear weights, stacked experts, embedding) decay; norm weights do not; the routing
    bias is a buffer and reaches no group."""
    model = minke.build(minke.preset("tiny"), seed=0)
    (decay, wd), (no_decay, wd0) = named_groups(model, 0.1)
    assert (wd, wd0) == (0.1, 0.0)
    assert decay | no_decay == {n for n, _ in model.named_parameters()} and not decay & no_decay
    assert no_decay and all(n.endswith(("norm.weight", "layernorm.weight", "norm.bias")) for n in no_decay), no_decay
    assert {"embed_tokens.weight", "layers.1.mlp.experts.gate_proj", "layers.0.self_attn.kv_a_proj_with_mqa.weight",
            "layers.1.mlp.gate.weight"} <= decay
    bias = model.layers[1].mlp.gate.e_score_correction_bias
    assert all(p is not bias for g in param_groups(model, 0.1) for p in g["params"])


def test_adamw_decays_exactly_the_matrices():
    """A step with zero gradients moves nothing but the decoupled decay: p ← p·(1 − lr·wd) for
    matrices, vectors unchanged. Catches: every parameter put in the decay group."""
    model = minke.build(minke.preset("tiny"), seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, lr=0.5, weight_decay=0.1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        want = before[n] * (1 - 0.05) if p.dim() >= 2 else before[n]
        torch.testing.assert_close(p.detach(), want, rtol=1e-6, atol=0, msg=n)


def test_step_bumps_version_counters_for_weight_caches():
    """The fused AdamW kernel writes the parameters without bumping their version counters; the step
    must bump them, since MLA's absorbed-weight cache and the engine's prefix cache read them to see a
    weight change. Fails when the hook is left out: GRPO then generates with the first step's kv_b
    halves forever (its toy reward stays flat)."""
    model = minke.build(minke.preset("tiny"), seed=0)
    attn = model.layers[0].self_attn
    with torch.inference_mode():
        attn._absorbed_weights()  # cached, as the engine's decode does between trainer steps
    opt = build_optimizer(model, lr=0.1)
    before = {n: p._version for n, p in model.named_parameters()}
    model(torch.randint(0, 1024, (1, 6))).logits.square().mean().backward()
    opt.step()
    assert all(p._version > before[n] for n, p in model.named_parameters()), "a parameter's version did not move"
    with torch.inference_mode():
        w = attn._kv_b()
        w_uk, w_uv_t = attn._absorbed_weights()
    assert torch.equal(w_uk, w[:, :attn.nope]) and torch.equal(w_uv_t, w[:, attn.nope:].transpose(1, 2))


# ---- AdamW moments in BF16 (V3 §3.3) -------------------------------------------------------------
from minke.train.optim import AdamWBF16Moments, state_bytes  # noqa: E402


def step_once(model, opt):
    out = model(torch.randint(0, 1024, (2, 8), generator=torch.Generator().manual_seed(0)), mtp=True)
    (out.logits.square().mean() + out.mtp_logits[0].square().mean()).backward()  # every parameter gets a gradient
    opt.step()


def test_bf16_moments_are_bf16_and_halve_the_state():
    """After a step every exp_avg / exp_avg_sq is BF16, the parameters stay FP32, the state takes 2 + 2 bytes
    per parameter (+ a 4-byte step per tensor) instead of 4 + 4, and the version-counter bump of
    build_optimizer still happens (the same fused kernel writes the parameters)."""
    fp32, bf16 = (minke.build(minke.preset("tiny"), seed=0) for _ in range(2))
    o32, o16 = build_optimizer(fp32, lr=1e-3), build_optimizer(bf16, lr=1e-3, bf16_moments=True)
    assert isinstance(o16, AdamWBF16Moments) and o16.defaults["fused"]
    before = {n: p._version for n, p in bf16.named_parameters()}
    step_once(fp32, o32)
    step_once(bf16, o16)
    assert all(p._version > before[n] for n, p in bf16.named_parameters()), "a parameter's version did not move"
    n, tensors = sum(p.numel() for p in bf16.parameters()), len(list(bf16.parameters()))
    assert all(s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.bfloat16 for s in o16.state.values())
    assert len(o16.state) == tensors and all(p.dtype == torch.float32 for p in bf16.parameters())
    assert state_bytes(o32) == 8 * n + 4 * tensors and state_bytes(o16) == 4 * n + 4 * tensors
    # the first step computes with the moments before they are rounded: the same update as FP32 moments
    assert all(torch.equal(a, b) for a, b in zip(fp32.parameters(), bf16.parameters()))


def test_bf16_moments_refuse_betas_whose_decay_bf16_cannot_hold():
    p = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match=r"beta2 0\.999.*half a BF16 ulp"):
        AdamWBF16Moments(p, betas=(0.9, 0.999))
    AdamWBF16Moments(p, betas=(0.9, 0.95))  # V3's


@pytest.fixture
def one_rank_mesh():
    """A one-process gloo group and mesh: FSDP2 makes DTensors (the foreach path) without torchrun."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def test_bf16_moments_on_fsdp2_dtensors_resume_exactly(one_rank_mesh):
    """FSDP2-sharded parameters: the moments are BF16 DTensors, training follows the plain-tensor (fused)
    run to summation order, and parallel.optimizer_state / load_optimizer_state (the checkpoint's name-keyed
    full state) resume it exactly: the resumed losses and weights equal the uninterrupted run's."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from minke.train import parallel

    def model(shard=True):
        m = minke.build(minke.preset("tiny"), seed=0)
        if shard:
            for block in [*m.layers, *m.mtp]:
                fully_shard(block, mesh=one_rank_mesh)
            fully_shard(m, mesh=one_rank_mesh)
        return m

    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, 1024, (2, 12), generator=g) for _ in range(6)]

    def train(m, opt, batches):
        losses = []
        for x in batches:
            out = m(x, mtp=True)
            loss = out.logits.logsumexp(-1).mean() + out.mtp_logits[0].logsumexp(-1).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        return losses

    plain = model(shard=False)
    ref_model = model()
    ref_opt = build_optimizer(ref_model, lr=1e-2, bf16_moments=True)
    assert not ref_opt.defaults["fused"]
    ref = train(ref_model, ref_opt, data)
    assert ref == pytest.approx(train(plain, build_optimizer(plain, lr=1e-2, bf16_moments=True), data), rel=1e-4)
    assert all(isinstance(s["exp_avg"], DTensor) and s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.bfloat16
               for s in ref_opt.state.values())

    first = model()
    opt = build_optimizer(first, lr=1e-2, bf16_moments=True)
    train(first, opt, data[:3])
    state = parallel.optimizer_state(first, opt)
    assert {v.dtype for s in state["state"].values() for k, v in s.items() if k != "step"} == {torch.bfloat16}
    weights = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in first.state_dict().items()}
    resumed = model()
    parallel.set_model_state_dict(resumed, weights, options=parallel.StateDictOptions(full_state_dict=True))
    opt = build_optimizer(resumed, lr=1e-2, bf16_moments=True)
    parallel.load_optimizer_state(resumed, opt, state)
    assert all(s["exp_avg"].dtype == torch.bfloat16 for s in opt.state.values())
    assert train(resumed, opt, data[3:]) == ref[3:]
    assert all(torch.equal(a.full_tensor(), b.full_tensor()) for a, b in zip(resumed.parameters(), ref_model.parameters()))


# ---- minke pretrain --bf16-moments ----------------------------------------------------------------
from test_pretrain import flags, history, killed_in_step, same_weights, tok_dir  # noqa: E402,F401 (tok_dir: a fixture)

LR = ("--lr", "3e-3")  # test_pretrain's 1e-2 spikes the gradient norm to 20 at step 8: chaos, not the moments


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tok_dir):
    """8 steps of `minke pretrain` (tiny) with FP32 and with BF16 moments, same seed and data."""
    out = tmp_path_factory.mktemp("moments")
    for name, extra in (("fp32", ()), ("bf16", ("--bf16-moments",))):
        assert pretrain.main(flags(out / name, tok_dir, *LR, *extra)) == 0
    return out


def test_pretrain_bf16_moments_track_fp32_moments(runs):
    """Rounding a moment to BF16 moves it by at most 2⁻⁹ relative, the update m/√v by ≤ 2⁻⁹ + 2⁻¹⁰ ≈ 0.3%
    per element and step; over 8 steps the losses and the held-out loss stay within 1e-3 relative of the
    FP32-moment run (measured ≤ 3.4e-5, the held-out loss at step 8; moments never written back, so zero at
    every step, are 7.6e-3 off at step 3). Steps 1 and 2 are equal: the first update comes from moments not
    yet rounded."""
    a, b = history(runs / "fp32"), history(runs / "bf16")
    assert [(r["kind"], r["step"]) for r in a] == [(r["kind"], r["step"]) for r in b]
    train = [(ra, rb) for ra, rb in zip(a, b) if ra["kind"] == "train"]
    assert train[0][0]["loss"] == train[0][1]["loss"]
    assert any(ra["loss"] != rb["loss"] for ra, rb in train)  # the moments really are rounded
    for ra, rb in zip(a, b):
        for k in ("loss", "eval_ce"):
            if k in ra:
                assert rb[k] == pytest.approx(ra[k], rel=1e-3), (ra["kind"], ra["step"], k)


def test_pretrain_bf16_moments_resume_bitwise(tmp_path, tok_dir, runs, monkeypatch):
    """Killed mid-step 6 after the step-4 checkpoint, then --resume: bitwise the uninterrupted BF16-moment
    run (the checkpoint holds BF16 moments, loaded back as BF16: torch's load_state_dict alone would widen
    them to FP32, and the resumed run would round differently from the uninterrupted one)."""
    from minke.train import checkpoint

    out = tmp_path / "b"
    killed_in_step(monkeypatch, flags(out, tok_dir, *LR, "--bf16-moments"))
    state = checkpoint.load_state(checkpoint.latest(out))["optimizer"]["state"]
    assert {v.dtype for s in state.values() for k, v in s.items() if k != "step"} == {torch.bfloat16}
    assert pretrain.main(flags(out, tok_dir, *LR, "--bf16-moments", "--resume", str(out))) == 0
    assert history(out) == history(runs / "bf16")
    assert same_weights(out / "final", runs / "bf16" / "final")

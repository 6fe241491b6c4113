"""AdamW parameter groups and the LR schedule (minke/train/optim.py) against values worked out by hand."""

import math

import pytest
import torch

import minke
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

"""GRPO math against hand-computed values (minke.rl.grpo)."""

import math

import pytest
import torch

from minke.rl import grpo
from minke.rl.grpo import group_advantages, informative_groups, kl_k3, policy_loss, token_logprobs


# ---------------------------------------------------------------- advantages

def test_advantages_scaled_by_unbiased_std():
    # [1, 0, 0, 0]: mean 0.25; unbiased std = sqrt((0.75² + 3·0.25²) / 3) = 0.5 (population std: 0.433)
    a = group_advantages(torch.tensor([[1.0, 0, 0, 0]]))
    d = 0.5 + 1e-4
    torch.testing.assert_close(a, torch.tensor([[0.75 / d, -0.25 / d, -0.25 / d, -0.25 / d]]))
    # [1, 0, 0, 1]: unbiased std = sqrt(4 · 0.25 / 3) = 1/√3
    a = group_advantages([[1.0, 0.0, 0.0, 1.0]], eps=0.0)
    v = 0.5 * math.sqrt(3)
    torch.testing.assert_close(a, torch.tensor([[v, -v, -v, v]]))


def test_advantages_mean_only_dr_grpo():
    a = group_advantages(torch.tensor([[1.0, 0, 0, 0], [2.0, 4.0, 0.0, 2.0]]), scale_by_std=False)
    torch.testing.assert_close(a, torch.tensor([[0.75, -0.25, -0.25, -0.25], [0.0, 2.0, -2.0, 0.0]]))


@pytest.mark.parametrize("scale", [True, False])
def test_all_equal_group_gets_exactly_zero(scale):
    r = torch.tensor([[0.1, 0.1, 0.1], [1.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
    a = group_advantages(r, scale_by_std=scale)
    assert torch.equal(a[:2], torch.zeros(2, 3))
    assert (a[2] != 0).all()
    assert informative_groups(r).tolist() == [False, False, True]


def test_group_of_one_is_an_error():
    with pytest.raises(ValueError, match="group size"):
        group_advantages(torch.tensor([[1.0], [0.0]]))
    with pytest.raises(ValueError, match="N prompts, G samples"):
        group_advantages(torch.tensor([1.0, 0.0]))


# ---------------------------------------------------------------- k3 KL

def test_kl_k3_hand_values():
    lp = torch.log(torch.tensor([0.5, 0.25, 0.3]))
    assert torch.equal(kl_k3(lp, lp), torch.zeros(3))
    # ref/θ = 0.5: 0.5 - log 0.5 - 1 = log 2 - 0.5;  ref/θ = 2: 2 - log 2 - 1 = 1 - log 2
    k = kl_k3(torch.log(torch.tensor([0.5, 0.25])), torch.log(torch.tensor([0.25, 0.5])))
    torch.testing.assert_close(k, torch.tensor([math.log(2) - 0.5, 1 - math.log(2)]))
    assert (k > 0).all()


def test_kl_term_in_loss_value_and_gradient():
    # A = 0, logp = 0 (π_θ = 1), ref = log 0.5: loss = β·k3 = β(log 2 - 0.5);
    # d k3 / d logp = 1 - exp(ref - logp) = 0.5 → gradient β·0.5
    logp = torch.zeros(1, 1, requires_grad=True)
    ref = torch.full((1, 1), math.log(0.5))
    loss, stats = policy_loss(logp, None, torch.zeros(1), torch.ones(1, 1), beta=0.1, ref_logp=ref)
    loss.backward()
    assert loss.item() == pytest.approx(0.1 * (math.log(2) - 0.5), abs=1e-7)
    assert logp.grad.item() == pytest.approx(0.05, abs=1e-7)
    assert stats["kl"] == pytest.approx(math.log(2) - 0.5, abs=1e-7)
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(logp, None, torch.zeros(1), torch.ones(1, 1), beta=0.1)


# ---------------------------------------------------------------- clipping

def test_clip_higher_both_sides_values_and_gradients():
    # One token per sequence; ratio ρ set through old_logp = -log ρ with logp = 0.
    #   A=+1 ρ=1.5  : clipped at 1+ε_high=1.28 → token loss -1.28, gradient 0     (clip_high)
    #   A=-1 ρ=0.5  : clipped at 1-ε_low=0.8   → token loss +0.8,  gradient 0     (clip_low)
    #   A=+1 ρ=0.5  : min(0.5, 0.8) = 0.5 unclipped → loss -0.5, d/dlogp = -ρA = -0.5
    #   A=-1 ρ=1.5  : min(-1.5, -1.28) = -1.5 unclipped → loss 1.5, d/dlogp = 1.5
    #   A=+1 ρ=1.25 : inside clip-higher's 1.28 → loss -1.25, d/dlogp = -1.25 (symmetric 0.2 would clip)
    # "grpo" with one token each: mean over the 5 sequences.
    ratio = torch.tensor([1.5, 0.5, 0.5, 1.5, 1.25])
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0])
    logp = torch.zeros(5, 1, requires_grad=True)
    old = -ratio.log()[:, None]
    loss, stats = policy_loss(logp, old, adv, torch.ones(5, 1), eps_low=0.2, eps_high=0.28)
    loss.backward()
    assert loss.item() == pytest.approx((-1.28 + 0.8 - 0.5 + 1.5 - 1.25) / 5, abs=1e-6)
    torch.testing.assert_close(logp.grad[:, 0], torch.tensor([0.0, 0.0, -0.5, 1.5, -1.25]) / 5)
    assert stats["clip_low"] == pytest.approx(0.2) and stats["clip_high"] == pytest.approx(0.2)
    assert stats["clip"] == pytest.approx(0.4)
    assert stats["ratio"] == pytest.approx(5.25 / 5, abs=1e-6)
    assert stats["tokens"] == 5

    # symmetric ε = 0.2: ρ = 1.25 with A > 0 is now clipped at 1.2, no gradient
    logp.grad = None
    loss, stats = policy_loss(logp, old, adv, torch.ones(5, 1), eps_low=0.2, eps_high=0.2)
    loss.backward()
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 0.5 + 1.5 - 1.2) / 5, abs=1e-6)
    assert logp.grad[4, 0].item() == 0.0 and logp.grad[0, 0].item() == 0.0
    assert stats["clip_high"] == pytest.approx(0.4)


def test_first_inner_step_ratio_is_one():
    logp = torch.randn(3, 4, requires_grad=True)
    adv = torch.tensor([1.0, -0.5, 2.0])
    mask = torch.ones(3, 4)
    l1, s1 = policy_loss(logp, None, adv, mask)
    l2, s2 = policy_loss(logp, logp.detach(), adv, mask)
    assert l1.item() == pytest.approx(l2.item())
    assert s1["ratio"] == pytest.approx(1.0) and s1["clip"] == 0.0
    # ρ = 1 so the loss is -mean(A) whatever logp is
    assert l1.item() == pytest.approx(-adv.mean().item(), abs=1e-6)


# ---------------------------------------------------------------- aggregation

@pytest.mark.parametrize("agg, loss, g0, g1", [
    # seq 0: 3 tokens, A = +1 → token loss -1; seq 1: 1 token, A = -2 → token loss +2 (ρ = 1)
    ("grpo", (-1 + 2) / 2, -1 / 3 / 2, 2 / 2),     # per-sequence means, then mean over 2 sequences
    ("dapo", (-3 + 2) / 4, -1 / 4, 2 / 4),          # Σ over 4 tokens / 4
    ("dr_grpo", (-3 + 2) / (2 * 4), -1 / 8, 2 / 8),  # Σ / (2 sequences × max_len 4)
])
def test_aggregations_hand_computed(agg, loss, g0, g1):
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    # garbage in the padding must not reach the loss or the gradient
    logp = torch.tensor([[0.0, 0.0, 0.0], [0.0, float("nan"), float("inf")]], requires_grad=True)
    old = torch.tensor([[0.0, 0.0, 0.0], [0.0, float("-inf"), float("nan")]])
    out, stats = policy_loss(logp, old, torch.tensor([1.0, -2.0]), mask, agg=agg, max_len=4)
    out.backward()
    assert out.item() == pytest.approx(loss, abs=1e-6)
    torch.testing.assert_close(logp.grad, torch.tensor([[g0, g0, g0], [g1, 0.0, 0.0]]))
    assert stats["tokens"] == 4 and stats["ratio"] == pytest.approx(1.0)


def test_bad_arguments():
    lp, m = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="max_len"):
        policy_loss(lp, None, torch.zeros(2), m, agg="dr_grpo")
    with pytest.raises(ValueError, match="unknown aggregation"):
        policy_loss(lp, None, torch.zeros(2), m, agg="bnpo")
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(lp, None, torch.zeros(3), m)
    with pytest.raises(ValueError, match="mask"):
        policy_loss(lp, None, torch.zeros(2), torch.ones(2, 2))


@pytest.mark.parametrize("agg", grpo.AGGREGATIONS)
def test_micro_batches_sum_to_the_full_batch(agg):
    g = torch.Generator().manual_seed(0)
    B, T = 6, 5
    lengths = torch.tensor([5, 1, 3, 4, 2, 5])
    mask = torch.arange(T)[None] < lengths[:, None]
    logp = (-torch.rand(B, T, generator=g) * 3).requires_grad_()
    old = logp.detach() + 0.4 * torch.randn(B, T, generator=g)  # ratios well outside [0.8, 1.28]
    ref = logp.detach() + 0.3 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    kw = dict(eps_low=0.2, eps_high=0.28, beta=0.04, agg=agg, max_len=T)

    full, stats = policy_loss(logp, old, adv, mask, ref_logp=ref, **kw)
    assert 0 < stats["clip"] < 1  # the test exercises clipped and unclipped tokens
    (full_grad,) = torch.autograd.grad(full, logp)

    total = 0.0
    for sl in (slice(0, 1), slice(1, 4), slice(4, 6)):
        part, _ = policy_loss(logp[sl], old[sl], adv[sl], mask[sl], ref_logp=ref[sl],
                              total_tokens=mask.sum(), total_seqs=B, **kw)
        part.backward()
        total += part.item()
    assert total == pytest.approx(full.item(), abs=1e-6)
    torch.testing.assert_close(logp.grad, full_grad)


# ---------------------------------------------------------------- log-probs and entropy

def test_token_logprobs_chunked_matches_log_softmax(monkeypatch):
    g = torch.Generator().manual_seed(1)
    B, T, V = 2, 5, 11
    logits = torch.randn(B, T, V, generator=g, requires_grad=True)
    targets = torch.randint(0, V, (B, T), generator=g)
    monkeypatch.setattr(grpo, "_CHUNK_ELEMENTS", 3 * V)  # 10 rows in chunks of 3, 3, 3, 1
    for tau in (1.0, 0.7):
        want = torch.log_softmax(logits / tau, -1).gather(-1, targets[..., None])[..., 0]
        got = token_logprobs(logits, targets, temperature=tau)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want)
    (gw,) = torch.autograd.grad(want.sum(), logits)
    (gg,) = torch.autograd.grad(token_logprobs(logits, targets, temperature=0.7).sum(), logits)
    torch.testing.assert_close(gg, gw)

    # bf16 logits give fp32 log-probs; an ignored target (-100) gives 0
    t = targets.clone()
    t[1, 2] = -100
    out = token_logprobs(logits.detach().bfloat16(), t)
    assert out.dtype == torch.float32 and out[1, 2].item() == 0.0
    with pytest.raises(ValueError, match="disagree"):
        token_logprobs(logits, targets[:, :4])


def test_entropy(monkeypatch):
    monkeypatch.setattr(grpo, "_CHUNK_ELEMENTS", 8)
    V = 8
    logits = torch.zeros(1, 3, V)
    logits[0, 1, 0] = 100.0  # (nearly) one-hot
    logits[0, 2, :2] = 5.0   # two equal tokens carry almost all mass → ≈ log 2
    h = grpo.entropy(logits)
    assert h.shape == (1, 3)
    assert h[0, 0].item() == pytest.approx(math.log(V), abs=1e-5)
    assert h[0, 1].item() == pytest.approx(0.0, abs=1e-5)
    p = torch.softmax(logits[0, 2], -1)
    assert h[0, 2].item() == pytest.approx(-(p * p.log()).sum().item(), abs=1e-5)
    _, stats = policy_loss(torch.zeros(1, 3), None, torch.ones(1), torch.ones(1, 3), entropies=h)
    assert stats["entropy"] == pytest.approx(h.mean().item(), abs=1e-6)


# ---------------------------------------------------------------- the pieces together

@pytest.mark.parametrize("agg, scale", [("grpo", True), ("dapo", True), ("dr_grpo", False)])
def test_toy_bandit_reward_rises(agg, scale):
    """One-token "responses" from a softmax policy; reward 1 for token 2. GRPO's advantages + loss must
    move probability onto it (a sign error anywhere would drive it to 0)."""
    g = torch.Generator().manual_seed(0)
    N, G, V = 4, 8, 5
    logits = torch.zeros(V, requires_grad=True)
    opt = torch.optim.SGD([logits], lr=0.5)
    for _ in range(40):
        with torch.no_grad():
            actions = torch.multinomial(torch.softmax(logits, -1), N * G, replacement=True, generator=g)
        rewards = (actions == 2).float().view(N, G)
        adv = group_advantages(rewards, scale_by_std=scale).flatten()
        old = None
        for _ in range(2):  # μ = 2 inner steps on one batch: the second has ρ ≠ 1
            logp = token_logprobs(logits.expand(N * G, 1, V), actions[:, None])
            loss, _ = policy_loss(logp, old, adv, torch.ones(N * G, 1), eps_high=0.28, agg=agg, max_len=1)
            old = logp.detach() if old is None else old
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert torch.softmax(logits, -1)[2].item() > 0.9

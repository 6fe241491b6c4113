"""Routing and the balance loss against independent references: hand computations and transformers'
DeepSeek-V3 router. Each test names the break it was shown to catch (see tests/conftest.py)."""

from fractions import Fraction

import pytest
import torch

import minke
from minke.model.moe import Gate, sequence_balance_loss


def balance_by_hand(scores, idx, batch, E, K):
    """V3 eq. 17–20 spelled out with exact fractions: per sequence, f_i = E/(K·T)·#{t : i ∈ topk(t)},
    P_i = (1/T)·Σ_t s_{i,t}/Σ_j s_{j,t}; the loss is Σ_i f_i·P_i, averaged over the sequences."""
    T = len(scores) // batch
    total = Fraction(0)
    for b in range(batch):
        rows = range(b * T, (b + 1) * T)
        f = [Fraction(E, K * T) * sum(i in idx[t] for t in rows) for i in range(E)]
        P = [sum(Fraction(scores[t][i]) / sum(Fraction(v) for v in scores[t]) for t in rows) / T for i in range(E)]
        total += sum(fi * pi for fi, pi in zip(f, P))
    return total / batch


# Two sequences of two tokens, four experts, two per token; integer scores so the fractions are exact.
SCORES = [[4, 2, 1, 1], [1, 1, 2, 4],  # sequence 0: P = (5/16, 3/16, 3/16, 5/16)
          [6, 1, 1, 0], [2, 2, 2, 2]]  # sequence 1: P = (1/2, 3/16, 3/16, 1/8)
ROUTES = [[0, 1], [0, 3],  # sequence 0: counts (2, 1, 0, 1) → f = (2, 1, 0, 1), Σ f·P = 9/8
          [0, 1], [0, 1]]  # sequence 1: counts (2, 2, 0, 0) → f = (2, 2, 0, 0), Σ f·P = 11/8


def test_sequence_balance_loss_by_hand_with_skewed_routing():
    """Catches: normalizing with softmax instead of dividing by the sum; counts credited to the other
    sequence (both move the value off 5/4)."""
    assert balance_by_hand(SCORES, ROUTES, 2, 4, 2) == Fraction(5, 4)  # (9/8 + 11/8) / 2
    got = sequence_balance_loss(torch.tensor(SCORES, dtype=torch.float32), torch.tensor(ROUTES), 2, 4, 2)
    assert got.item() == pytest.approx(1.25, abs=1e-6)


def test_moe_balance_loss_per_sequence_from_its_own_routing():
    """The MoE module in training: its balance_loss for a (B, T, D) batch is the hand formula over the
    gate's own scores and choices, sequence by sequence (B = 3, a router skewed by its bias)."""
    cfg = minke.preset("tiny")
    moe = minke.build(cfg, seed=3).layers[1].mlp.train()
    with torch.no_grad():
        moe.gate.e_score_correction_bias.copy_(torch.linspace(1.0, 0, cfg.n_routed_experts))  # low ids favoured
        x = torch.randn(3, 5, cfg.hidden_size, generator=torch.Generator().manual_seed(0)) * 10
        moe(x)
        _, idx, scores = moe.gate(x.flatten(0, 1))
    want = balance_by_hand(scores.double().tolist(), idx.tolist(), 3, cfg.n_routed_experts, cfg.num_experts_per_tok)
    assert moe.balance_loss.item() == pytest.approx(float(want), rel=1e-5)
    assert float(want) > 1.05  # skewed: above the balanced optimum of 1


def gate_with_scores(n_experts, n_group, topk_group, k):
    """A noaux_tc gate whose logits are the input's first E coordinates (weight = [I, 0])."""
    cfg = minke.preset("tiny", n_routed_experts=n_experts, n_group=n_group, topk_group=topk_group,
                       num_experts_per_tok=k, norm_topk_prob=True, routed_scaling_factor=1.0)
    gate = Gate(cfg)
    with torch.no_grad():
        gate.weight.copy_(torch.eye(n_experts, cfg.hidden_size))
    return gate, cfg.hidden_size


def test_noaux_tc_scores_groups_by_the_sum_of_their_top_two():
    """Catches: group score = max instead of the sum of the top-2 biased scores. Group 0 holds the best
    single expert (0.9) but the weakest top-2 sum; groups 1 and 2 must win."""
    s = torch.tensor([[0.9, 0.1, 0.1, 0.1,  # group 0: max 0.9, top-2 sum 1.0
                       0.6, 0.6, 0.1, 0.1,  # group 1: top-2 sum 1.2
                       0.55, 0.5, 0.5, 0.1,  # group 2: top-2 sum 1.05
                       0.2, 0.2, 0.2, 0.2]])  # group 3: 0.4
    gate, D = gate_with_scores(16, 4, 2, 3)
    x = torch.zeros(1, D)
    x[:, :16] = torch.logit(s)
    with torch.no_grad():
        w, idx, scores = gate(x)
    assert sorted(idx[0].tolist()) == [4, 5, 8]  # best three inside groups 1 and 2; expert 0 is not eligible
    torch.testing.assert_close(w[0].sort().values, torch.tensor([0.55, 0.6, 0.6]).sort().values / 1.75)


def test_noaux_tc_router_matches_transformers():
    """Expert choice and gate weights against transformers' DeepseekV3TopkRouter on random tokens, with
    a routing bias large enough to change which groups win."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    from conftest import hf_v3_config

    hf_cfg = hf_v3_config(n_routed_experts=32, n_group=8, topk_group=3, num_experts_per_tok=4)
    hf = DeepseekV3TopkRouter(hf_cfg)
    cfg = minke.preset("tiny", hidden_size=hf_cfg.hidden_size, n_routed_experts=32, n_group=8, topk_group=3,
                       num_experts_per_tok=4, routed_scaling_factor=hf_cfg.routed_scaling_factor)
    gate = Gate(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        gate.weight.copy_(torch.randn(32, hf_cfg.hidden_size, generator=g) * 0.3)
        gate.e_score_correction_bias.copy_(torch.rand(32, generator=g) * 0.3)
        hf.weight.copy_(gate.weight)
        hf.e_score_correction_bias.copy_(gate.e_score_correction_bias)
        x = torch.randn(500, hf_cfg.hidden_size, generator=g)
        w, idx, _ = gate(x)
        _, hw, hidx = hf(x)
    order, horder = idx.argsort(-1), hidx.argsort(-1)
    assert torch.equal(idx.gather(1, order), hidx.gather(1, horder))
    torch.testing.assert_close(w.gather(1, order), hw.gather(1, horder))

"""MTP speculative decoding: greedy output identical to plain greedy, the MTP layer's cache consistent
with a full recompute, multiple tokens accepted per step when the MTP head agrees, and rejection
sampling that preserves the target distribution."""

import pytest
import torch

import minke
from minke.inference.engine import Engine
from minke.inference.sampling import SamplingParams
from minke.inference.speculative import accept_sampled

GREEDY = dict(temperature=0.0, stop_token_ids=[], logprobs=True)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return minke.build(minke.preset("tiny"), seed=1, dtype=torch.float64)


@pytest.fixture(scope="module")
def agreeing_model():
    """The MTP module predicts what the main model will: every MLP/MoE output is zero and attention
    is scaled down to a small (but nonzero, so the cache matters) perturbation, so the main model
    predicts about f(t_i) from the current token; the MTP module sees only the embedding of the next
    token (eh_proj = [I, 0]) and predicts f(t_{i+1}), the main model's next prediction."""
    cfg = minke.preset("tiny")
    m = minke.build(cfg, seed=2, dtype=torch.float64)
    D = cfg.hidden_size
    with torch.no_grad():
        for block in list(m.layers) + list(m.mtp):
            block.self_attn.o_proj.weight.mul_(0.3 if block in m.layers else 0.0)
            mlp = block.mlp
            if hasattr(mlp, "experts"):
                mlp.experts.down_proj.zero_()
                mlp.shared_experts.down_proj.weight.zero_()
            else:
                mlp.down_proj.weight.zero_()
        m.mtp[0].eh_proj.weight.copy_(torch.cat([torch.eye(D), torch.zeros(D, D)], 1))
    return m


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 1024, (n,), generator=g).tolist() for n in lengths]


def run(model, ps, n, **kw):
    e = Engine(model, **kw)
    cs = e.generate(ps, [SamplingParams(max_tokens=k, **GREEDY) for k in n])
    return e, cs


def assert_same(a, b):
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids
        torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("num_draft", [1, 3])
def test_speculative_greedy_equals_plain_greedy(model, num_draft):
    ps = prompts([1, 4, 9, 17, 2, 12])
    n = [14, 9, 20, 6, 11, 16]
    _, plain = run(model, ps, n, max_batch=4, block_size=4, num_blocks=96)
    e, specd = run(model, ps, n, max_batch=4, block_size=4, num_blocks=96, speculative=True, num_draft=num_draft)
    assert_same(specd, plain)
    assert e.stats.draft_proposed > 0
    assert e.cache.num_free_blocks == e.cache.num_blocks


@pytest.mark.parametrize("num_draft", [1, 2])
def test_mtp_cache_matches_full_recompute(model, num_draft):
    """After every step, each running sequence's next draft comes from module 1 at its last cached
    position, attending over its own cache layer: it must equal module 1 in a full forward."""
    ps = prompts([3, 10, 6], seed=1)
    e = Engine(model, max_batch=3, block_size=4, num_blocks=64, speculative=True, num_draft=num_draft)
    for p in ps:
        e.add_request(p, SamplingParams(max_tokens=12, **GREEDY))
    checked = 0
    while e.has_unfinished():
        e.step()
        for r in e.running:
            with torch.no_grad():
                ref = model(torch.tensor([r.tokens]), mtp=True).mtp_logits[0][0, -1]
            torch.testing.assert_close(r.draft_logits, ref, atol=1e-5, rtol=1e-5)
            checked += 1
    assert checked > 10


@pytest.mark.parametrize("num_draft", [1, 3])
def test_agreeing_mtp_accepts_several_tokens_per_step(agreeing_model, num_draft):
    ps = prompts([5, 11, 2], seed=3)
    n = [24, 24, 24]
    _, plain = run(agreeing_model, ps, n, max_batch=3, block_size=4, num_blocks=96)
    e, specd = run(agreeing_model, ps, n, max_batch=3, block_size=4, num_blocks=96, speculative=True,
                   num_draft=num_draft)
    assert_same(specd, plain)
    assert e.stats.acceptance_rate > 0.7
    # tokens per decode forward ≈ 1 + accepted drafts
    assert e.stats.generated_tokens - e.stats.prefills > 1.5 * e.stats.decode_forwards * (1 if num_draft == 1 else 1.3)


def test_speculative_preemption_and_stops(agreeing_model):
    ps = prompts([6, 9, 4, 7], seed=4)
    n = [20, 20, 20, 20]
    _, plain = run(agreeing_model, ps, n, max_batch=4, block_size=4, num_blocks=64)
    e, specd = run(agreeing_model, ps, n, max_batch=4, block_size=4, num_blocks=14, speculative=True, num_draft=2)
    assert e.stats.preemptions > 0
    assert_same(specd, plain)
    # a stop token inside a run of accepted drafts ends the request there
    stop = plain[0].token_ids[5]
    first = plain[0].token_ids.index(stop)
    e2 = Engine(agreeing_model, speculative=True, num_draft=3)
    (c,) = e2.generate([ps[0]], SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[stop]))
    assert c.token_ids == plain[0].token_ids[:first + 1] and c.finish_reason == "stop"
    # max_tokens is exact even when a step accepts several
    (c,) = e2.generate([ps[1]], SamplingParams(max_tokens=7, **GREEDY))
    assert c.token_ids == plain[1].token_ids[:7] and c.finish_reason == "length"


def test_speculative_sampling_is_seeded(agreeing_model):
    p = prompts([5], seed=5)[0]
    sp = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.95, seed=7, stop_token_ids=[])
    a = Engine(agreeing_model, speculative=True, num_draft=2).generate([p], sp)[0].token_ids
    mates = prompts([3, 8], seed=6)
    e = Engine(agreeing_model, speculative=True, num_draft=2, max_batch=3)
    cs = e.generate([mates[0], p, mates[1]], [SamplingParams(max_tokens=10, temperature=1.0, stop_token_ids=[]),
                                              sp, SamplingParams(max_tokens=30, **GREEDY)])
    assert cs[1].token_ids == a and len(a) == 16
    assert e.stats.acceptance_rate > 0.3


def test_rejection_sampling_preserves_the_target_distribution():
    """Whatever the draft distribution q, the first emitted token is distributed as the target p."""
    g = torch.Generator().manual_seed(0)
    V, N = 5, 6000
    logits = torch.tensor([[1.0, 0.5, 0.0, -1.0, 2.0], [0.0, 0.0, 3.0, 0.0, 0.0]])  # (n+1 = 2, V)
    q = torch.tensor([0.05, 0.6, 0.2, 0.1, 0.05])
    params = SamplingParams(temperature=1.0)
    first = torch.zeros(V)
    accepted = 0
    for _ in range(N):
        d = int(torch.multinomial(q, 1, generator=g))
        toks, a = accept_sampled(logits, [d], [q], params, g)
        first[toks[0]] += 1
        accepted += a
    p = logits[0].softmax(-1)
    torch.testing.assert_close(first / N, p, atol=0.025, rtol=0)
    # acceptance = Σ min(p, q)
    assert abs(accepted / N - float(torch.minimum(p, q).sum())) < 0.025


def test_every_emitted_position_follows_its_target_distribution():
    """Two drafts per step: the token emitted at position j (when the step gets that far) is distributed
    as p_j, the target at that position — including the bonus token after both drafts are accepted,
    which must come from the last position's distribution. Catches: the bonus drawn from p_0. Bound:
    conftest.assert_frequencies over the draws that reached each position."""
    from conftest import assert_frequencies

    g = torch.Generator().manual_seed(0)
    V, N = 5, 6_000
    logits = torch.tensor([[1.0, 0.5, 0.0, -1.0, 2.0],  # p_0: mostly token 4
                           [0.0, 2.5, 0.0, 0.0, 0.0],  # p_1: mostly token 1
                           [0.0, 0.0, 0.0, 2.5, 0.5]])  # p_2 (the bonus): mostly token 3
    p = logits.softmax(-1)
    q = [0.7 * p[0] + 0.3 / V, 0.6 * p[1] + 0.4 / V]  # drafts close to the target: most steps accept both
    params = SamplingParams(temperature=1.0)
    counts = torch.zeros(3, V)
    for _ in range(N):
        drafts = [int(torch.multinomial(qj, 1, generator=g)) for qj in q]
        toks, a = accept_sampled(logits, drafts, q, params, g)
        assert len(toks) == a + 1 and toks[:a] == drafts[:a]
        for j, t in enumerate(toks):
            counts[j, t] += 1
    assert counts[2].sum() > N / 2  # the bonus position was reached often enough to test it
    for j in range(3):
        assert_frequencies(counts[j], p[j])


def test_speculative_needs_an_mtp_module():
    m = minke.build(minke.preset("tiny", num_nextn_predict_layers=0), seed=0)
    with pytest.raises(ValueError, match="MTP"):
        Engine(m, speculative=True)

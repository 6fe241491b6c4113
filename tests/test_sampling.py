"""Sampling against the exact distribution, computed here by hand (temperature, then top-k, then top-p
on the renormalized top-k mass, as transformers' and vLLM's processors apply them), and empirical
frequencies of seeded draws against it with a stated bound (conftest.assert_frequencies)."""

import math

import pytest
import torch

from conftest import assert_frequencies
from minke.inference.sampling import SamplingParams, probabilities, sample

LOGITS = [2.0, 1.2, 0.9, 0.1, -0.5, -1.5]


def exact(logits, temperature=1.0, top_k=0, top_p=1.0):
    """The sampling distribution, one token at a time in plain Python."""
    z = [v / temperature for v in logits]
    m = max(z)
    w = [math.exp(v - m) for v in z]
    order = sorted(range(len(z)), key=lambda i: -z[i])
    kept = order[:top_k] if top_k else order
    mass = sum(w[i] for i in kept)
    nucleus, before = [], 0.0
    for i in kept:  # keep tokens while the (renormalized) mass before them is below top_p
        if nucleus and before >= top_p:
            break
        nucleus.append(i)
        before += w[i] / mass
    total = sum(w[i] for i in nucleus)
    return [w[i] / total if i in nucleus else 0.0 for i in range(len(z))]


CASES = [  # (temperature, top_k, top_p): each distinguishes a break named in its comment
    (0.5, 0, 1.0),  # logits * temperature instead of / (0.5 would act as 2)
    (2.0, 0, 1.0),  # the same, the other way
    (1.0, 3, 0.75),  # top-p mass taken before the top-k mask: 3 tokens instead of 2
    (0.7, 4, 0.9),
    (1.3, 0, 0.6),
]


def test_exact_reference_is_what_it_claims():
    """The hand reference itself on a case small enough to check on paper: probabilities 1/2, 3/10,
    1/10, 1/10 with top-k 3 renormalize to 5/9, 3/9, 1/9; top-p 0.85 stops after 5/9 + 3/9 = 0.889."""
    p = exact([math.log(v) for v in (0.5, 0.3, 0.1, 0.1)], top_k=3, top_p=0.85)
    assert p == pytest.approx([5 / 8, 3 / 8, 0, 0])


@pytest.mark.parametrize("temperature,top_k,top_p", CASES)
def test_probabilities_equal_the_exact_distribution(temperature, top_k, top_p):
    sp = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    got = probabilities(torch.tensor([LOGITS]), [sp])[0]
    torch.testing.assert_close(got, torch.tensor(exact(LOGITS, temperature, top_k, top_p)), atol=1e-6, rtol=0)


def test_rows_with_different_params_in_one_batch():
    """Each row's own temperature / top-k / top-p, vectorized in one call."""
    params = [SamplingParams(temperature=t, top_k=k, top_p=p) for t, k, p in CASES]
    got = probabilities(torch.tensor([LOGITS] * len(CASES)), params)
    want = torch.tensor([exact(LOGITS, *c) for c in CASES])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("temperature,top_k,top_p", CASES[:3])
def test_sampled_frequencies_match_the_exact_distribution(temperature, top_k, top_p):
    """40 000 seeded draws through sample(); every bin within ε ≈ 0.015 of the exact probability
    (a correct sampler fails this with probability < 1e-7)."""
    n = 40_000
    sp = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=0)
    g = sp.generator("cpu")
    toks = sample(torch.tensor([LOGITS]).expand(n, -1), [sp] * n, [g] * n)
    counts = torch.bincount(torch.tensor(toks), minlength=len(LOGITS))
    assert_frequencies(counts, exact(LOGITS, temperature, top_k, top_p))


def test_greedy_rows_take_the_argmax_and_draw_nothing():
    g = torch.Generator().manual_seed(0)
    before = g.get_state()
    logits = torch.tensor([LOGITS, LOGITS[::-1]])
    assert sample(logits, [SamplingParams(temperature=0)] * 2, [g, g]) == [0, len(LOGITS) - 1]
    assert torch.equal(g.get_state(), before)


def test_finite_rows():
    """A row can be sampled when it has no nan or +inf and at least one finite logit (-inf masks are
    fine), also when its finite logits are so large that their sum overflows; all-finite batches take a
    one-reduction fast path."""
    from minke.inference.sampling import finite_rows
    inf, nan, big = float("inf"), float("nan"), 3e38
    x = torch.tensor([[0.0, 1.0, 2.0], [-inf, 1.0, -inf], [-inf, -inf, -inf], [nan, 1.0, 2.0],
                      [inf, 1.0, 2.0], [big, big, big]])
    assert finite_rows(x) == [True, True, False, False, False, True]
    assert finite_rows(x[:1]) == [True] and finite_rows(x[5:]) == [True]
    assert finite_rows(torch.randn(4, 7)) == [True] * 4

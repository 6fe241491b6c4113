"""Prompt log-probs (SamplingParams.prompt_logprobs, vLLM's prompt_logprobs) against a plain full forward
of the model, through every prefill path (batched, chunked, a group's shared prefill, preemption and
recompute, speculative decoding); and `/v1/completions` with ``echo`` + ``logprobs`` (legacy OpenAI
format, as lm-evaluation-harness's ``local-completions`` scores prompts), ``max_tokens: 0`` included.

Models are float64, so the engine's paged MHA-mode prefill and the reference forward agree to ~1e-10
and top-N orders have no ties."""

import httpx
import pytest
import torch

import minke
from minke.inference.engine import Engine
from minke.inference.sampling import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = 1024
GREEDY = dict(temperature=0.0, stop_token_ids=[], max_tokens=3)


@pytest.fixture(scope="module")
def model():
    return minke.build(minke.preset("tiny"), seed=3, dtype=torch.float64)


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def full_forward(model, prompt):
    """The reference: log_softmax of one plain forward over the whole prompt, no cache. (P - 1, V): row
    k - 1 scores prompt token k."""
    return model(torch.tensor([prompt])).logits[0, :-1].float().log_softmax(-1)


def check(model, c, prompt, top: int):
    ref = full_forward(model, prompt)
    assert len(c.prompt_logprobs) == len(prompt) and c.prompt_logprobs[0] is None
    want = ref.gather(-1, torch.tensor(prompt[1:])[:, None])[:, 0]
    assert torch.allclose(torch.tensor(c.prompt_logprobs[1:], dtype=torch.float32), want, atol=1e-5, rtol=0)
    if not top:
        assert c.prompt_top_logprobs is None
        return
    assert len(c.prompt_top_logprobs) == len(prompt) and c.prompt_top_logprobs[0] is None
    v, i = ref.topk(top, dim=-1)
    for k, best in enumerate(c.prompt_top_logprobs[1:]):
        assert [t for t, _ in best] == i[k].tolist()
        assert torch.allclose(torch.tensor([x for _, x in best], dtype=torch.float32), v[k], atol=1e-5, rtol=0)


def test_batched_and_chunked_prefill_match_a_full_forward(model):
    """Prompts of 1-70 tokens beside a request without prompt log-probs, prefilled in 16-token chunks
    (a 70-token prompt spans 5 prefill forwards). Fails if a chunk's positions are offset by one or a
    chunk's last position (which scores the next chunk's first token) is dropped."""
    ps = prompts([1, 5, 37, 70, 20])
    tops = [0, 3, 0, 5, None]
    e = Engine(model, max_batch=4, block_size=4, num_blocks=128, max_prefill_tokens=16)
    outs = e.generate(ps, [SamplingParams(**GREEDY, prompt_logprobs=t) for t in tops])
    assert e.stats.prefill_chunks > len(ps)  # really chunked
    for c, p, t in zip(outs, ps, tops):
        if t is None:
            assert c.prompt_logprobs is None and c.prompt_top_logprobs is None
        else:
            check(model, c, p, t)


def test_group_children_each_carry_the_shared_prefill_logprobs(model):
    p = prompts([30], seed=1)[0]
    e = Engine(model, max_batch=4, block_size=4, num_blocks=128, max_prefill_tokens=8)
    outs = e.generate([p], SamplingParams(temperature=1.0, seed=5, max_tokens=3, stop_token_ids=[],
                                          prompt_logprobs=2), n=3)
    assert e.stats.forks == 3 and e.stats.prefill_tokens == 30  # the prompt once
    for c in outs:
        check(model, c, p, 2)


def test_preempted_request_keeps_its_prompt_logprobs(model):
    """A pool too small for every sequence: requests are preempted and recomputed from prompt + output;
    each prompt log-prob is reported once (fails if the recompute appends the prompt's again)."""
    ps = prompts([20, 24, 28, 18, 22, 26], seed=2)
    e = Engine(model, max_batch=6, block_size=4, num_blocks=16)
    outs = e.generate(ps, SamplingParams(temperature=0.0, stop_token_ids=[], max_tokens=12, prompt_logprobs=1))
    assert e.stats.preemptions > 0
    for c, p in zip(outs, ps):
        check(model, c, p, 1)


def test_speculative_prefill(model):
    ps = prompts([9, 25], seed=4)
    e = Engine(model, max_batch=2, block_size=4, num_blocks=64, speculative=True)
    outs = e.generate(ps, SamplingParams(**GREEDY, prompt_logprobs=2))
    for c, p in zip(outs, ps):
        check(model, c, p, 2)


def test_first_event_carries_them_and_bad_values_are_refused(model):
    p = prompts([12], seed=5)[0]
    e = Engine(model, max_batch=1, block_size=4, num_blocks=32)
    evs = list(e.stream(p, SamplingParams(**GREEDY, prompt_logprobs=0)))
    assert len(evs[0].prompt_logprobs) == 12 and evs[0].prompt_top_logprobs is None
    assert all(ev.prompt_logprobs is None for ev in evs[1:])
    for bad in (-1, 21, True, 1.5):
        with pytest.raises(ValueError, match="SamplingParams.prompt_logprobs"):
            e.add_request(p, SamplingParams(prompt_logprobs=bad))

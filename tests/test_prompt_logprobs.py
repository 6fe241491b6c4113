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


# ---- /v1/completions: echo + logprobs ---------------------------------------------------------------
@pytest.fixture(scope="module")
def served():
    import openai

    from chat_model import make
    from minke.serve import server
    from test_server import serving

    tiny, tok = make()
    engine = Engine(tiny, max_batch=8, block_size=4, num_blocks=256, max_prefill_tokens=16, decode_fn=tok.decode)
    with serving(server.create_app(engine, tok, model_name="tiny")) as url:
        yield dict(url=url, model=tiny, tok=tok, engine=engine,
                   client=openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60))


def test_echo_scores_the_prompt_with_max_tokens_zero(served):
    """lm-evaluation-harness's request: token-id prompts, echo, logprobs 1-2, nothing generated. Each
    choice returns its prompt's text and every prompt token's log-prob of one full forward."""
    tok, client = served["tok"], served["client"]
    ps = [tok.encode("12 + 30 = 42"), tok.encode("hi there, what is 7 * 6?")]
    r = client.completions.create(model="tiny", prompt=ps, echo=True, logprobs=2, max_tokens=0, temperature=0)
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == sum(map(len, ps))
    for ch, p in zip(sorted(r.choices, key=lambda c: c.index), ps):
        lp = ch.logprobs
        assert ch.finish_reason == "length" and ch.text == tok.decode(p)
        assert lp.tokens == [tok.decode([i]) for i in p]
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        ref = full_forward(served["model"], p)
        want = ref.gather(-1, torch.tensor(p[1:])[:, None])[:, 0]
        assert torch.allclose(torch.tensor(lp.token_logprobs[1:]), want, atol=1e-5, rtol=0)
        v, i = ref.topk(2, dim=-1)
        for k, top in enumerate(lp.top_logprobs[1:]):
            assert list(top) == [tok.decode([t]) for t in i[k].tolist()]
            assert torch.allclose(torch.tensor(list(top.values())), v[k].float(), atol=1e-5, rtol=0)
        assert lp.text_offset == [len("".join(lp.tokens[:k])) for k in range(len(p))]


def test_echo_with_generation_and_streaming(served):
    """echo before generated text; the generated part equals the request without echo; a stream's
    pieces add up to the whole answer."""
    client, prompt = served["client"], "7 * 6 ="
    kw = dict(model="tiny", prompt=prompt, logprobs=1, max_tokens=4, temperature=0)
    plain = client.completions.create(**kw).choices[0]
    whole = client.completions.create(**kw, echo=True).choices[0]
    P = len(whole.logprobs.tokens) - len(plain.logprobs.tokens)
    assert P == len(served["tok"].encode(prompt, add_bos=served["tok"].bos_id is not None))
    assert whole.text == prompt + plain.text
    assert whole.logprobs.tokens[P:] == plain.logprobs.tokens
    assert whole.logprobs.token_logprobs[P:] == plain.logprobs.token_logprobs
    text, toks, lps, offsets = "", [], [], []
    for chunk in client.completions.create(**kw, echo=True, stream=True):
        for ch in chunk.choices:
            text += ch.text
            if ch.logprobs:
                toks += ch.logprobs.tokens
                lps += ch.logprobs.token_logprobs
                offsets += ch.logprobs.text_offset
    assert (text, toks, lps, offsets) == (whole.text, whole.logprobs.tokens, whole.logprobs.token_logprobs,
                                          whole.logprobs.text_offset)
    zero = list(client.completions.create(**{**kw, "max_tokens": 0}, echo=True, stream=True))
    assert "".join(ch.text for c in zero for ch in c.choices) == prompt


def test_bad_combinations_are_400_and_metrics(served):
    url = served["url"]
    body = dict(model="tiny", prompt="1 + 1", temperature=0)
    for extra, needle in ((dict(max_tokens=0), "max_tokens: 0 generates nothing"),
                          (dict(max_tokens=0, echo=False, logprobs=1), "allowed only with echo"),
                          (dict(echo=True, logprobs=21), "logprobs"),
                          (dict(echo="maybe"), "echo"),
                          (dict(max_tokens=-1, echo=True), "max_tokens")):
        r = httpx.post(url + "/v1/completions", json={**body, **extra})
        assert r.status_code == 400 and needle in r.json()["error"]["message"], (extra, r.text)
    chat = httpx.post(url + "/v1/chat/completions", json=dict(model="tiny", echo=True,
                                                              messages=[{"role": "user", "content": "hi"}]))
    assert chat.status_code == 400 and "echo is not supported" in chat.json()["error"]["message"]
    before = httpx.get(url + "/metrics").json()
    httpx.post(url + "/v1/completions", json={**body, "max_tokens": 2}).raise_for_status()
    after = httpx.get(url + "/metrics").json()
    assert after["prefill_tokens"] > before["prefill_tokens"]
    assert after["generated_tokens"] == before["generated_tokens"] + 2
    assert 0 < after["free_blocks"] <= after["num_blocks"] == served["engine"].cache.num_blocks


def test_prompt_logprobs_skip_prefix_cache_hits(model):
    """A prompt already in the prefix cache is still forwarded whole when its log-probs are asked for
    (a hit would leave its first positions unscored); a plain request after it hits the cache."""
    p = prompts([26], seed=6)[0]
    e = Engine(model, max_batch=2, block_size=4, num_blocks=64)
    e.generate([p], SamplingParams(**GREEDY))
    hits = e.stats.prefix_hit_tokens
    check(model, e.generate([p], SamplingParams(**GREEDY, prompt_logprobs=2))[0], p, 2)
    assert e.stats.prefix_hit_tokens == hits
    e.generate([p], SamplingParams(**GREEDY))
    assert e.stats.prefix_hit_tokens > hits


# ---- benchmarks/serve.py --------------------------------------------------------------------------
def bench():
    """benchmarks/serve.py as a module (registered first: its dataclasses look their module up)."""
    import importlib.util
    import sys
    from pathlib import Path

    if "bench_serve" not in sys.modules:
        path = Path(__file__).resolve().parent.parent / "benchmarks" / "serve.py"
        spec = importlib.util.spec_from_file_location("bench_serve", path)
        sys.modules["bench_serve"] = mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    return sys.modules["bench_serve"]


def test_serve_benchmark_runs_and_reports_prefix_hits(served, tmp_path):
    minke.save(served["model"], tmp_path)
    served["tok"].save(tmp_path)
    report = bench().main(["--base-url", served["url"] + "/v1", "--checkpoint", str(tmp_path), "--concurrency",
                           "1", "3", "--num-prompts", "4", "--input-len", "6", "--output-len", "4",
                           "--shared-prefix-len", "24", "--out", str(tmp_path / "bench.json")])
    for c in ("1", "3"):
        s = report["minke"]["levels"][c]
        assert s["completed"] == 4 and s["failed"] == 0 and s["output_tokens"] >= 4 * 2  # ignore_eos: drawn lengths
        assert s["ttft_ms"]["p50"] > 0 and s["itl_ms"]["p99"] is not None and s["request_throughput"] > 0
        assert s["prefix_cache_hit_rate"] > 0.5  # 24 of ~30 prompt tokens are the shared prefix


def test_serve_benchmark_fails_fast_when_the_server_is_down(tmp_path):
    """Nothing listening, and a socket that accepts but never answers: a clear error within seconds."""
    import socket
    import time

    (tmp_path / "config.json").write_text('{"vocab_size": 100}')
    mod = bench()
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        dead = socket.socket()
        dead.bind(("127.0.0.1", 0))
        dead_port = dead.getsockname()[1]
        dead.close()  # nothing listens there now
        for port in (dead_port, silent.getsockname()[1]):
            t0 = time.monotonic()
            with pytest.raises(SystemExit, match=f"no OpenAI server answers at http://127.0.0.1:{port}/v1"):
                mod.main(["--base-url", f"http://127.0.0.1:{port}/v1", "--checkpoint", str(tmp_path),
                          "--connect-timeout", "1"])
            assert time.monotonic() - t0 < 10

"""Parallel sampling with a shared prefix (prefill once, fork copy-on-write): a group of n samples gives
the tokens of n separate requests seeded seed + j, while the prompt's blocks are held once; preemption,
abort, speculative decoding and the server's n > 1 keep working, and the pool is full at the end."""

from dataclasses import replace

import httpx
import pytest
import torch

import minke
from minke.inference.engine import Engine
from minke.inference.paged import PagedLatentCache
from minke.inference.sampling import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")

SAMPLED = dict(temperature=1.0, top_p=0.9, seed=7, stop_token_ids=[], logprobs=True)
GREEDY = dict(temperature=0.0, stop_token_ids=[], logprobs=True)


@pytest.fixture(scope="module")
def model():
    return minke.build(minke.preset("tiny"), seed=0, dtype=torch.float64)


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 1024, (n,), generator=g).tolist() for n in lengths]


def unshared(model, ps, params, n, **kw):
    """The same samples as n separate requests per prompt, seeded seed + j."""
    e = Engine(model, **kw)
    seeds = lambda p: [replace(p, seed=None if p.seed is None else p.seed + j) for j in range(n)]
    per = params if isinstance(params, list) else [params] * len(ps)
    return e, e.generate([p for p in ps for _ in range(n)], [q for p in per for q in seeds(p)])


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids
        assert x.finish_reason == y.finish_reason
        torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-5, rtol=0)


# ---- the cache ---------------------------------------------------------------------------------
def test_cache_fork_shares_blocks_and_copies_on_write():
    cfg = minke.preset("tiny")
    c = PagedLatentCache(cfg, num_blocks=8, block_size=4, dtype=torch.float64)
    assert c.reserve("p", 6)
    c.begin(["p"], 6)
    for layer in range(c.num_layers):
        c.update(layer, torch.randn(1, 6, cfg.kv_lora_rank, dtype=torch.float64),
                 torch.randn(1, 6, cfg.qk_rope_head_dim, dtype=torch.float64))
    c.advance()
    before = c.c_kv.clone(), c.k_pe.clone()
    c.fork("p", "a")
    c.fork("p", "b")
    assert c.tables["a"] == c.tables["b"] == c.tables["p"] and c.num_free_blocks == 6
    assert c.num_shared_blocks == 2
    with pytest.raises(RuntimeError, match="shares"):  # the partial block is read-only while shared
        c.begin(["a"], 1)
    assert c.reserve("a", 7)  # copies the partial block, the full one stays shared
    ta, tp = c.tables["a"], c.tables["p"]
    assert ta[0] == tp[0] and ta[1] != tp[1] and c.num_free_blocks == 5
    bs = c.block_size
    torch.testing.assert_close(c.c_kv[:, ta[1] * bs:(ta[1] + 1) * bs], c.c_kv[:, tp[1] * bs:(tp[1] + 1) * bs])
    c.begin(["a"], 1)
    for layer in range(c.num_layers):
        c.update(layer, torch.ones(1, 1, cfg.kv_lora_rank, dtype=torch.float64),
                 torch.ones(1, 1, cfg.qk_rope_head_dim, dtype=torch.float64))
    c.advance()
    torch.testing.assert_close((c.c_kv[:, :tp[1] * bs + bs], c.k_pe[:, :tp[1] * bs + bs]),
                               (before[0][:, :tp[1] * bs + bs], before[1][:, :tp[1] * bs + bs]))  # p unchanged
    c.free("p")
    assert c.num_free_blocks == 5  # still held by a and b
    c.free("b")
    assert c.num_free_blocks == 6  # p's partial block went with its last holder
    c.free("a")
    assert c.num_free_blocks == 8 and c.num_shared_blocks == 0


# ---- same samples as unshared ------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sampled", "greedy"])
def test_group_equals_unshared_seeded_samples(model, kind):
    ps = prompts([9, 8, 1, 21])  # partial last block, exactly two blocks, one token, several blocks
    sp = SamplingParams(max_tokens=12, **(SAMPLED if kind == "sampled" else GREEDY))
    n = 4
    e = Engine(model, max_batch=16, block_size=4, num_blocks=160)
    got = e.generate(ps, sp, n=n)
    ref_e, ref = unshared(model, ps, sp, n, max_batch=16, block_size=4, num_blocks=160)
    assert_same(got, ref)
    assert [c.prompt_ids for c in got] == [p for p in ps for _ in range(n)]
    if kind == "sampled":  # the samples of one prompt really differ
        assert len({tuple(c.token_ids) for c in got[:n]}) > 1
    assert e.stats.prefills == len(ps) and e.stats.prefill_tokens == sum(map(len, ps))
    assert ref_e.stats.prefill_tokens == n * sum(map(len, ps))
    assert e.stats.forks == n * len(ps) and e.stats.preemptions == ref_e.stats.preemptions == 0
    assert e.cache.num_free_blocks == 160 and not e.groups and not e.requests


def test_group_larger_than_the_batch_forks_over_steps(model):
    """7 children, 3 rows: the group's prompt stays in the cache until its last child forks."""
    ps = prompts([10], seed=3)
    sp = SamplingParams(max_tokens=5, **SAMPLED)
    e = Engine(model, max_batch=3, block_size=4, num_blocks=64)
    got = e.generate(ps, sp, n=7)
    _, ref = unshared(model, ps, sp, 7, max_batch=3, block_size=4, num_blocks=64)
    assert_same(got, ref)
    assert e.stats.prefills == 1 and e.stats.forks == 7
    assert e.cache.num_free_blocks == 64


def test_per_prompt_params_and_unseeded_children(model):
    ps = prompts([5, 6], seed=4)
    e = Engine(model, max_batch=8, block_size=4, num_blocks=64)
    got = e.generate(ps, [SamplingParams(max_tokens=3, **GREEDY), SamplingParams(max_tokens=20, temperature=1.0,
                                                                                  stop_token_ids=[])], n=3)
    assert [len(c.token_ids) for c in got] == [3] * 3 + [20] * 3
    assert len({tuple(c.token_ids) for c in got[3:]}) > 1  # seed None: each child its own random seed


def test_groups_join_and_leave_a_running_batch(model):
    """Continuous batching: groups and single requests added between steps, rows shared with them."""
    ps = prompts([6, 11, 3, 9], seed=11)
    e = Engine(model, max_batch=6, block_size=4, num_blocks=64, max_prefill_tokens=24)
    plan = {0: [(0, 1, 9)], 1: [(1, 3, 6)], 3: [(2, 1, 8), (3, 4, 5)]}  # step → (prompt, n, max_tokens)
    ids, toks = {}, {}
    step = 0
    while step <= max(plan) or e.has_unfinished():
        for i, n, k in plan.get(step, []):
            got = e.add_request(ps[i], SamplingParams(max_tokens=k, **GREEDY), n=n)
            for rid in (got if n > 1 else [got]):
                ids[rid] = (i, k)
        for ev in e.step():
            if ev.token_id is not None:
                toks.setdefault(ev.request_id, []).append(ev.token_id)
        step += 1
    ref = Engine(model, max_batch=1, block_size=4, num_blocks=64)
    for rid, (i, k) in ids.items():
        assert toks[rid] == ref.generate([ps[i]], SamplingParams(max_tokens=k, **GREEDY))[0].token_ids
    assert len(ids) == 9 and e.stats.prefills == 4 and e.cache.num_free_blocks == 64


@pytest.mark.parametrize("speculative", [False, True])
def test_children_that_finish_on_their_first_token(model, speculative):
    ps = prompts([5, 12], seed=12)
    e = Engine(model, max_batch=4, block_size=4, num_blocks=32, speculative=speculative)
    got = e.generate(ps, SamplingParams(max_tokens=1, **SAMPLED), n=3)
    _, ref = unshared(model, ps, SamplingParams(max_tokens=1, **SAMPLED), 3, max_batch=4, block_size=4,
                      num_blocks=32, speculative=speculative)
    assert_same(got, ref)
    assert all(len(c.token_ids) == 1 for c in got) and e.cache.num_free_blocks == 32 and not e.groups


# ---- the prompt's blocks are held once ---------------------------------------------------------
def test_prompt_blocks_held_once_while_children_run(model):
    P, n, bs = 18, 4, 4  # 4 full blocks + one of 2 tokens
    p = prompts([P], seed=5)[0]
    e = Engine(model, max_batch=8, block_size=bs, num_blocks=64)
    ids = e.add_request(p, SamplingParams(max_tokens=10, **SAMPLED), request_id="g", n=n)
    assert ids == [("g", j) for j in range(n)]
    full = P // bs
    checked = 0
    while e.has_unfinished():
        e.step()
        live = list(e.running)
        if len(live) < n:
            continue
        checked += 1
        tables = [e.cache.tables[r.id] for r in live]
        assert all(t[:full] == tables[0][:full] for t in tables)  # the full prompt blocks: one copy
        assert e.cache.num_shared_blocks == full
        private = sum(len(t) - full for t in tables)
        assert len({b for t in tables for b in t[full:]}) == private  # the rest is each child's own
        # unshared, each child would hold its own copy of the full blocks too: n * full + private
        assert e.cache.num_blocks - e.cache.num_free_blocks == full + private
    assert checked == 8 and e.cache.num_free_blocks == 64


# ---- preemption, abort -------------------------------------------------------------------------
def test_fork_with_preemption(model):
    ps = prompts([10, 7], seed=6)
    sp = SamplingParams(max_tokens=16, **GREEDY)
    # 14 blocks of 4 = 56 slots for 6 children of up to 26 tokens: children get preempted and recomputed
    e = Engine(model, max_batch=6, block_size=4, num_blocks=14)
    got = e.generate(ps, sp, n=3)
    _, ref = unshared(model, ps, sp, 3, max_batch=6, block_size=4, num_blocks=128)
    assert e.stats.preemptions > 0
    assert_same(got, ref)
    assert e.cache.num_free_blocks == 14 and not e.groups


def test_held_prompt_is_dropped_when_it_blocks_everything(model):
    """3 children, 2 rows, 6 blocks of 4: the third child waits while the group holds the prompt's 2
    blocks; child 1 is preempted at 16 tokens and, once child 0 is done, needs 5 blocks with only 4
    free. Nothing else will free a block, so the group drops its prompt (prefilled again later)."""
    p = prompts([8], seed=10)[0]
    sp = SamplingParams(max_tokens=14, **GREEDY)
    e = Engine(model, max_batch=2, block_size=4, num_blocks=6, prefix_cache=False)  # a cached child 1 would run beside child 2
    got = e.generate([p], sp, n=3)
    _, ref = unshared(model, [p], sp, 3, max_batch=2, block_size=4, num_blocks=64)
    assert_same(got, ref)
    assert e.stats.preemptions == 1 and e.stats.prefills == 3  # group, child 1 recomputed, group again
    assert e.cache.num_free_blocks == 6


def test_abort_a_child_and_a_parent(model):
    ps = prompts([9, 6, 12], seed=7)
    sp = SamplingParams(max_tokens=12, **SAMPLED)
    e = Engine(model, max_batch=5, block_size=4, num_blocks=64)
    a = e.add_request(ps[0], sp, request_id="a", n=3)
    b = e.add_request(ps[1], sp, request_id="b", n=3)  # partly forked in the first step (5 rows)
    c = e.add_request(ps[2], sp, request_id="c", n=2)  # waits: never prefilled
    events: dict = {}
    for _ in range(3):
        for ev in e.step():
            events.setdefault(ev.request_id, []).append(ev)
    assert e.groups["b"].held  # b's last child has not forked: the prompt is held for it
    assert e.abort(a[1]) and e.abort("b") and e.abort("c")
    assert not e.abort("b") and not e.abort(a[1])
    while e.has_unfinished():
        for ev in e.step():
            events.setdefault(ev.request_id, []).append(ev)
    for rid in [a[1], *b, *c]:
        assert events[rid][-1].finish_reason == "abort" and rid not in e.requests
    _, ref = unshared(model, ps[:1], sp, 3, max_batch=5, block_size=4, num_blocks=64)
    for j in (0, 2):  # the aborted sibling changes nothing for the others
        assert [ev.token_id for ev in events[a[j]]] == ref[j].token_ids
    assert e.stats.prefills == 2 and not e.groups  # c was never prefilled
    assert e.cache.num_free_blocks == 64


# ---- speculative -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,num_draft", [("sampled", 1), ("greedy", 2)])
def test_speculative_group_equals_speculative_unshared(model, kind, num_draft):
    ps = prompts([9, 8, 3], seed=8)
    sp = SamplingParams(max_tokens=10, **(SAMPLED if kind == "sampled" else GREEDY))
    kw = dict(max_batch=4, block_size=4, num_blocks=64, speculative=True, num_draft=num_draft)
    # each child's first draft comes from its own MTP entry at the prompt's last position
    e, ref_e = Engine(model, **kw), Engine(model, **kw)
    for i, p in enumerate(ps):
        assert e.add_request(p, sp, request_id=i, n=3) == [(i, j) for j in range(3)]
        for j in range(3):
            ref_e.add_request(p, replace(sp, seed=sp.seed and sp.seed + j), request_id=(i, j))
    e.step()
    ref_e.step()
    first, ref_first = ({r.id: r.draft_logits for r in x.running} for x in (e, ref_e))
    assert first.keys() == ref_first.keys() and len(first) == 4
    for rid, d in first.items():
        torch.testing.assert_close(d, ref_first[rid], atol=1e-6, rtol=0)
    while e.has_unfinished():
        e.step()
    e2 = Engine(model, **kw)
    got = e2.generate(ps, sp, n=3)
    _, ref = unshared(model, ps, sp, 3, **kw)
    assert_same(got, ref)
    assert e2.stats.draft_proposed > 0 and e2.stats.prefills == len(ps)
    assert e.cache.num_free_blocks == e2.cache.num_free_blocks == 64


def test_speculative_group_with_preemption(model):
    ps = prompts([10, 7], seed=9)
    sp = SamplingParams(max_tokens=14, **GREEDY)
    e = Engine(model, max_batch=6, block_size=4, num_blocks=16, speculative=True, num_draft=2)
    got = e.generate(ps, sp, n=3)
    _, ref = unshared(model, ps, sp, 3, max_batch=6, block_size=4, num_blocks=128)
    assert e.stats.preemptions > 0
    assert_same(got, ref)
    assert e.cache.num_free_blocks == 16


# ---- bad input ---------------------------------------------------------------------------------
def test_bad_n_and_reused_ids(model):
    e = Engine(model, max_batch=2, block_size=4, num_blocks=16)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="n: "):
            e.generate([[5, 6]], n=bad)
    e.add_request([5, 6], SamplingParams(max_tokens=2), request_id="x", n=2)
    with pytest.raises(ValueError, match="'x' is already in use"):
        e.add_request([5, 6], request_id="x", n=2)
    with pytest.raises(ValueError, match="'x' is already in use"):
        e.add_request([5, 6], request_id="x")
    assert e.abort("x")
    assert [(ev.request_id, ev.finish_reason) for ev in e.step()] == [(("x", 0), "abort"), (("x", 1), "abort")]
    assert not e.has_unfinished()
    assert e.cache.num_free_blocks == 16


# ---- the server --------------------------------------------------------------------------------
from test_server import serving  # noqa: E402  (uvicorn in a thread on a free loopback port)



def test_server_n_goes_through_the_fork():
    from chat_model import make
    from minke.serve import server

    model, tok = make()
    engine = Engine(model, max_batch=16, decode_fn=tok.decode)
    with serving(server.create_app(engine, tok, model_name="m")) as url:
        def post(path, **body):
            r = httpx.post(url + path, json={"model": "m", "temperature": 1.0, "seed": 3, **body}, timeout=60)
            assert r.status_code == 200, r.text
            return r.json()

        def text(choice):
            return choice["text"] if "text" in choice else choice["message"]["content"]

        for path, body in (("/v1/completions", dict(prompt=["2 + 3 =", "hi"], max_tokens=8)),
                           ("/v1/chat/completions", dict(messages=[{"role": "user", "content": "hi"}],
                                                         max_tokens=8))):
            before = engine.stats.prefills, engine.stats.forks
            out = post(path, n=4, **body)
            n_prompts = len(body.get("prompt", [None]))
            assert engine.stats.prefills - before[0] == n_prompts  # each prompt prefilled once
            assert engine.stats.forks - before[1] == 4 * n_prompts
            assert [c["index"] for c in out["choices"]] == list(range(4 * n_prompts))
            # choice j answers as a lone request seeded seed + j would
            for i in range(n_prompts):
                one = {**body, "prompt": body["prompt"][i]} if "prompt" in body else body
                for j in range(4):
                    alone = post(path, n=1, **{**one, "seed": 3 + j})
                    assert text(out["choices"][4 * i + j]) == text(alone["choices"][0])
            assert out["usage"]["completion_tokens"] > 0
    assert not engine.has_unfinished() and engine.cache.num_free_blocks == engine.cache.num_blocks


def test_fork_benchmark_runs(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "fork.py"
    spec = importlib.util.spec_from_file_location("bench_fork", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "fork.json"
    report = mod.main(["--prompts", "2", "--prompt-len", "20", "--n", "3", "--new-tokens", "3", "--repeats", "1",
                       "--block-size", "4", "--out", str(out)])
    assert json.loads(out.read_text()) == report
    assert report["identical"] and report["shared_prefill_tokens"] * 3 == report["unshared_prefill_tokens"] == 120
    assert report["shared_peak_blocks"] < report["unshared_peak_blocks"] and report["shared_tok_s"] > 0

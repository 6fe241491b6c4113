"""Automatic prefix caching (issue 12 item 2): full blocks addressed by the hash of their token prefix are
reused read-only by later requests, kept after their holders finish and evicted least recently released
first. Every engine test compares against an engine with ``prefix_cache=False`` (greedy: the same tokens;
seeded sampling: the same tokens too, the random streams being per request), and checks that the pool is
whole at the end and no block in use was ever free or evictable."""

from collections import Counter

import pytest
import torch

import minke
from minke.inference import speculative as spec
from minke.inference.engine import Engine
from minke.inference.paged import PagedLatentCache, chain_hashes
from minke.inference.sampling import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")

GREEDY = dict(temperature=0.0, stop_token_ids=[], logprobs=True)
SAMPLED = dict(temperature=1.0, top_p=0.9, seed=3, stop_token_ids=[], logprobs=True)


@pytest.fixture(scope="module")
def model():
    return minke.build(minke.preset("tiny"), seed=0, dtype=torch.float64)


def tokens(n, seed):
    return torch.randint(3, 1024, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def audit(cache: PagedLatentCache) -> None:
    """The pool's books balance: each block's reference count is the number of tables holding it; a held
    block is neither free nor evictable; free, evictable and held blocks partition the pool; the hash maps
    are inverse; only published blocks are evictable."""
    held = Counter(b for t in cache.tables.values() for b in t)
    free, lru = set(cache._free), set(cache._evictable)
    assert len(free) == len(cache._free) and not free & lru
    for b in range(cache.num_blocks):
        assert cache._refs[b] == held[b], f"block {b}: refs {cache._refs[b]}, held by {held[b]} tables"
        assert (b in free) + (b in lru) + (held[b] > 0) == 1, f"block {b}: free/evictable/held overlap or gap"
    assert lru <= set(cache._hash_of)
    assert {b: h for h, b in cache._cached.items()} == cache._hash_of


def run(engine, prompts, params, seen=None):
    """Drive ``engine`` step by step until every request is done, auditing the pool after each step;
    returns each prompt's generated tokens. ``seen`` gets (waiting, running) before each step."""
    ids = [engine.add_request(p, params) for p in prompts]
    out = {i: [] for i in ids}
    while engine.has_unfinished():
        if seen is not None:
            seen.append((len(engine.waiting), len(engine.running)))
        for ev in engine.step():
            assert ev.finish_reason != "error", ev.error
            if ev.token_id is not None:
                out[ev.request_id].append(ev.token_id)
        audit(engine.cache)
    return [out[i] for i in ids]


def generate_waves(engine, waves, params, n=1):
    """Each wave of prompts after the previous one finished (so later waves find earlier prefixes cached)."""
    out = []
    for w in waves:
        out += engine.generate(w, params, n=n)
        audit(engine.cache)
    return out


def assert_same(a, b):
    assert [x.token_ids for x in a] == [y.token_ids for y in b]
    assert [x.finish_reason for x in a] == [y.finish_reason for y in b]
    for x, y in zip(a, b):
        torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-6, rtol=0)


# ---- the cache ---------------------------------------------------------------------------------
def test_chain_hashes_address_the_whole_prefix():
    a = chain_hashes(list(range(12)), 4, [], 3)
    b = chain_hashes([99] + list(range(1, 12)), 4, [], 3)
    assert len(set(a)) == 3 and not set(a) & set(b)  # a different first token changes every later block
    assert chain_hashes(list(range(12)), 4, a[:1], 3) == a  # extended incrementally, the same chain
    nxt = chain_hashes(list(range(13)), 4, [], 3, next_token=True)
    assert nxt != a and chain_hashes(list(range(12)) + [7], 4, [], 3, next_token=True)[:2] == nxt[:2]
    with pytest.raises(ValueError, match="block 2 needs 5 tokens"):
        chain_hashes(list(range(12)), 4, [], 3, next_token=True)


def _fill(cache, seq, n, value):
    assert cache.reserve(seq, n)
    cache.begin([seq], n)
    cfg = minke.preset("tiny")
    for layer in range(cache.num_layers):
        cache.update(layer, torch.full((1, n, cfg.kv_lora_rank), float(value), dtype=torch.float64),
                     torch.full((1, n, cfg.qk_rope_head_dim), float(value), dtype=torch.float64))
    cache.advance()


def test_cached_blocks_are_shared_read_only_and_evicted_lru():
    c = PagedLatentCache(minke.preset("tiny"), num_blocks=6, block_size=4, dtype=torch.float64)
    ha, hb = chain_hashes(list(range(8)), 4, [], 2), chain_hashes(list(range(100, 108)), 4, [], 2)
    _fill(c, "a", 8, 1.0)
    assert c.publish("a", ha) == 2 and c.num_cached_blocks == 2
    _fill(c, "b", 8, 2.0)
    assert c.publish("b", hb) == 2
    assert c.tables == {"a": [0, 1], "b": [2, 3]}
    c.free("a")
    c.free("b")
    assert c.num_free_blocks == 6 and sorted(c._free) == [4, 5] and c.num_cached_blocks == 4  # kept, evictable
    hit = c.cached_prefix(ha + [b"\0" * 32])
    assert hit == [0, 1] and c.num_evictable(hit) == 2
    c.adopt("a2", hit)
    assert c.lengths["a2"] == 8 and c.num_free_blocks == 4 and c.cached_prefix(ha) == [0, 1]
    # writing into a cached block copies it first (a truncated sequence rewriting its last block)
    c.truncate("a2", 6)
    with pytest.raises(RuntimeError, match="prefix cache"):
        c.begin(["a2"], 2)
    assert c.reserve("a2", 8) and c.tables["a2"] == [0, 4]
    torch.testing.assert_close(c.c_kv[:, 16:20], c.c_kv[:, 4:8])
    with pytest.raises(ValueError, match="block 4 is not a published"):
        c.adopt("x", [0, 4])
    assert c._refs[0] == 1  # the refused adopt took nothing
    # the pool runs dry: never-used blocks go first, then the least recently released cached block (b's
    # tail before its head: a sequence's blocks are released from its end), never a held one
    assert c.reserve("n", 4) and c.tables["n"] == [5]
    assert c.reserve("m", 4) and c.tables["m"] == [3] and c.cached_prefix(hb) == [2]
    assert c.reserve("m", 12) and c.tables["m"] == [3, 2, 1]
    assert c.cached_prefix(hb) == [] and c.cached_prefix(ha) == [0]  # block 0 is held by a2: kept
    audit(c)
    assert not c.reserve("z", 4) and "z" not in c.tables  # everything is held
    c.reset_prefix_cache()
    assert c.num_cached_blocks == 0 and c.cached_prefix(ha) == []
    for s in list(c.tables):
        c.free(s)
    assert sorted(c._free) == list(range(6))
    audit(c)


# ---- the engine --------------------------------------------------------------------------------
def mixes():
    """Batch mixes: a shared system prompt + different suffixes, repeated identical prompts, prompts that
    share a partial block (block size 4) or exactly two blocks, and one prompt shorter than a block."""
    system = tokens(21, 1)
    shared = [system + tokens(k, 10 + k) for k in (1, 3, 6, 11)]
    same = [tokens(9, 2)] * 3
    partial = [tokens(6, 3) + tokens(k, 20 + k) for k in (2, 5)]  # 6 common tokens: 1.5 blocks
    aligned = [tokens(8, 5) + tokens(k, 30 + k) for k in (3, 4)]  # 8 common tokens, then different ones
    return shared, same, partial + aligned, [tokens(3, 4)]


@pytest.mark.parametrize("speculative", [False, True], ids=["plain", "speculative"])
def test_greedy_output_equals_uncached_across_batch_mixes(model, speculative, monkeypatch):
    """Later waves find earlier prefixes cached. Speculative: greedy output does not depend on the drafts,
    so the drafts themselves are compared: the cached MTP-layer entries must be those a full prefill
    writes (each read the token after its position; fails when a block's key leaves that token out)."""
    drafts = {False: {}, True: {}}  # prefix_cache → request id → every draft's MTP logits (V,), in order
    propose = spec.propose

    def recording(rows, logits):
        propose(rows, logits)
        for r, x in zip(rows, logits):
            drafts[on].setdefault(r.id, []).append(x)

    monkeypatch.setattr(spec, "propose", recording)
    shared, same, partial, short = mixes()
    waves = [shared[:1], shared[1:] + same[:1], same[1:] + partial + short, shared + partial]
    sp = SamplingParams(max_tokens=9, **GREEDY)
    kw = dict(max_batch=3, block_size=4, num_blocks=96, speculative=speculative)
    on = True
    e = Engine(model, **kw)
    got = generate_waves(e, waves, sp)
    on = False
    assert_same(got, generate_waves(Engine(model, prefix_cache=False, **kw), waves, sp))
    assert drafts[True].keys() == drafts[False].keys() and (len(drafts[True]) == 20) == speculative
    for rid, x in drafts[True].items():
        torch.testing.assert_close(torch.stack(x), torch.stack(drafts[False][rid]), atol=1e-6, rtol=0)
    st = e.stats
    assert st.prefix_hit_tokens > 0.4 * st.prefix_queried_tokens
    assert st.prefix_queried_tokens == sum(len(p) for w in waves for p in w)  # no preemption here
    assert e.cache.num_free_blocks == 96 and e.cache.num_cached_blocks > 0


def test_a_hit_skips_the_prefill_of_the_shared_blocks(model):
    """prefill_tokens drops by exactly the cached length: full blocks only, never the last token."""
    system = tokens(22, 5)  # 5 full blocks of 4 and 2 tokens
    sp = SamplingParams(max_tokens=4, **GREEDY)
    e = Engine(model, max_batch=2, block_size=4, num_blocks=64)
    e.generate([system + [7, 8, 9]], sp)
    before = e.stats.prefill_tokens
    e.generate([system + [10, 11]], sp)
    assert e.stats.prefill_tokens - before == len(system) + 2 - 20 and e.stats.prefix_hit_tokens == 20
    e.generate([system[:20]], sp)  # the whole prompt cached: its last block is recomputed for the logits
    assert e.stats.prefill_tokens - before == 4 + 4 and e.stats.prefix_hit_tokens == 20 + 16
    # the generated tokens are cached too (a multi-turn history): prompt + reply + next turn hits them
    first = e.generate([tokens(8, 6)], SamplingParams(max_tokens=9, **GREEDY))[0]
    hits = e.stats.prefix_hit_tokens
    e.generate([first.prompt_ids + first.token_ids + [5]], sp)
    assert e.stats.prefix_hit_tokens - hits == 16  # 8 + 9 tokens computed then: 16 in full blocks
    off = Engine(model, max_batch=2, block_size=4, num_blocks=64, prefix_cache=False)
    off.generate([system + [7, 8, 9]], sp)
    off.generate([system + [10, 11]], sp)
    assert off.stats.prefill_tokens == 2 * len(system) + 5 and off.stats.prefix_queried_tokens == 0


@pytest.mark.parametrize("speculative", [False, True], ids=["plain", "speculative"])
def test_preempted_requests_come_back_through_the_cache(model, speculative):
    """A small pool: long generations preempt each other; every prompt is distinct, so every hit is a
    preempted request's own blocks, found again when it is re-admitted (its recompute is shorter), and
    more than its prompt's 2 full blocks: the blocks it generated were published when it was preempted."""
    ps = [tokens(10, 30 + i) for i in range(3)]
    sp = SamplingParams(max_tokens=24, **GREEDY)
    kw = dict(max_batch=4, block_size=4, num_blocks=16, speculative=speculative)
    e = Engine(model, **kw)
    got = run(e, ps, sp)  # audited every step
    ref_e = Engine(model, prefix_cache=False, **kw)
    assert got == [c.token_ids for c in ref_e.generate(ps, sp)]
    assert e.stats.preemptions > 0 and ref_e.stats.preemptions > 0
    assert e.stats.prefix_hit_tokens > 8 * e.stats.preemptions and e.stats.prefill_tokens < ref_e.stats.prefill_tokens
    assert e.cache.num_free_blocks == 16


@pytest.mark.parametrize("speculative", [False, True], ids=["plain", "speculative"])
def test_groups_fork_from_a_cached_prompt(model, speculative):
    """n > 1: a group's prompt found cached is prefilled past its cached blocks; the children (seeded
    seed + j) sample exactly as without the cache, and a group's blocks serve a later single request."""
    system = tokens(13, 7)
    ps = [system + tokens(3, 8), system + tokens(5, 9)]
    sp = SamplingParams(max_tokens=6, **SAMPLED)
    kw = dict(max_batch=6, block_size=4, num_blocks=80, speculative=speculative)
    waves = [ps[:1], ps, [system + [4, 4]]]
    e = Engine(model, **kw)
    got = [c for w in waves for c in e.generate(w, sp, n=3)]
    ref = [c for w in waves for c in Engine(model, prefix_cache=False, **kw).generate(w, sp, n=3)]
    assert_same(got, ref)
    assert e.stats.forks == 3 * 4 and e.stats.prefix_hit_tokens == 3 * 12  # 3 cached blocks each for 3 groups
    assert e.cache.num_free_blocks == 80 and not e.groups


def test_pool_exhausted_by_cached_and_live_blocks(model):
    """Bad input (issue 12): cached prefixes fill the pool, then more requests than fit arrive. They
    queue for blocks, none fails, cached blocks are evicted oldest first and a block in use never
    (audited every step; the outputs equal the uncached engine's); at the end the pool is whole again."""
    sp = SamplingParams(max_tokens=10, **GREEDY)
    kw = dict(max_batch=16, block_size=4, num_blocks=24)
    warm = [tokens(15, 40 + i) for i in range(6)]  # 6 blocks cached each (24 tokens): more than the pool
    e = Engine(model, **kw)
    history = [p + run(e, [p], sp)[0] for p in warm]  # prompt + output: 25 tokens, 24 cached
    assert e.cache.num_cached_blocks >= 20 and not e.cache.cached_prefix(chain_hashes(history[0], 4, [], 1))
    assert len(e.cache.cached_prefix(chain_hashes(history[-1], 4, [], 6))) == 6  # the oldest went, not the newest
    late = warm[-2:] + [tokens(30, 50 + i) for i in range(5)] + [w + [9, 9] for w in warm[-2:]]
    seen = []
    got = run(e, late, sp, seen)
    assert any(w and r < 16 for w, r in seen)  # requests waited for blocks, not for batch rows
    assert got == [c.token_ids for c in Engine(model, prefix_cache=False, **kw).generate(late, sp)]
    assert e.stats.prefix_hit_tokens > 0 and e.stats.failed_requests == 0
    assert e.cache.num_free_blocks == 24 and not e.cache.tables and not any(e.cache._refs)


def test_weights_changed_in_place_drop_the_cache(model):
    """An optimizer step (or any in-place change of a parameter or buffer) makes cached latents stale:
    the next admission drops them, so the output is that of the new weights (RL rollouts after a
    training step). Fails when the version check is removed (the old prefix would be reused)."""
    m = minke.build(minke.preset("tiny"), seed=0, dtype=torch.float64)  # its own: the test changes it
    p = tokens(26, 60)
    sp = SamplingParams(max_tokens=8, **GREEDY)
    e = Engine(m, max_batch=2, block_size=4, num_blocks=64)
    e.generate([p], sp)
    e.generate([p], sp)
    assert e.stats.prefix_hit_tokens == 24
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    m(torch.tensor([p])).logits.float().logsumexp(-1).mean().backward()
    opt.step()
    got = e.generate([p], sp)
    assert e.stats.prefix_hit_tokens == 24  # no hit: the cache was dropped
    assert_same(got, Engine(m, max_batch=2, block_size=4, num_blocks=64).generate([p], sp))
    e.generate([p], sp)
    assert e.stats.prefix_hit_tokens == 48  # cached again under the new weights
    e.reset_prefix_cache()
    e.generate([p], sp)
    assert e.stats.prefix_hit_tokens == 48 and e.cache.num_free_blocks == 64


def test_prompt_logprobs_prefill_every_prompt_token(model):
    """A request asking for prompt log-probs does not start past cached blocks (it scores every token);
    its prompt's blocks still serve later requests."""
    p = tokens(19, 70)
    sp = SamplingParams(max_tokens=3, **GREEDY)
    e = Engine(model, max_batch=2, block_size=4, num_blocks=64)
    e.generate([p], sp)
    before = e.stats.prefill_tokens
    got = e.generate([p], SamplingParams(max_tokens=3, prompt_logprobs=0, **GREEDY))[0]
    assert e.stats.prefill_tokens - before == len(p) and len(got.prompt_logprobs) == len(p)
    ref = Engine(model, max_batch=2, block_size=4, num_blocks=64, prefix_cache=False).generate(
        [p], SamplingParams(max_tokens=3, prompt_logprobs=0, **GREEDY))[0]
    torch.testing.assert_close(torch.tensor(got.prompt_logprobs[1:]), torch.tensor(ref.prompt_logprobs[1:]))
    hits = e.stats.prefix_hit_tokens
    e.generate([p], sp)
    assert e.stats.prefix_hit_tokens - hits == 16


def test_serve_flag_turns_the_cache_off(monkeypatch):
    """`minke serve --no-prefix-cache` builds its engine with prefix_cache=False (default: on)."""
    from minke.inference import generate
    from minke.serve import server

    seen = []

    class Stop(Exception):
        pass

    def open_model(a, max_batch, **kw):
        seen.append(kw["prefix_cache"])
        raise Stop

    monkeypatch.setattr(generate, "open_model", open_model)
    for args in ([], ["--no-prefix-cache"]):
        with pytest.raises(Stop):
            server.main(["--model", "m", *args])
    assert seen == [True, False]


def test_benchmark_runs(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "prefix_cache.py"
    spec_ = importlib.util.spec_from_file_location("prefix_cache_bench", path)
    bench = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(bench)
    out = tmp_path / "pc.json"
    report = bench.main(["--preset", "tiny", "--set", "max_position_embeddings=256", "--prefix-len", "40",
                         "--suffix-len", "4", "--requests", "3", "--new-tokens", "2", "--repeats", "1",
                         "--out", str(out)])
    assert json.loads(out.read_text()) == report and report["identical"]
    assert report["cache_on"]["prefill_tokens_per_round"] < report["cache_off"]["prefill_tokens_per_round"]
    assert report["cache_on"]["prefix_hit_rate"] > 0 and report["cache_off"]["prefix_hit_rate"] is None

"""Engine vs full recompute: the paged, continuously batched, absorbed-decode engine must give the
tokens (and logprobs) of re-running the whole sequence through the model at every step.

Models are float64 so numerical noise (the model's norms, RoPE and scores still round through fp32,
~1e-7) stays far from argmax ties."""

import threading

import pytest
import torch

import minke
from minke.inference.engine import Engine
from minke.inference.paged import PagedLatentCache
from minke.inference.sampling import SamplingParams, filter_logits

VOCAB = 1024


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return minke.build(minke.preset("tiny"), seed=0, dtype=torch.float64)


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


_REF: dict = {}


@torch.no_grad()
def reference(model, prompt, n):
    """Greedy by full recompute, no cache: (tokens, log_softmax rows (n, V))."""
    key = (id(model), tuple(prompt))
    toks, rows = _REF.get(key, ([], []))
    ids = list(prompt) + toks
    while len(toks) < n:
        logits = model(torch.tensor([ids])).logits[0, -1]
        t = int(logits.argmax())
        toks.append(t)
        rows.append(logits.log_softmax(-1))
        ids.append(t)
    _REF[key] = (toks, rows)
    return toks[:n], torch.stack(rows[:n])


GREEDY = dict(temperature=0.0, stop_token_ids=[])


def check_greedy(model, completions, prompts_, max_tokens):
    for c, p, n in zip(completions, prompts_, max_tokens):
        ref, lp = reference(model, p, n)
        assert c.token_ids == ref, (len(p), c.token_ids, ref)
        assert c.finish_reason == "length"
        if c.logprobs is not None:
            chosen = lp.gather(1, torch.tensor(ref)[:, None])[:, 0]
            torch.testing.assert_close(torch.tensor(c.logprobs, dtype=torch.float64), chosen, atol=1e-5, rtol=0)


# ---- greedy == full recompute ------------------------------------------------------------------
@pytest.mark.parametrize("block_size,max_batch", [(4, 8), (16, 3), (4, 1)])
def test_greedy_matches_full_recompute(model, block_size, max_batch):
    ps = prompts([1, 3, 7, 12, 25, 5, 16, 2])
    n = [12, 5, 16, 9, 3, 14, 7, 10]  # different lengths: requests leave at different steps
    e = Engine(model, max_batch=max_batch, block_size=block_size, num_blocks=128)
    cs = e.generate(ps, [SamplingParams(max_tokens=k, logprobs=True, **GREEDY) for k in n])
    check_greedy(model, cs, ps, n)
    assert e.cache.num_free_blocks == e.cache.num_blocks  # everything handed back


def test_requests_join_and_leave_between_steps(model):
    ps = prompts([4, 9, 2, 13, 6, 1], seed=1)
    n = [10, 4, 12, 6, 8, 5]
    e = Engine(model, max_batch=4, block_size=4, num_blocks=64, max_prefill_tokens=16)  # prefills spread over steps
    ids, done = {}, {}
    schedule = {0: [0, 1], 2: [2], 3: [3, 4], 7: [5]}  # step → prompts added before it
    step = 0
    while step <= max(schedule) or e.has_unfinished():
        for i in schedule.get(step, []):
            ids[e.add_request(ps[i], SamplingParams(max_tokens=n[i], **GREEDY))] = i
        for ev in e.step():
            done.setdefault(ev.request_id, []).append(ev)
        step += 1
    for rid, i in ids.items():
        evs = done[rid]
        assert [ev.token_id for ev in evs] == reference(model, ps[i], n[i])[0]
        assert [ev.finished for ev in evs] == [False] * (n[i] - 1) + [True]


def test_cache_exhaustion_queues_and_preempts(model):
    ps = prompts([6, 11, 3, 14, 8, 5], seed=2)
    n = [20, 15, 25, 10, 18, 22]
    # 12 blocks of 4 = 48 slots for 6 sequences of up to 36 tokens: admission waits, running ones preempt
    e = Engine(model, max_batch=6, block_size=4, num_blocks=12)
    cs = e.generate(ps, [SamplingParams(max_tokens=k, logprobs=True, **GREEDY) for k in n])
    check_greedy(model, cs, ps, n)
    assert e.stats.preemptions > 0
    assert e.cache.num_free_blocks == 12


def test_batched_prefill_pads_without_changing_outputs(model):
    ps = prompts([2, 19, 7, 1, 13], seed=11)
    e = Engine(model, max_batch=5, block_size=4, num_blocks=64)
    cs = e.generate(ps, SamplingParams(max_tokens=6, logprobs=True, **GREEDY))
    assert e.stats.prefills == 5 and e.stats.steps == 5  # one step prefills all five together (+1 decode)
    check_greedy(model, cs, ps, [6] * 5)
    assert e.cache.num_free_blocks == 64  # padding blocks handed back


def test_engine_leaves_the_model_mode_as_found(model):
    model.train()
    try:
        e = Engine(model)
        e.generate(prompts([4]), SamplingParams(max_tokens=3, **GREEDY))
        assert model.training
    finally:
        model.eval()


def test_sequence_outgrowing_the_whole_cache_finishes_with_length(model):
    e = Engine(model, max_batch=1, block_size=4, num_blocks=3)
    (c,) = e.generate(prompts([5]), SamplingParams(max_tokens=50, **GREEDY))
    assert c.finish_reason == "length" and len(c.token_ids) < 50
    assert c.token_ids == reference(model, prompts([5])[0], len(c.token_ids))[0]


def test_gather_path_matches_contiguous_fast_path(model):
    ps = prompts([9])
    outs = []
    for fast in (True, False):
        e = Engine(model, max_batch=1, block_size=4, num_blocks=32)
        if not fast:
            e.cache.reserve("hole", 4)  # fragment the pool: the sequence's blocks are no longer consecutive
            e.cache.reserve("hole2", 4)
            e.cache.free("hole")
            e.cache.begin = _no_fast_path(e.cache)
        outs.append(e.generate(ps, SamplingParams(max_tokens=10, logprobs=True, **GREEDY))[0])
    check_greedy(model, outs, ps * 2, [10, 10])


def _no_fast_path(cache: PagedLatentCache):
    begin = cache.begin

    def wrapped(seq_ids, T):
        begin(seq_ids, T)
        if cache._view.start is not None:  # rebuild the view through the block-table gather
            cache._view.start = None
            table = cache.tables[seq_ids[0]]
            S = cache._view.S
            slots = torch.tensor([b * cache.block_size + o for b in table for o in range(cache.block_size)][:S])
            cache._view.gather = slots
            cache._view.write = slots[cache._view.positions[0]]
    return wrapped


def test_abort_frees_blocks_immediately(model):
    ps = prompts([10, 6, 3], seed=3)
    e = Engine(model, max_batch=3, block_size=4, num_blocks=32)
    ids = [e.add_request(p, SamplingParams(max_tokens=30, **GREEDY)) for p in ps]
    got = {rid: [] for rid in ids}

    def run_step():
        evs = e.step()
        for ev in evs:
            got[ev.request_id].append(ev)
        return evs

    for _ in range(3):
        run_step()
    free = e.cache.num_free_blocks
    held = len(e.cache.tables[ids[1]])
    assert e.abort(ids[1])
    assert e.cache.num_free_blocks == free + held  # at once, not at the next step
    assert not e.abort(ids[1]) and not e.abort("nope")
    run_step()
    assert [(ev.token_id, ev.finish_reason) for ev in got[ids[1]][-1:]] == [(None, "abort")]
    while e.has_unfinished():
        run_step()
    assert e.cache.num_free_blocks == 32
    for rid, p in ((ids[0], ps[0]), (ids[2], ps[2])):
        assert [ev.token_id for ev in got[rid]] == reference(model, p, 30)[0]
    # an aborted waiting request never runs
    e2 = Engine(model, max_batch=1, block_size=4, num_blocks=32)
    a = e2.add_request(ps[0], SamplingParams(max_tokens=3, **GREEDY))
    b = e2.add_request(ps[1], SamplingParams(max_tokens=3, **GREEDY))
    e2.abort(b)
    evs = []
    while e2.has_unfinished():
        evs += e2.step()
    assert [ev.token_id for ev in evs if ev.request_id == a] == reference(model, ps[0], 3)[0]
    assert [ev.finish_reason for ev in evs if ev.request_id == b] == ["abort"]


# ---- sampling ----------------------------------------------------------------------------------
def test_seeded_sampling_reproducible_and_independent_of_batch_mates(model):
    p = prompts([7], seed=4)[0]
    sp = SamplingParams(max_tokens=15, temperature=0.9, top_p=0.9, top_k=50, seed=1234, stop_token_ids=[])
    alone = Engine(model, max_batch=1).generate([p], sp)[0].token_ids
    mates = prompts([3, 12, 5], seed=5)
    e = Engine(model, max_batch=4, block_size=4, num_blocks=10)  # small: preemption too
    cs = e.generate(mates[:2] + [p] + mates[2:],
                    [SamplingParams(max_tokens=20, temperature=1.0, seed=s, stop_token_ids=[]) for s in (1, 2)]
                    + [sp] + [SamplingParams(max_tokens=9, temperature=0.7, stop_token_ids=[])])
    assert cs[2].token_ids == alone
    again = Engine(model, max_batch=2).generate([p, mates[0]], [sp, SamplingParams(**GREEDY)])[0].token_ids
    assert again == alone
    other = Engine(model).generate([p], SamplingParams(**{**sp.__dict__, "seed": 99}))[0].token_ids
    assert other != alone


def test_filter_logits_top_k_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]] * 3))
    out = filter_logits(logits, torch.tensor([1.0, 1.0, 1.0]), torch.tensor([2, 0, 0]), torch.tensor([1.0, 0.8, 0.5]))
    kept = torch.isfinite(out)
    assert kept.tolist() == [[True, True, False, False, False],  # top-2
                             [True, True, True, False, False],  # 0.5 + 0.2 < 0.8: the third is needed
                             [True, False, False, False, False]]  # the first alone holds 0.5
    torch.testing.assert_close(out.softmax(-1)[0, :2], torch.tensor([5 / 7, 2 / 7]))


def test_stop_token_ids(model):
    p = prompts([8], seed=6)[0]
    ref = reference(model, p, 20)[0]
    stop = ref[6]
    first = ref.index(stop)
    e = Engine(model)
    (c,) = e.generate([p], SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[stop]))
    assert c.token_ids == ref[:first + 1]  # the stop token is the last id
    assert (c.finish_reason, c.stop_reason) == ("stop", stop)
    # default: the model's eos
    m_eos = Engine(model)
    m_eos.eos_ids = [stop]
    assert m_eos.generate([p], SamplingParams(max_tokens=20, temperature=0))[0].token_ids == ref[:first + 1]


def test_stop_strings(model):
    def decode(ids):  # a stand-in tokenizer: one letter per id
        return "".join(chr(97 + i % 26) for i in ids)

    p = prompts([5], seed=7)[0]
    ref = reference(model, p, 24)[0]
    text = decode(ref)
    stop = text[8:11]
    end = text.find(stop) + len(stop)  # the token that completes the first occurrence ends it
    e = Engine(model, decode_fn=decode)
    (c,) = e.generate([p], SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[], stop=["@@@", stop]))
    assert c.token_ids == ref[:end]
    assert (c.finish_reason, c.stop_reason) == ("stop", stop)
    with pytest.raises(ValueError, match="decode_fn"):
        Engine(model).add_request(p, SamplingParams(stop=["x"]))


def test_logprobs_and_top_logprobs(model):
    ps = prompts([4, 10], seed=8)
    e = Engine(model, max_batch=2, block_size=4)
    cs = e.generate(ps, SamplingParams(max_tokens=6, logprobs=True, top_logprobs=3, **GREEDY))
    check_greedy(model, cs, ps, [6, 6])
    for c, p in zip(cs, ps):
        _, lp = reference(model, p, 6)
        v, i = lp.topk(3, dim=-1)
        for t, top in enumerate(c.top_logprobs):
            assert [tid for tid, _ in top] == i[t].tolist()
            torch.testing.assert_close(torch.tensor([x for _, x in top], dtype=torch.float64), v[t], atol=1e-5, rtol=0)
    # sampled tokens: the logprob of the token actually drawn, under the raw distribution
    (c,) = Engine(model).generate([ps[0]], SamplingParams(max_tokens=5, temperature=1.5, seed=0, logprobs=True,
                                                          stop_token_ids=[]))
    ids = ps[0] + c.token_ids
    with torch.no_grad():
        lp = model(torch.tensor([ids])).logits[0, len(ps[0]) - 1:-1].log_softmax(-1)
    chosen = lp.gather(1, torch.tensor(c.token_ids)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(c.logprobs, dtype=torch.float64), chosen, atol=1e-5, rtol=0)


def test_stream_yields_one_request(model):
    p = prompts([6], seed=9)[0]
    e = Engine(model)
    other = e.add_request(prompts([3])[0], SamplingParams(max_tokens=40, **GREEDY))
    evs = list(e.stream(p, SamplingParams(max_tokens=7, **GREEDY)))
    assert [ev.token_id for ev in evs] == reference(model, p, 7)[0]
    assert evs[-1].finished and evs[-1].finish_reason == "length"
    assert other in e.requests  # the other request keeps running
    # closing a stream early aborts its request and frees its blocks
    e2 = Engine(model, num_blocks=16, block_size=4)
    it = e2.stream(p, SamplingParams(max_tokens=40, **GREEDY))
    next(it)
    it.close()
    assert e2.cache.num_free_blocks == 16 and not e2.requests


def test_thread_safe_add_and_abort_while_stepping(model):
    """Clients add requests from their own threads while a driver thread steps; one long request is
    aborted after its first token. Every wait is bounded (a hang fails with what was still pending),
    and the aborted request must end with "abort" — it cannot reach its 100 tokens first."""
    ps = prompts([3, 8, 5, 11, 2, 6], seed=10)
    e = Engine(model, max_batch=4, block_size=4, num_blocks=64)
    events: dict = {}
    seen = threading.Condition()
    stop, errors = threading.Event(), []
    WAIT = 60.0  # seconds; the whole test takes well under one on an idle core

    def driver():
        try:
            while not stop.is_set():
                evs = e.step()
                with seen:
                    for ev in evs:
                        events.setdefault(ev.request_id, []).append(ev)
                    seen.notify_all()
                if not evs:
                    stop.wait(0.001)
        except BaseException as exc:  # surfaced by the main thread, which would otherwise wait in vain
            errors.append(exc)
            with seen:
                seen.notify_all()

    def wait_for(what, cond):
        with seen:
            ok = seen.wait_for(lambda: errors or cond(), timeout=WAIT)
        assert not errors, f"the driver thread raised {errors[0]!r}"
        assert ok, f"waited {WAIT:.0f} s for {what}; events so far: " + str(
            {rid: [(ev.token_id, ev.finish_reason) for ev in evs] for rid, evs in events.items()})

    th = threading.Thread(target=driver, daemon=True)
    th.start()
    ids = [None] * len(ps)

    def client(i):
        ids[i] = e.add_request(ps[i], SamplingParams(max_tokens=100 if i == 0 else 8, **GREEDY))

    try:
        clients = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(len(ps))]
        for c in clients:
            c.start()
        for c in clients:
            c.join(WAIT)
            assert not c.is_alive(), f"add_request blocked for {WAIT:.0f} s"
        wait_for("the long request's first token", lambda: events.get(ids[0]))
        assert e.abort(ids[0]), "the long request had already finished"
        wait_for("every request to finish",
                 lambda: all(events.get(rid) and events[rid][-1].finished for rid in ids))
    finally:
        stop.set()
        th.join(WAIT)
    assert not th.is_alive(), f"the driver thread did not stop within {WAIT:.0f} s"
    aborted = events[ids[0]]
    assert aborted[-1].finish_reason == "abort" and aborted[-1].token_id is None, aborted[-1]
    assert 1 <= sum(ev.token_id is not None for ev in aborted) < 100
    for i in range(1, len(ps)):
        assert [ev.token_id for ev in events[ids[i]]] == reference(model, ps[i], 8)[0], i
        assert events[ids[i]][-1].finish_reason == "length"
    assert e.cache.num_free_blocks == e.cache.num_blocks


# ---- validation --------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value", [
    ("max_tokens", 0), ("max_tokens", 1.5), ("temperature", -0.1), ("temperature", float("nan")),
    ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1), ("seed", -3), ("stop_token_ids", [VOCAB]),
    ("stop", [""]), ("top_logprobs", 3), ("logprobs", 1),
])
def test_bad_params_raise_naming_the_field(model, field, value):
    with pytest.raises(ValueError, match=field):
        Engine(model, decode_fn=str).add_request([1, 2, 3], SamplingParams(**{field: value}))


def test_bad_prompts_and_engine_args(model):
    e = Engine(model, block_size=4, num_blocks=4)
    with pytest.raises(ValueError, match="empty"):
        e.add_request([])
    with pytest.raises(ValueError, match=str(VOCAB)):
        e.add_request([5, VOCAB])
    with pytest.raises(ValueError, match=r"1024 tokens.*1024"):  # the context: max_position_embeddings
        Engine(model).add_request([5] * 1024)
    with pytest.raises(ValueError, match=r"20 tokens.*16 tokens"):  # the whole cache: 4 blocks of 4
        e.add_request([5] * 20)
    with pytest.raises(ValueError, match="max_batch"):
        Engine(model, max_batch=0)
    with pytest.raises(ValueError, match="cache_bytes"):
        Engine(model, cache_bytes=10)
    with pytest.raises(ValueError, match="request_id"):
        e.add_request([1], request_id="a")
        e.add_request([1], request_id="a")
    assert [r.id for r in e.waiting] == ["a"]


def test_generate_cli(tmp_path, capsys):
    from minke.data.tokenizer import train_tokenizer
    from minke.inference.generate import main

    tok = train_tokenizer([f"the quick brown fox {i} jumps over the lazy dog" for i in range(50)], 300, tmp_path)
    minke.save(minke.build(minke.preset("tiny", vocab_size=tok.vocab_size), seed=0), tmp_path)
    args = ["--model", str(tmp_path), "--prompt", "the quick", "--max-tokens", "6", "--temperature", "0"]
    assert main(args) == 0
    greedy = capsys.readouterr()
    assert "6 tokens" in greedy.err or "finish_reason=stop" in greedy.err
    assert main(args + ["--speculative"]) == 0
    assert capsys.readouterr().out == greedy.out  # MTP speculation: the same greedy text
    assert main(["--model", str(tmp_path), "--prompt", "hi", "--chat", "--max-tokens", "4", "--seed", "1"]) == 0

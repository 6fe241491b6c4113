"""No request can hurt another (issue 11, items 1–3, 6 and 10's paged part), at the engine: a forward
that raises fails only the rows that make it raise; a tiny temperature is greedy and a row with
non-finite logits fails alone; vLLM's min_tokens / ignore_eos / repetition_penalty; the paged cache
allocates MTP layers only for speculative decoding; limits, fair admission and chunked prefill.

Each test names in its docstring the break it fails on (checked on the code before the fix)."""

import pytest
import torch

import minke
from minke.inference import sampling
from minke.inference.engine import Engine
from minke.inference.paged import PagedLatentCache, bytes_per_token
from minke.inference.sampling import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")
GREEDY = dict(temperature=0.0, stop_token_ids=[])


@pytest.fixture(scope="module")
def model():
    return minke.build(minke.preset("tiny"), seed=0, dtype=torch.float64)


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 1024, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def greedy_ref(model, prompt, n, process=None):
    """Greedy by full recompute; ``process(logits (V,), out so far) -> logits`` applied before the argmax."""
    ids, out = list(prompt), []
    for _ in range(n):
        logits = model(torch.tensor([ids])).logits[0, -1]
        if process is not None:
            logits = process(logits.clone(), out)
        out.append(int(logits.argmax()))
        ids.append(out[-1])
    return out


def poison(engine, monkeypatch, bad, after_forwards=0):
    """Make the model's forward raise whenever a row of request ``bad`` is in the batch (the test hook
    for a request that breaks the engine), from the ``after_forwards``-th forward on."""
    real = engine.model.forward
    count = [0]

    def forward(*a, **kw):
        count[0] += 1
        view = engine.cache._view
        if count[0] > after_forwards and view is not None and bad in view.seq_ids:
            raise RuntimeError("injected fault")
        return real(*a, **kw)

    monkeypatch.setattr(engine.model, "forward", forward)


def run(engine, ids, steps=500):
    """Step until the requests ``ids`` finish; their final events by id."""
    final = {}
    for _ in range(steps):
        for e in engine.step():
            if e.finished:
                final[e.request_id] = e
        if all(i in final for i in ids):
            return final
    raise AssertionError(f"requests {[i for i in ids if i not in final]} did not finish in {steps} steps")


# ---- item 1: a failing forward fails only its request ------------------------------------------------
@pytest.mark.parametrize("when", ["prefill", "decode"])
def test_failed_forward_fails_only_the_culprit(model, monkeypatch, when):
    """Fails on the code before the fix: the exception left step() (every request lost)."""
    ps = prompts([5, 9, 7, 6])
    e = Engine(model, max_batch=4, block_size=4)
    poison(e, monkeypatch, "bad", after_forwards=0 if when == "prefill" else 3)
    ids = ["a", "bad", "b", "c"]
    for i, p in zip(ids, ps):
        e.add_request(p, SamplingParams(max_tokens=6, **GREEDY), request_id=i)
    final = run(e, ids)
    assert final["bad"].finish_reason == "error" and "injected fault" in final["bad"].error
    assert e.stats.failed_requests == 1 and e.stats.failed_forwards >= 1
    assert all(final[i].finish_reason == "length" for i in ids if i != "bad")
    # the survivors' tokens are a lone greedy run's; then the engine serves new requests
    e2 = Engine(model, max_batch=4, block_size=4)
    want = e2.generate([p for i, p in zip(ids, ps) if i != "bad"], SamplingParams(max_tokens=6, **GREEDY))
    monkeypatch.undo()
    got = e.generate([p for i, p in zip(ids, ps) if i != "bad"], SamplingParams(max_tokens=6, **GREEDY))
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert e.cache.num_free_blocks == e.cache.num_blocks and not e.has_unfinished()


def test_failed_decode_keeps_the_others_tokens(model, monkeypatch):
    """The survivors of a failed decode step produce exactly their lone greedy tokens (fails if the
    failed step's cache writes were committed, or if the failure was retried as a whole)."""
    ps = prompts([4, 8, 6])
    e = Engine(model, max_batch=3, block_size=4)
    poison(e, monkeypatch, "bad", after_forwards=2)
    streams = {i: [] for i in ("a", "bad", "b")}
    for i, p in zip(streams, ps):
        e.add_request(p, SamplingParams(max_tokens=8, **GREEDY), request_id=i)
    while e.has_unfinished():
        for ev in e.step():
            if ev.token_id is not None:
                streams[ev.request_id].append(ev.token_id)
    assert streams["a"] == greedy_ref(model, ps[0], 8) and streams["b"] == greedy_ref(model, ps[2], 8)
    assert len(streams["bad"]) < 8


def test_step_failure_outside_a_forward_fails_the_batch_not_the_engine(model, monkeypatch):
    """A fault the engine cannot attribute fails the in-flight requests only: waiting ones run later
    and the engine keeps serving (fails before the fix: step() raised)."""
    e = Engine(model, max_batch=2, block_size=4)
    ps = prompts([5, 6, 7])
    for i, p in zip("xyz", ps):
        e.add_request(p, SamplingParams(max_tokens=4, **GREEDY), request_id=i)
    e.step()  # x, y run; z waits
    real = e._make_room
    monkeypatch.setattr(e, "_make_room", lambda events: (_ for _ in ()).throw(RuntimeError("bookkeeping bug")))
    events = e.step()
    monkeypatch.setattr(e, "_make_room", real)
    failed = {ev.request_id for ev in events if ev.finished and ev.finish_reason == "error"}
    assert failed == {"x", "y"}
    final = run(e, ["z"])
    assert final["z"].finish_reason == "length"
    assert e.cache.num_free_blocks == e.cache.num_blocks


def test_generate_raises_naming_the_failed_request(model, monkeypatch):
    e = Engine(model, max_batch=2)
    monkeypatch.setattr(e.model, "forward", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="2 of 2 requests failed.*boom"):
        e.generate(prompts([3, 4]), SamplingParams(max_tokens=2, **GREEDY))
    assert e.cache.num_free_blocks == e.cache.num_blocks


# ---- item 2: tiny temperatures, non-finite rows -------------------------------------------------------
def test_tiny_temperature_beside_a_greedy_stream(model):
    """temperature=1e-40 next to a greedy request: both answered, the tiny one exactly greedy (fails
    before the fix: logits / 1e-40 overflowed and multinomial raised inside the shared step)."""
    p = prompts([6])[0]
    e = Engine(model, max_batch=2)
    out = e.generate([p, p], [SamplingParams(max_tokens=6, **GREEDY),
                              SamplingParams(max_tokens=6, temperature=1e-40, seed=0, stop_token_ids=[])])
    assert out[0].token_ids == out[1].token_ids == greedy_ref(model, p, 6)
    assert SamplingParams(temperature=sampling.GREEDY_TEMPERATURE / 2).greedy
    assert not SamplingParams(temperature=sampling.GREEDY_TEMPERATURE).greedy


def test_sampling_is_safe_per_row():
    """A row with huge logits at the smallest sampling temperature samples its argmax; a nan row and
    an all -inf row get None while the others are sampled (fails before the fix: nan probabilities /
    multinomial raising for the whole batch)."""
    V = 8
    logits = torch.zeros(4, V)
    logits[0, 3] = 3e38  # (x - max) / T stays finite at the max
    logits[0, 5] = -3e38
    logits[1, 2] = float("nan")
    logits[2] = float("-inf")
    logits[3, 6] = 50.0
    params = [SamplingParams(temperature=sampling.GREEDY_TEMPERATURE, seed=1)] * 2 + [SamplingParams(seed=2)] * 2
    gens = [p.generator("cpu") for p in params]
    assert sampling.sample(logits, params, gens) == [3, None, None, 6]
    greedy = [SamplingParams(temperature=0)] * 4
    assert sampling.sample(logits, greedy, [None] * 4) == [3, None, None, 6]
    probs = sampling.probabilities(logits[[0, 3]], params[:2])
    assert torch.isfinite(probs).all() and float(probs[0, 3]) == 1.0


def test_nan_logits_fail_that_request_alone(model, monkeypatch):
    """A request whose logits turn nan fails; its batch mate finishes with its lone greedy tokens."""
    ps = prompts([5, 7])
    e = Engine(model, max_batch=2)
    real = e.model.forward

    def forward(*a, **kw):
        out = real(*a, **kw)
        rows = e.cache._view.seq_ids if e.cache._view is not None else []
        if "nan" in rows and out.logits is not None:
            out.logits[rows.index("nan")] = float("nan")
        return out

    monkeypatch.setattr(e.model, "forward", forward)
    e.add_request(ps[0], SamplingParams(max_tokens=5, **GREEDY), request_id="ok")
    e.add_request(ps[1], SamplingParams(max_tokens=5, temperature=0.7, seed=0, stop_token_ids=[]), request_id="nan")
    toks = []
    final = {}
    while e.has_unfinished():
        for ev in e.step():
            if ev.request_id == "ok" and ev.token_id is not None:
                toks.append(ev.token_id)
            if ev.finished:
                final[ev.request_id] = ev
    assert final["nan"].finish_reason == "error" and "not finite" in final["nan"].error
    assert final["ok"].finish_reason == "length" and toks == greedy_ref(model, ps[0], 5)


# ---- item 6: min_tokens, ignore_eos, stop_token_ids, repetition_penalty ---------------------------------
def test_min_tokens_masks_stop_tokens(model):
    """vLLM's min_tokens: the stop ids are masked for the first min_tokens tokens, then stop as usual
    (fails before the fix: the field did not exist / was ignored and the request stopped at 3)."""
    p = prompts([6])[0]
    ref = greedy_ref(model, p, 12)
    t = ref[2]
    e = Engine(model)
    plain = e.generate([p], SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[t]))[0]
    assert plain.token_ids == ref[:3] and plain.finish_reason == "stop"

    def mask(logits, out):
        if len(out) < 5:
            logits[t] = float("-inf")
        return logits

    want = greedy_ref(model, p, 12, mask)
    got = e.generate([p], SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[t], min_tokens=5))[0]
    cut = next((k + 1 for k, x in enumerate(want) if x == t and k >= 4), 12)
    assert got.token_ids == want[:cut] and t not in got.token_ids[:5]


def test_ignore_eos(model):
    p = prompts([6])[0]
    ref = greedy_ref(model, p, 8)
    e = Engine(model)
    e.eos_ids = [ref[2]]  # the model's eos, for this test: its third greedy token
    assert e.generate([p], SamplingParams(max_tokens=8, temperature=0))[0].token_ids == ref[:3]
    out = e.generate([p], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    assert out.token_ids == ref and out.finish_reason == "length"
    out = e.generate([p], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, stop_token_ids=[ref[4]]))[0]
    assert out.token_ids == ref[:5] and out.stop_reason == ref[4]  # explicit stop ids still stop


def test_repetition_penalty_vllm_semantics(model):
    """Against a hand-written reference: every token seen in the prompt or output has its positive
    logit divided and its negative logit multiplied by the penalty (fails with the sign rule swapped)."""
    p = prompts([10])[0]

    def penalize(logits, out):
        seen = torch.tensor(sorted(set(p + out)))
        v = logits[seen]
        logits[seen] = torch.where(v > 0, v / 1.8, v * 1.8)
        return logits

    want = greedy_ref(model, p, 10, penalize)
    assert want != greedy_ref(model, p, 10)  # the penalty changes this output
    e = Engine(model, max_batch=2)
    out = e.generate([p, p], [SamplingParams(max_tokens=10, repetition_penalty=1.8, **GREEDY),
                              SamplingParams(max_tokens=10, **GREEDY)])
    assert out[0].token_ids == want and out[1].token_ids == greedy_ref(model, p, 10)


@pytest.mark.parametrize("field,value", [("min_tokens", -1), ("min_tokens", 300), ("repetition_penalty", 0.0),
                                         ("repetition_penalty", float("nan")), ("ignore_eos", 1)])
def test_bad_new_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
        SamplingParams(**{field: value}).validate()


def test_processors_refused_with_speculative(model):
    e = Engine(model, speculative=True)
    with pytest.raises(ValueError, match="speculative"):
        e.add_request([3, 4], SamplingParams(min_tokens=2))


# ---- item 10: MTP layers in the paged cache only when drafting ---------------------------------------
def test_paged_cache_allocates_mtp_layers_only_for_speculative(model):
    """Fails before the fix: every cache held the MTP layers (num_layers 3 for a 2+1 model)."""
    cfg = model.config
    assert PagedLatentCache(cfg, 4, 4).num_layers == cfg.num_hidden_layers
    assert PagedLatentCache(cfg, 4, 4, mtp=True).num_layers == cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    per = {m: bytes_per_token(cfg, torch.float32, mtp=m) for m in (False, True)}
    L, N = cfg.num_hidden_layers, cfg.num_nextn_predict_layers
    assert per[True] * L == per[False] * (L + N)
    plain, spec = Engine(model, num_blocks=8), Engine(model, num_blocks=8, speculative=True)
    assert plain.cache.num_layers == L and spec.cache.num_layers == L + N
    assert plain.cache.nbytes * (L + N) == spec.cache.nbytes * L
    budget = bytes_per_token(cfg, torch.float64, mtp=True) * 64  # the model's dtype is the cache's
    assert Engine(model, cache_bytes=budget, speculative=True).cache.num_slots == 64
    more = 64 * (L + N) // L // 16 * 16  # more tokens (whole blocks of 16) without the MTP layers
    assert Engine(model, cache_bytes=budget).cache.num_slots == more > 64


# ---- item 3: chunked prefill, fair admission -----------------------------------------------------------
def prefill_sizes(engine, monkeypatch):
    """Record, per engine step, the padded tokens (B·T) of its prefill forward (T > 1) and the rows decoded."""
    real, log = engine.model.forward, []

    def forward(ids, *a, **kw):
        if ids.shape[1] > 1:
            log[-1]["prefill"] += ids.numel()
        else:
            log[-1]["decoded"] = ids.shape[0]
        return real(ids, *a, **kw)

    real_step = engine.step

    def step():
        log.append({"prefill": 0, "decoded": 0})
        return real_step()

    monkeypatch.setattr(engine.model, "forward", forward)
    monkeypatch.setattr(engine, "step", step)
    return log


@pytest.mark.parametrize("block_size", [4, 16])
def test_chunked_prefill_equals_full_recompute(model, block_size):
    """Prompts longer than max_prefill_tokens are prefilled in chunks over the cached prefix (MHA mode
    with history) and give the full recompute's greedy tokens; groups too (fails with each chunk
    attending only to itself, or with the chunk's positions restarting at 0)."""
    ps = prompts([50, 7, 33])
    e = Engine(model, max_batch=4, block_size=block_size, max_prefill_tokens=16)
    out = e.generate(ps, SamplingParams(max_tokens=6, **GREEDY))
    assert [c.token_ids for c in out] == [greedy_ref(model, p, 6) for p in ps]
    assert e.stats.prefill_chunks > e.stats.prefills == 3 and e.stats.max_prefill_batch_tokens <= 16
    sampled = SamplingParams(max_tokens=5, temperature=1.0, seed=3, stop_token_ids=[])
    whole = Engine(model, max_batch=4, block_size=block_size).generate(ps[:1], sampled, n=3)
    chunked = Engine(model, max_batch=4, block_size=block_size, max_prefill_tokens=16).generate(ps[:1], sampled, n=3)
    assert [c.token_ids for c in chunked] == [c.token_ids for c in whole]
    assert e.cache.num_free_blocks == e.cache.num_blocks


def test_long_prompt_does_not_stall_running_streams(model, monkeypatch):
    """A 120-token prompt arriving while 3 streams decode: no step's prefill exceeds max_prefill_tokens
    and every stream gets a token in every step (fails before the fix: one 120-token prefill forward)."""
    e = Engine(model, max_batch=4, block_size=4, max_prefill_tokens=16)
    log = prefill_sizes(e, monkeypatch)
    ps = prompts([5, 6, 7, 120])
    streams = [e.add_request(p, SamplingParams(max_tokens=20, **GREEDY)) for p in ps[:3]]
    first = e.step()  # the streams' first two tokens
    long = e.add_request(ps[3], SamplingParams(max_tokens=3, **GREEDY))
    tokens = {r: [ev.token_id for ev in first if ev.request_id == r] for r in streams + [long]}
    while e.has_unfinished():
        for ev in e.step():
            if ev.token_id is not None:
                tokens[ev.request_id].append(ev.token_id)
    assert max(s["prefill"] for s in log) <= 16
    chunked = [s for s in log[1:] if s["prefill"]]
    assert len(chunked) >= 120 // 16 and all(s["decoded"] >= 3 for s in chunked[:-1])  # streams never paused
    assert [tokens[r] for r in streams] == [greedy_ref(model, p, 20) for p in ps[:3]]
    assert tokens[long] == greedy_ref(model, ps[3], 3)


def test_chunked_prefill_gives_way_to_running_streams(model):
    """When the pool runs dry a prompt part-way through its chunked prefill is preempted (and redone
    later) before any running stream; every output stays the full recompute's."""
    ps = prompts([6, 7, 40])
    e = Engine(model, max_batch=3, block_size=4, num_blocks=16, max_prefill_tokens=8)
    dropped, make_room = [], e._make_room

    def watch(events):
        before = len(e.prefilling)
        rows = make_room(events)
        dropped.append(before - len(e.prefilling))
        return rows

    e._make_room = watch
    out = e.generate(ps, SamplingParams(max_tokens=12, **GREEDY))
    assert [c.token_ids for c in out] == [greedy_ref(model, p, 12) for p in ps]
    assert any(dropped) and e.stats.preemptions == sum(dropped)  # only the part-prefilled prompt gave way
    assert e.cache.num_free_blocks == e.cache.num_blocks


def test_small_request_beside_a_6400_sequence_request(model):
    """50 prompts x n=128 from one tenant, then one small request: the small one is admitted at the
    next free row and finishes within a few steps, while the big one is still running (fails before the
    fix: first come first served, it waited for all 6,400 sequences, ~1,600 steps here)."""
    e = Engine(model, max_batch=8, block_size=4, num_blocks=64)
    ps = prompts([4] * 50 + [5], seed=1)
    big = SamplingParams(max_tokens=2, temperature=1.0, seed=0, stop_token_ids=[])
    for i, p in enumerate(ps[:50]):
        e.add_request(p, big, request_id=f"big{i}", n=128, tenant="big")
    e.step()
    e.add_request(ps[50], SamplingParams(max_tokens=3, **GREEDY), request_id="small", tenant="small")
    small = []
    for steps in range(1, 12):
        for ev in e.step():
            if ev.request_id == "small" and ev.token_id is not None:
                small.append(ev.token_id)
        if "small" not in e.requests:
            break
    assert "small" not in e.requests and steps <= 6, f"the small request still waits after {steps} steps"
    assert small == greedy_ref(model, ps[50], 3)
    assert len(e.waiting) > 6000  # the big request is far from done
    for i in range(50):
        e.abort(f"big{i}")
    e.step()
    assert not e.has_unfinished() and e.cache.num_free_blocks == e.cache.num_blocks


def test_tenants_take_turns(model):
    """Admission order across tenants: round-robin, least recently served first; FCFS within one."""
    e = Engine(model, max_batch=1, block_size=4)
    order = []
    p = prompts([3])[0]
    for rid, tenant in [("a1", "A"), ("a2", "A"), ("a3", "A"), ("b1", "B"), ("c1", "C"), ("b2", "B")]:
        e.add_request(p, SamplingParams(max_tokens=1, **GREEDY), request_id=rid, tenant=tenant)
    while e.has_unfinished():
        order += [ev.request_id for ev in e.step() if ev.finished]
    assert order == ["a1", "b1", "c1", "a2", "b2", "a3"]


# ---- item 11: one text layer under inference and serve ---------------------------------------------------
def test_text_layer_sits_below_inference_and_serve():
    """inference no longer imports serve (generate.py imported serve.protocol's TextStream); the one
    stop-string search serves the engine and the TextStream alike."""
    import subprocess
    import sys

    code = ("import sys, minke.inference.engine, minke.inference.generate, minke.text; "
            "print([m for m in sys.modules if m.startswith('minke.serve')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:]
    from minke.text import first_stop

    assert first_stop("abcXYdefXY", ["def", "XY"]) == (3, "XY")  # the earliest occurrence, whichever string
    assert first_stop("abcXYdef", ["XY"], since=5) is None  # wholly inside text already searched
    assert first_stop("abcXYdef", ["XY"], since=4) == (3, "XY")  # ends after `since`
    assert first_stop("abc", []) is None


def test_abort_part_way_through_a_chunked_prefill(model):
    """Aborting a request, or a group's parent, whose prompt is part-way through its chunked prefill
    frees its blocks at once; the engine then serves others as before."""
    e = Engine(model, max_batch=4, block_size=4, max_prefill_tokens=8)
    long = prompts([40])[0]
    e.add_request(long, SamplingParams(max_tokens=4, **GREEDY), request_id="r")
    e.add_request(long, SamplingParams(max_tokens=4, temperature=1.0, seed=0, stop_token_ids=[]), request_id="g", n=3)
    e.step()
    e.step()
    assert e.prefilling and e.cache.num_free_blocks < e.cache.num_blocks
    assert e.abort("r") and e.abort("g")
    final = [ev for ev in e.step() if ev.finished]
    assert sorted(map(str, (ev.request_id for ev in final))) == ["('g', 0)", "('g', 1)", "('g', 2)", "r"]
    assert all(ev.finish_reason == "abort" for ev in final)
    assert not e.has_unfinished() and not e.prefilling and e.cache.num_free_blocks == e.cache.num_blocks
    p = prompts([5])[0]
    assert e.generate([p], SamplingParams(max_tokens=3, **GREEDY))[0].token_ids == greedy_ref(model, p, 3)

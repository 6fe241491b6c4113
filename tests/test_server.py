"""`minke serve` end to end: the real engine and a tiny trained model behind uvicorn on 127.0.0.1,
driven by the official openai client (httpx for what the client will not send)."""

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import openai
import pytest
import uvicorn

from chat_model import HI, SUM, SYSTEM, make, reply
from minke.inference.engine import Engine
from minke.inference.sampling import SamplingParams
from minke.serve import server

pytestmark = pytest.mark.usefixtures("one_thread")
from minke.text import TextStream, split_reasoning

KEY, NAME = "sk-test", "tiny-chat"
GREEDY = dict(temperature=0, max_tokens=64)


@contextmanager
def serving(app):
    """uvicorn in a thread on a free loopback port; stops when the block ends."""
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(1000):
        if srv.started or not thread.is_alive():
            break
        time.sleep(0.01)
    assert srv.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{srv.servers[0].sockets[0].getsockname()[1]}"
    finally:
        srv.should_exit = True
        thread.join(timeout=15)
        assert not thread.is_alive()


@pytest.fixture(scope="module")
def setup():
    model, tok = make()
    engine = Engine(model, max_batch=32, decode_fn=tok.decode)
    app = server.create_app(engine, tok, model_name=NAME, api_key=KEY)
    with serving(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        yield dict(url=url, client=client, engine=engine, model=model, tok=tok, engine_loop=app.state.engine_loop)
    assert not engine.has_unfinished()


def chat(client, messages, **kw):
    return client.chat.completions.create(messages=messages, **{"model": NAME, **GREEDY, **kw})


def stream_chat(client, messages, **kw):
    parts = {"reasoning": "", "content": "", "finish": None, "usage": None, "role": None}
    for chunk in chat(client, messages, stream=True, **kw):
        if chunk.usage is not None:
            parts["usage"] = chunk.usage
        for ch in chunk.choices:
            parts["role"] = parts["role"] or ch.delta.role
            parts["reasoning"] += getattr(ch.delta, "reasoning_content", None) or ""
            parts["content"] += ch.delta.content or ""
            parts["finish"] = ch.finish_reason or parts["finish"]
    return parts


def reference(setup, prompt_ids, max_tokens, min_tokens=0):
    """What a lone greedy run of the prompt gives, on a separate engine: (text, token count)."""
    tok = setup["tok"]
    out = Engine(setup["model"], max_batch=1).generate(
        [prompt_ids], SamplingParams(max_tokens=max_tokens, temperature=0, stop_token_ids=[tok.eos_id],
                                     min_tokens=min_tokens))[0]
    return tok.decode(out.token_ids, skip_special_tokens=True), len(out.token_ids)


def healthy(setup):
    assert httpx.get(setup["url"] + "/health").json()["status"] == "ok"
    r = setup["client"].completions.create(model=NAME, prompt="1 + 1", max_tokens=2, temperature=0)
    assert r.usage.completion_tokens == 2


# ---- the text layer -----------------------------------------------------------------------------
def test_text_stream_units(setup):
    tok = setup["tok"]
    # multi-byte UTF-8 split across byte-level tokens: no U+FFFD ever leaves, nothing is lost
    text = "héllo 世界 🙂 ok"
    t = TextStream(tok.decode, split=False)
    deltas = [t.add([i])[1] for i in tok.encode(text)] + [t.finish()[1]]
    assert "".join(deltas) == text and not any("\ufffd" in d for d in deltas)

    # a fake tokenizer whose tokens are strings, to cut tags and stop strings anywhere
    pieces = ["Let", " me", " th", "ink</th", "ink>", "\n\nThe", " answer", " is 4", ".", "EN", "D", " junk"]
    decode = lambda ids, **_: "".join(pieces[i] for i in ids)
    t = TextStream(decode, stop=["END"], think=True)
    out = [t.add([i]) for i in range(len(pieces))]
    assert t.stopped and out[8] == ("", ".") and out[9] == out[10] == ("", "")  # "EN" held: it may be "END"
    assert (t.reasoning, t.content) == ("Let me think", "\n\nThe answer is 4.")
    assert all("<" not in r and "<" not in c for r, c in out)  # a partial </think> is never released
    assert split_reasoning("a</think>b") == ("a", "b") and split_reasoning("ab") == ("ab", "")
    assert split_reasoning("\n<think>x</think>y", think=False) == ("x", "y")
    assert split_reasoning("plain </think>", think=False) == ("", "plain </think>")
    t = TextStream(decode, stop=["zzz"], split=False)
    assert [t.add([i])[1] for i in (0, 1)] + [t.finish()[1]] == ["Let", " me", ""]


# ---- endpoints ----------------------------------------------------------------------------------
def test_models_and_health(setup):
    assert [m.id for m in setup["client"].models.list().data] == [NAME]
    h = httpx.get(setup["url"] + "/health")
    assert h.status_code == 200 and h.json()["status"] == "ok"
    page = httpx.get(setup["url"] + "/")  # the web chat page
    assert page.status_code == 200 and "text/html" in page.headers["content-type"] and "/v1/chat" in page.text


def test_chat_reasoning_split(setup):
    client, tok = setup["client"], setup["tok"]
    turn1 = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"}]
    r = chat(client, turn1)
    msg = r.choices[0].message
    assert msg.role == "assistant" and (msg.reasoning_content, msg.content) == HI
    prompt = tok.encode(tok.apply_chat_template(turn1))
    text, n = reference(setup, prompt, 64)
    assert msg.reasoning_content + "</think>" + msg.content == text  # nothing lost or added
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt), n)
    assert r.usage.total_tokens == len(prompt) + n and r.model == NAME

    turn2 = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": reply(HI)},
             {"role": "user", "content": [{"type": "text", "text": "What is 2 + 3?"}]}]
    for stream in (False, True):
        if stream:
            s = stream_chat(client, turn2, stream_options={"include_usage": True})
            reasoning, content, finish, usage = s["reasoning"], s["content"], s["finish"], s["usage"]
            assert s["role"] == "assistant"
        else:
            r = chat(client, turn2)
            m = r.choices[0].message
            reasoning, content, finish, usage = m.reasoning_content, m.content, r.choices[0].finish_reason, r.usage
        assert (reasoning, content) == SUM and finish == "stop"  # ended by eos
        assert usage.prompt_tokens == len(tok.encode(tok.apply_chat_template(turn2[:2] + [
            {"role": "user", "content": "What is 2 + 3?"}])))
        assert usage.completion_tokens == len(tok.encode(reply(SUM))) + 1  # the eos counts


def test_chat_options(setup):
    client = setup["client"]
    hi = [{"role": "user", "content": "hi"}]
    r = chat(client, hi, max_tokens=5, logprobs=True, top_logprobs=2)
    lp = r.choices[0].logprobs.content
    assert r.choices[0].finish_reason == "length" and len(lp) == r.usage.completion_tokens == 5
    assert all(len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob >= e.logprob - 1e-9 for e in lp)
    r = chat(client, hi, stop=["says"])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.reasoning_content == "The user "
    s = stream_chat(client, hi, stop="says")
    assert (s["reasoning"], s["content"], s["finish"]) == ("The user ", "", "stop")
    r = chat(client, hi, n=3, temperature=1.0, seed=1, max_completion_tokens=4)
    assert [c.index for c in r.choices] == [0, 1, 2] and r.usage.completion_tokens == 12
    again = chat(client, hi, n=3, temperature=1.0, seed=1, max_completion_tokens=4)
    assert [c.message for c in again.choices] == [c.message for c in r.choices]  # seeded


def test_completions(setup):
    client, tok = setup["client"], setup["tok"]
    prompt = "Question: 12 + 7"
    # min_tokens 8 (vLLM's): the eos cannot end this off-script prompt's greedy text early
    text, n = reference(setup, tok.encode(prompt, add_bos=True), 8, min_tokens=8)
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0, logprobs=2,
                                  extra_body={"min_tokens": 8})
    c = r.choices[0]
    assert c.text == text and r.usage.completion_tokens == n == len(c.logprobs.tokens) == 8
    assert all(len(t) == 2 for t in c.logprobs.top_logprobs)
    chunks = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"min_tokens": 8}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == text
    assert chunks[-1].usage.completion_tokens == 8 and chunks[-2].choices[0].finish_reason == "length"
    # token-id prompts, a batch of prompts: choice index = prompt index
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "hi"}]))
    r = client.completions.create(model=NAME, prompt=[ids, ids[:-3]], max_tokens=64, temperature=0, stop=["hi."])
    assert r.choices[0].text == "The user says " and r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens == 2 * len(ids) - 3


def test_32_concurrent_streams_match_single_runs(setup):
    client, tok, engine = setup["client"], setup["tok"], setup["engine"]
    convs = [[{"role": "user", "content": f"What is {i} + {i % 7}?"}] for i in range(31)]
    convs.append([{"role": "user", "content": "hi"}])
    want = []
    for m in convs:
        text, _ = reference(setup, tok.encode(tok.apply_chat_template(m)), 12)
        want.append(split_reasoning(text))
    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(lambda m: stream_chat(client, m, max_tokens=12), convs))
    assert [(g["reasoning"], g["content"]) for g in got] == want
    assert all(g["finish"] in ("stop", "length") for g in got)
    assert not engine.has_unfinished() and engine.cache.num_free_blocks == engine.cache.num_blocks


def test_client_disconnect_aborts(setup, monkeypatch):
    engine = setup["engine"]
    aborted = []
    real_abort = engine.abort
    monkeypatch.setattr(engine, "abort", lambda rid: aborted.append(real_abort(rid)) or aborted[-1])
    # greedy, from a prompt that does not end on its own in 100 tokens (the model is random)
    candidates = ("Question:", "1 + 1 =", "The", "What is", "Answer", "Compute", "<think>", "2", "x", "Hello")
    prompt = next((p for p in candidates if reference(setup, setup["tok"].encode(p, add_bos=True), 100)[1] == 100),
                  None)
    assert prompt is not None, "no candidate prompt runs 100 tokens without eos: add candidates"
    body = {"model": NAME, "prompt": prompt, "max_tokens": 100, "temperature": 0, "stream": True}
    with httpx.stream("POST", setup["url"] + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")  # generation is under way; now hang up
    for _ in range(500):
        if aborted and not engine.has_unfinished():
            break
        time.sleep(0.01)
    assert aborted == [True]  # the server aborted the running sequence…
    assert engine.cache.num_free_blocks == engine.cache.num_blocks  # …and its blocks are free
    healthy(setup)


# ---- bad input ----------------------------------------------------------------------------------
def _chat(**kw):
    return {"model": NAME, "messages": [{"role": "user", "content": "hi"}], **kw}


BAD = [  # (path, body (dict, or raw bytes), headers, status, error param, error code)
    ("/v1/chat/completions", b'{"model": "tiny-chat", "messages": [', None, 400, None, None),
    ("/v1/chat/completions", b"[1, 2]", None, 400, None, None),
    ("/v1/chat/completions", _chat(model="gpt-5"), None, 404, "model", "model_not_found"),
    ("/v1/chat/completions", _chat(messages=[]), None, 400, "messages", None),
    ("/v1/chat/completions", {"model": NAME}, None, 400, "messages", None),
    ("/v1/chat/completions", _chat(messages=[{"role": "robot", "content": "x"}]), None, 400, "messages.0.role", None),
    ("/v1/chat/completions", _chat(messages=[{"role": "user", "content": "1 2 3 4 " * 100}]), None, 400,
     "messages", "context_length_exceeded"),
    ("/v1/chat/completions", _chat(temperature=3), None, 400, "temperature", None),
    ("/v1/chat/completions", _chat(top_p=0), None, 400, "top_p", None),
    ("/v1/chat/completions", _chat(max_tokens=0), None, 400, "max_tokens", None),
    ("/v1/chat/completions", _chat(n=0), None, 400, "n", None),
    ("/v1/chat/completions", _chat(seed=-1), None, 400, "seed", None),
    ("/v1/chat/completions", _chat(stop=["ok", ""]), None, 400, "stop", None),
    ("/v1/chat/completions", _chat(top_logprobs=3), None, 400, None, None),
    ("/v1/chat/completions", _chat(presence_penalty=0.5), None, 400, None, None),
    ("/v1/completions", {"model": NAME, "prompt": []}, None, 400, "prompt", None),
    ("/v1/completions", {"model": NAME, "prompt": [10**6]}, None, 400, "prompt", None),
    ("/v1/completions", {"model": NAME, "prompt": "x", "logprobs": 99}, None, 400, "logprobs", None),
    ("/v1/chat/completions", _chat(), {"Authorization": "Bearer wrong"}, 401, None, "invalid_api_key"),
    ("/v1/chat/completions", _chat(), {"Authorization": ""}, 401, None, "invalid_api_key"),
    ("/v1/models", None, {"Authorization": ""}, 401, None, "invalid_api_key"),
    ("/v1/nothing-here", {}, None, 404, None, "not_found"),
]


@pytest.mark.parametrize("path,body,headers,status,param,code", BAD)
def test_bad_input_is_4xx_and_server_stays_healthy(setup, path, body, headers, status, param, code):
    h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", **(headers or {})}
    if body is None:
        r = httpx.get(setup["url"] + path, headers=h)
    else:
        r = httpx.post(setup["url"] + path, headers=h,
                       content=body if isinstance(body, bytes) else json.dumps(body))
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert (err["param"], err["code"]) == (param, code) or (param is None and code is None), err
    if param:
        assert param.split(".")[0] in err["message"]
    healthy(setup)


def test_openai_client_errors(setup):
    with pytest.raises(openai.NotFoundError):
        chat(setup["client"], [{"role": "user", "content": "hi"}], model="nope")
    bad = openai.OpenAI(base_url=setup["url"] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.BadRequestError, match="temperature"):
        chat(setup["client"], [{"role": "user", "content": "hi"}], temperature=-1)
    healthy(setup)


def test_serve_main_wires_checkpoint(tmp_path, monkeypatch):
    import minke

    model, tok = make()
    minke.save(model, tmp_path / "ckpt")
    tok.save(tmp_path / "ckpt")
    ran = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: ran.update(app=app, **kw))
    assert server.main(["--model", str(tmp_path / "ckpt"), "--port", "0", "--api-key", KEY]) == 0
    assert ran["host"] == "127.0.0.1" and ran["port"] == 0
    with serving(ran["app"]) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        msg = chat(client, [{"role": "user", "content": "hi"}], model="ckpt").choices[0].message
        assert (msg.reasoning_content, msg.content) == HI


# ---- issue 11: no request can hurt another ----------------------------------------------------------
MARK = 300  # a token id that, in a prompt, makes the poisoned forward below raise


@contextmanager
def poisoned(engine, after_tokens=0):
    """The test hook for a request that breaks the engine: any forward over a row whose prompt holds
    MARK raises once that row has ``after_tokens`` output tokens."""
    real = engine.model.forward

    def forward(*a, **kw):
        view = engine.cache._view
        for sid in (view.seq_ids if view is not None else ()):
            r = engine.requests.get(sid)
            if r is not None and MARK in r.prompt and len(r.out) >= after_tokens:
                raise RuntimeError("injected fault")
        return real(*a, **kw)

    engine.model.forward = forward
    try:
        yield
    finally:
        del engine.model.forward


def post(setup, path, body, **kw):
    return httpx.post(setup["url"] + path, json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=kw.pop("timeout", 60), **kw)


def test_failed_request_is_a_500_and_the_server_goes_on(setup):
    """A request that makes the engine raise gets a 500 (non-streaming) or an error event (streaming);
    a request beside it and every later one are answered (fails before the fix: the engine thread died
    on the next abort and every later request hung)."""
    engine, tok = setup["engine"], setup["tok"]
    ids = tok.encode("1 + 1", add_bos=True)
    text, _ = reference(setup, ids, 8)
    for after, stream in ((0, False), (2, True)):
        with poisoned(engine, after_tokens=after), ThreadPoolExecutor(2) as pool:
            bad = pool.submit(post, setup, "/v1/completions", {"model": NAME, "prompt": ids + [MARK], "max_tokens": 8,
                                                               "temperature": 0, "stream": stream})
            good = pool.submit(post, setup, "/v1/completions", {"model": NAME, "prompt": ids, "max_tokens": 8,
                                                                "temperature": 0})
            bad, good = bad.result(), good.result()
        assert good.status_code == 200 and good.json()["choices"][0]["text"] == text
        if stream:
            assert bad.status_code == 200 and '"server_error"' in bad.text and "injected fault" in bad.text
            assert bad.text.rstrip().endswith("data: [DONE]")
        else:
            assert bad.status_code == 500 and "injected fault" in bad.json()["error"]["message"]
        healthy(setup)
    assert engine.cache.num_free_blocks == engine.cache.num_blocks


def test_health_reports_a_dead_or_stuck_engine(setup, monkeypatch):
    """Fails before the fix: /health said "ok" whatever the engine thread did."""
    runner = setup["engine_loop"]
    runner.stop()
    r = httpx.get(setup["url"] + "/health")
    assert r.status_code == 503 and r.json()["status"] == "dead"
    runner.start()
    healthy(setup)

    gate, inside = threading.Event(), threading.Event()
    real = setup["engine"].step

    def slow_step():
        inside.set()
        assert gate.wait(30), "the test never released the step"
        return real()

    monkeypatch.setattr(setup["engine"], "step", slow_step)
    monkeypatch.setattr(runner, "stuck_after", 0.05)
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(post, setup, "/v1/completions", {"model": NAME, "prompt": "1", "max_tokens": 2})
        assert inside.wait(30)
        for _ in range(300):
            r = httpx.get(setup["url"] + "/health")
            if r.status_code == 503:
                break
            time.sleep(0.01)
        assert r.status_code == 503 and r.json()["status"] == "stuck" and "engine step" in r.json()["reason"]
        monkeypatch.setattr(setup["engine"], "step", real)
        gate.set()
        assert fut.result().status_code == 200
    monkeypatch.setattr(runner, "stuck_after", 120.0)
    healthy(setup)


def test_api_key_bytes_env_and_file(setup, tmp_path, monkeypatch):
    """A non-ASCII key is a 401, not a 500 (compare_digest on str raised); a non-ASCII server key
    matches the client's UTF-8 bytes; the key comes from --api-key-file or $MINKE_API_KEY."""
    r = httpx.get(setup["url"] + "/v1/models", headers=[(b"authorization", "Bearer clé-ключ".encode())])
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    from fastapi.testclient import TestClient

    app = server.create_app(setup["engine"], setup["tok"], model_name=NAME, api_key="clé-ключ")
    client = TestClient(app)  # no lifespan: /v1/models does not need the engine thread
    assert client.get("/v1/models", headers=[(b"authorization", "Bearer clé-ключ".encode())]).status_code == 200
    assert client.get("/v1/models", headers=[(b"authorization", b"Bearer cl\xe9")]).status_code == 401

    parse = lambda *args: server.api_key(server._parser().parse_args(["--model", "m", *args]))
    (tmp_path / "key").write_text("sk-from-file\n")
    monkeypatch.delenv("MINKE_API_KEY", raising=False)
    assert parse() is None and parse("--api-key", "sk-a") == "sk-a"
    assert parse("--api-key-file", str(tmp_path / "key")) == "sk-from-file"
    monkeypatch.setenv("MINKE_API_KEY", "sk-env")
    assert parse() == "sk-env" and parse("--api-key-file", str(tmp_path / "key")) == "sk-from-file"
    (tmp_path / "empty").write_text("\n")
    for args, msg in ((("--api-key-file", str(tmp_path / "empty")), "first line is empty"),
                      (("--api-key-file", str(tmp_path / "missing")), "missing"),
                      (("--api-key", "a", "--api-key-file", str(tmp_path / "key")), "not both")):
        with pytest.raises(SystemExit, match=msg):
            parse(*args)


def test_non_streaming_request_aborts_on_disconnect(setup, monkeypatch):
    """A client that hangs up on a non-streaming request: the engine request is aborted and its blocks
    freed (fails before the fix: it ran to max_tokens)."""
    engine = setup["engine"]
    aborted, gate, stepped = [], threading.Event(), threading.Event()
    real_abort, real_step = engine.abort, engine.step
    monkeypatch.setattr(engine, "abort", lambda rid: aborted.append(real_abort(rid)) or aborted[-1])

    def step():  # hold the engine after its first step until the client has gone
        events = real_step()
        stepped.set()
        assert gate.wait(30), "the test never released the engine"
        return events

    monkeypatch.setattr(engine, "step", step)
    with pytest.raises(httpx.ReadTimeout):
        post(setup, "/v1/completions", {"model": NAME, "prompt": "1 + 1", "max_tokens": 200, "temperature": 0,
                                        "ignore_eos": True}, timeout=httpx.Timeout(30, read=0.5))
    assert stepped.is_set()
    monkeypatch.setattr(engine, "step", real_step)
    gate.set()
    for _ in range(500):
        if aborted and not engine.has_unfinished():
            break
        time.sleep(0.01)
    assert aborted == [True]  # the request was still running when the server aborted it
    assert engine.cache.num_free_blocks == engine.cache.num_blocks
    healthy(setup)


def test_vllm_sampling_fields(setup):
    """stop_token_ids, min_tokens, ignore_eos, repetition_penalty reach the engine (they were accepted
    and dropped before the fix)."""
    client, tok, engine = setup["client"], setup["tok"], setup["engine"]
    hi = [{"role": "user", "content": "hi"}]
    ids = tok.encode(tok.apply_chat_template(hi))
    natural = len(tok.encode(reply(HI))) + 1  # the reply and its eos
    extra = lambda **kw: chat(client, hi, extra_body=kw)
    r = extra(ignore_eos=True, max_tokens=natural + 3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == natural + 3
    r = extra(min_tokens=natural + 2, max_tokens=natural + 6)
    want = Engine(setup["model"]).generate([ids], SamplingParams(
        max_tokens=natural + 6, temperature=0, stop_token_ids=[tok.eos_id], min_tokens=natural + 2))[0]
    assert r.usage.completion_tokens == len(want.token_ids) >= natural + 2
    assert r.choices[0].finish_reason == want.finish_reason
    second = tok.encode(reply(HI))[1]
    r = extra(stop_token_ids=[second])
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 2
    r = extra(repetition_penalty=1.3, max_tokens=12)
    want = Engine(setup["model"]).generate([ids], SamplingParams(max_tokens=12, temperature=0, repetition_penalty=1.3,
                                                                 stop_token_ids=[tok.eos_id]))[0]
    text = tok.decode(want.token_ids, skip_special_tokens=True)
    assert (r.choices[0].message.reasoning_content or "") + ("</think>" + r.choices[0].message.content
                                                            if "</think>" in text else "") == text


def test_logprobs_bytes_and_text_offset(setup):
    """Chat logprobs' bytes are each token's own bytes (a byte-level token inside a UTF-8 character is
    not U+FFFD's); completions' text_offset counts from the start of the text across stream chunks."""
    from minke.text import token_bytes

    client, tok = setup["client"], setup["tok"]
    text = "héllo 世界 🙂"
    ids = tok.encode(text)
    assert b"".join(token_bytes(tok, i) for i in ids) == text.encode()
    assert token_bytes(tok, tok.eos_id) == tok.decode([tok.eos_id]).encode()
    r = chat(client, [{"role": "user", "content": "hi"}], max_tokens=6, logprobs=True, top_logprobs=2)
    lp = r.choices[0].logprobs.content
    gen = Engine(setup["model"]).generate([tok.encode(tok.apply_chat_template([{"role": "user", "content": "hi"}]))],
                                          SamplingParams(max_tokens=6, temperature=0, stop_token_ids=[tok.eos_id]))[0]
    assert [e.bytes for e in lp] == [list(token_bytes(tok, i)) for i in gen.token_ids]
    chunks = list(client.completions.create(model=NAME, prompt="Question: 12 + 7", max_tokens=8, temperature=0,
                                            stream=True, logprobs=1, extra_body={"min_tokens": 8}))
    toks = [t for ch in chunks if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.tokens]
    offsets = [o for ch in chunks if ch.choices and ch.choices[0].logprobs for o in ch.choices[0].logprobs.text_offset]
    assert len(toks) == 8 and offsets == [sum(map(len, toks[:k])) for k in range(8)]


def test_tokenization_runs_off_the_event_loop(setup, monkeypatch):
    """While one prompt is being tokenized, the server keeps answering (fails before the fix: a 4 MB
    prompt's encode blocked every stream)."""
    tok = setup["tok"]
    real, gate, inside = tok.encode, threading.Event(), threading.Event()

    def encode(text, *a, **kw):
        if "SLOW" in text:
            inside.set()
            assert gate.wait(30)
        return real(text, *a, **kw)

    monkeypatch.setattr(tok, "encode", encode)
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(post, setup, "/v1/completions", {"model": NAME, "prompt": "SLOW 1 + 1", "max_tokens": 2})
        assert inside.wait(30)
        try:
            assert httpx.get(setup["url"] + "/health", timeout=10).status_code == 200
        finally:
            gate.set()
        assert fut.result().status_code == 200


def test_request_limits_and_refused_fields(setup):
    """Each limit is a 4xx naming it; OpenAI fields minke cannot honour are refused by name (they were
    silently ignored, and a 50 x 128 request became 6,400 engine sequences)."""
    body = lambda **kw: {"model": NAME, "prompt": "1", "max_tokens": 1, **kw}
    cases = [
        (body(prompt=["1"] * 65), 400, "prompt", "max_prompts"),
        (body(n=129), 400, "n", "max_n"),
        (body(prompt=["1"] * 50, n=128), 400, "n", "max_sequences"),
        (body(stop=["a", "b", "c", "d", "e"]), 400, "stop", "at most 4"),
        (body(stop=["x" * 257]), 400, "stop", "max_stop_chars"),
        (body(response_format={"type": "json_object"}), 400, None, "response_format"),
        (body(best_of=2), 400, None, "best_of"),
        (body(tool_choice="auto"), 400, None, "tool_choice"),
        (body(tools=[{"type": "function", "function": {"name": "f"}}]), 400, None, "tools"),
        (body(prompt="1 " * (5 << 20)), 413, None, "max_body_bytes"),
    ]
    for b, status, param, words in cases:
        r = post(setup, "/v1/completions", b)
        assert r.status_code == status, (b.get("prompt", "")[:20], r.text[:200])
        err = r.json()["error"]
        assert err["param"] == param and words in err["message"], err
    ok = post(setup, "/v1/completions", body(best_of=1, response_format={"type": "text"}, tool_choice="none"))
    assert ok.status_code == 200
    # a body without Content-Length (chunked) is counted as it arrives
    big = (b'{"model": "%s", "prompt": "' % NAME.encode()) + b"1 " * (5 << 20) + b'"}'
    parts = [big[i:i + 65536] for i in range(0, len(big), 65536)]
    r = httpx.post(setup["url"] + "/v1/completions", content=iter(parts),
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    healthy(setup)


def test_small_request_beside_a_6400_sequence_request():
    """One HTTP request of 50 prompts x n=128 (limits raised to allow it) is one tenant of the engine's
    fair admission: a small chat request sent while it runs is answered within a few engine steps (it
    waited behind all 6,400 sequences before the fix), and hanging up on the big one frees everything."""
    model, tok = make()
    engine = Engine(model, max_batch=32, decode_fn=tok.decode)
    limits = server.Limits(max_prompts=50, max_n=128, max_sequences=6400)
    with serving(server.create_app(engine, tok, model_name=NAME, limits=limits)) as url:
        started, hang_up = threading.Event(), threading.Event()

        def big():
            body = {"model": NAME, "prompt": [f"{i} + {i}" for i in range(50)], "n": 128, "max_tokens": 4,
                    "temperature": 1.0, "seed": 0, "stream": True}
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
                for _ in r.iter_lines():
                    started.set()
                    if hang_up.is_set():
                        return r.status_code
            return r.status_code

        with ThreadPoolExecutor(1) as pool:
            fut = pool.submit(big)
            assert started.wait(60)
            before = engine.stats.steps
            r = httpx.post(url + "/v1/chat/completions", json={"model": NAME, **GREEDY,
                                                               "messages": [{"role": "user", "content": "hi"}]},
                           timeout=60)
            steps = engine.stats.steps - before
            left = len(engine.waiting)
            hang_up.set()
            assert fut.result() == 200
        assert r.status_code == 200 and (r.json()["choices"][0]["message"]["reasoning_content"],
                                         r.json()["choices"][0]["message"]["content"]) == HI
        # first come first served, the small one would wait for all 6,400 (~800 steps of 32 rows x 4 tokens):
        # it takes its ~20 decode steps plus the HTTP hops, while most of the big one still waits
        assert left > 1000 and steps < 400, (left, steps)
        for _ in range(1000):
            if not engine.has_unfinished():
                break
            time.sleep(0.01)
        assert not engine.has_unfinished() and engine.cache.num_free_blocks == engine.cache.num_blocks


def test_hopeless_prompt_refused_before_tokenizing_and_encode_releases_the_gil(setup, monkeypatch):
    """A text with more bytes than context x the longest token's bytes cannot fit: refused without
    tokenizing it (a 4 MB prompt took 19 s of CPU to tokenize here); and the tokenizer's encode lets
    other threads run (tokenizers' encode holds the GIL, encode_batch releases it: a stream beside a
    4 MB prompt stalled 12 s, now 30 ms)."""
    tok = setup["tok"]
    monkeypatch.setattr(tok, "encode", lambda *a, **k: pytest.fail("tokenized a hopeless prompt"))
    for path, body in (("/v1/completions", {"model": NAME, "prompt": "12 + 7 = 19. " * 20000, "max_tokens": 1}),
                       ("/v1/chat/completions", _chat(messages=[{"role": "user", "content": "é" * 200000}]))):
        r = post(setup, path, body)
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text[:300]
        assert "at least" in r.json()["error"]["message"]
    monkeypatch.undo()

    text, ticks, done = "12 + 7 = 19. " * 60000, [], threading.Event()

    def ticker():
        while not done.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.002)

    t = threading.Thread(target=ticker)
    t.start()
    t0 = time.perf_counter()
    tok.encode(text)
    took = time.perf_counter() - t0
    done.set()
    t.join()
    gap = max(b - a for a, b in zip(ticks, ticks[1:]))
    assert gap < max(took / 3, 0.05), f"another thread waited {gap:.2f} s of a {took:.2f} s encode"

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
from minke.serve.protocol import TextStream, split_reasoning

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
    with serving(server.create_app(engine, tok, model_name=NAME, api_key=KEY)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        yield dict(url=url, client=client, engine=engine, model=model, tok=tok)
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


def reference(setup, prompt_ids, max_tokens):
    """What a lone greedy run of the prompt gives, on a separate engine: (text, token count)."""
    tok = setup["tok"]
    out = Engine(setup["model"], max_batch=1).generate(
        [prompt_ids], SamplingParams(max_tokens=max_tokens, temperature=0, stop_token_ids=[tok.eos_id]))[0]
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
    text, n = reference(setup, tok.encode(prompt, add_bos=True), 8)
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0, logprobs=2)
    c = r.choices[0]
    assert c.text == text and r.usage.completion_tokens == n == len(c.logprobs.tokens) == 8
    assert all(len(t) == 2 for t in c.logprobs.top_logprobs)
    chunks = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
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

"""Load and fault test of `minke serve` (issue 11's acceptance): the server that `minke serve` builds
from a checkpoint, on 127.0.0.1, under many concurrent clients sending a mix of valid and malformed
requests, hanging up mid-stream and mid-request, and one request forced to fail inside the engine.
Afterwards every valid request got exactly the answer of a direct engine run (greedy), the server
still answers, and every cache block is back in the pool. Bounded: 72 requests, 12 clients, loopback."""

import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
import uvicorn

import minke
from chat_model import make
from minke.inference.engine import Engine
from minke.inference.sampling import SamplingParams
from minke.serve import server

pytestmark = pytest.mark.usefixtures("one_thread")
KEY = "sk-load"
MARK = 300  # a prompt holding this token id makes the engine's forward raise (the fault hook below)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model, tok = make()
    ckpt = tmp_path_factory.mktemp("load") / "ckpt"
    minke.save(model, ckpt)
    tok.save(ckpt)
    ran = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(uvicorn, "run", lambda app, **kw: ran.update(app=app, **kw))
        mp.setenv("MINKE_API_KEY", KEY)  # the key from the environment, not the command line
        assert server.main(["--model", str(ckpt), "--max-batch", "8", "--max-prefill-tokens", "64"]) == 0
    app = ran["app"]
    engine = app.state.engine_loop.engine
    real = engine.model.forward

    def forward(*a, **kw):  # the test hook: a request that breaks the engine's forward
        view = engine.cache._view
        for sid in (view.seq_ids if view is not None else ()):
            r = engine.requests.get(sid)
            if r is not None and MARK in r.prompt:
                raise RuntimeError("injected fault")
        return real(*a, **kw)

    engine.model.forward = forward
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(1000):
        if srv.started or not thread.is_alive():
            break
        time.sleep(0.01)
    assert srv.started, "uvicorn did not start"
    url = f"http://127.0.0.1:{srv.servers[0].sockets[0].getsockname()[1]}"
    try:
        # the reference runs the checkpoint as the server loaded it (float32 on the CPU)
        yield dict(url=url, engine=engine, model=minke.load(ckpt, dtype=torch.float32), tok=tok)
    finally:
        srv.should_exit = True
        thread.join(timeout=15)


H = {"Authorization": f"Bearer {KEY}"}


def test_load_and_faults(served, monkeypatch):
    url, engine, model, tok = served["url"], served["engine"], served["model"], served["tok"]
    aborted, real_abort = [], engine.abort
    monkeypatch.setattr(engine, "abort", lambda rid: aborted.append(real_abort(rid)) or aborted[-1])
    rng = random.Random(0)
    questions = [f"What is {a} + {b}?" for a in range(6) for b in range(4)] + ["hi"]

    def chat_body(q, **kw):
        return {"model": "ckpt", "messages": [{"role": "user", "content": q}], "temperature": 0, "max_tokens": 10, **kw}

    jobs = []  # (kind, payload)
    for i in range(72):
        q = rng.choice(questions)
        kind = ["chat", "chat_stream", "completion", "completion_stream", "malformed", "malformed",
                "hangup_stream", "hangup_request"][i % 8]
        jobs.append((kind, q))
    jobs[17] = ("fault", "1 + 1")
    jobs[50] = ("fault_stream", "2 + 2")
    malformed = [
        (b'{"model": "ckpt", "messages": [', 400), (json.dumps(chat_body("x", temperature=-1)).encode(), 400),
        (json.dumps({**chat_body("x"), "model": "other"}).encode(), 404),
        (json.dumps(chat_body("x", stop=["a", "b", "c", "d", "e"])).encode(), 400),
        (json.dumps(chat_body("x", n=10**6)).encode(), 400),
        (json.dumps(chat_body("x", tools=[{"a": 1}])).encode(), 400),
    ]

    def run(job):
        kind, q = job
        with httpx.Client(base_url=url, headers=H, timeout=60) as c:
            if kind == "chat":
                r = c.post("/v1/chat/completions", json=chat_body(q))
                m = r.json()["choices"][0]["message"]
                return kind, q, r.status_code, (m["reasoning_content"] or "", m["content"] or "")
            if kind == "chat_stream":
                reasoning = content = ""
                with c.stream("POST", "/v1/chat/completions", json=chat_body(q, stream=True)) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: {"):
                            d = json.loads(line[6:])["choices"][0]["delta"]
                            reasoning += d.get("reasoning_content") or ""
                            content += d.get("content") or ""
                return kind, q, r.status_code, (reasoning, content)
            if kind in ("completion", "completion_stream"):
                body = {"model": "ckpt", "prompt": q, "max_tokens": 8, "temperature": 0,
                        "stream": kind.endswith("stream")}
                if not body["stream"]:
                    r = c.post("/v1/completions", json=body)
                    return kind, q, r.status_code, r.json()["choices"][0]["text"]
                text = ""
                with c.stream("POST", "/v1/completions", json=body) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: {"):
                            text += json.loads(line[6:])["choices"][0]["text"]
                return kind, q, r.status_code, text
            if kind == "malformed":
                raw, want = rng.choice(malformed)
                r = c.post("/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"})
                return kind, q, r.status_code == want and "error" in r.json(), None
            if kind == "hangup_stream":
                with c.stream("POST", "/v1/chat/completions", json=chat_body(q, stream=True, max_tokens=120,
                                                                             ignore_eos=True)) as r:
                    next(r.iter_lines())
                return kind, q, r.status_code, None
            if kind == "hangup_request":
                try:
                    c.post("/v1/chat/completions", json=chat_body(q, max_tokens=120, ignore_eos=True),
                           timeout=httpx.Timeout(60, read=0.2))
                except httpx.ReadTimeout:
                    pass
                return kind, q, None, None
            ids = tok.encode(q, add_bos=True) + [MARK]
            body = {"model": "ckpt", "prompt": ids, "max_tokens": 8, "temperature": 0, "stream": kind == "fault_stream"}
            r = c.post("/v1/completions", json=body)
            return kind, q, r.status_code, r.text

    t0 = time.monotonic()
    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(run, jobs))
    elapsed = time.monotonic() - t0

    # what a direct engine run of the checkpoint answers (greedy)
    chats = sorted({q for k, q, _, _ in results if k.startswith("chat")})
    comps = sorted({q for k, q, _, _ in results if k.startswith("completion")})
    ref = Engine(model, max_batch=16)
    stop = SamplingParams(temperature=0, stop_token_ids=[tok.eos_id], max_tokens=10)
    from minke.text import TextStream

    def text_of(ids, think):
        t = TextStream(tok.decode, think=think, split=think)
        t.add(ids)
        t.finish()
        return (t.reasoning, t.content) if think else t.content

    want_chat = {q: text_of(c.token_ids, True) for q, c in zip(chats, ref.generate(
        [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}])) for q in chats], stop))}
    want_comp = {q: text_of(c.token_ids, False) for q, c in zip(comps, ref.generate(
        [tok.encode(q, add_bos=True) for q in comps], SamplingParams(temperature=0, stop_token_ids=[tok.eos_id],
                                                                     max_tokens=8)))}
    for kind, q, status, got in results:
        if kind.startswith("chat"):
            assert status == 200 and got == want_chat[q], (kind, q, got, want_chat[q])
        elif kind.startswith("completion"):
            assert status == 200 and got == want_comp[q], (kind, q, got, want_comp[q])
        elif kind == "malformed":
            assert status is True
        elif kind == "fault":
            assert status == 500 and "injected fault" in got
        elif kind == "fault_stream":
            assert status == 200 and "injected fault" in got and got.rstrip().endswith("data: [DONE]")

    # the server answers, nothing is left running, and every block is back in the pool
    for _ in range(1000):
        if not engine.has_unfinished():
            break
        time.sleep(0.01)
    assert not engine.has_unfinished(), "requests of clients that hung up are still running"
    hangups = sum(k.startswith("hangup") for k, _ in jobs)
    assert sum(aborted) >= hangups // 2  # the streams at least were cut short (120 tokens each otherwise)
    assert engine.cache.num_free_blocks == engine.cache.num_blocks
    h = httpx.get(url + "/health")
    assert h.status_code == 200 and h.json()["status"] == "ok" and h.json()["failed_requests"] >= 2
    assert httpx.get(url + "/v1/models").status_code == 401  # the key from MINKE_API_KEY is required
    with httpx.Client(base_url=url, headers=H, timeout=60) as c:
        m = c.post("/v1/chat/completions", json=chat_body(chats[0])).json()["choices"][0]["message"]
        assert (m["reasoning_content"] or "", m["content"] or "") == want_chat[chats[0]]
    assert elapsed < 120  # generous: the whole test is ~10 s on two shared cores

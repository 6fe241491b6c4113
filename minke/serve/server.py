"""`minke serve`: an OpenAI-compatible HTTP server over the engine.

    minke serve --model out/ckpt --port 8000 [--api-key-file FILE]   # or MINKE_API_KEY=... in the environment
    curl localhost:8000/v1/chat/completions -H 'content-type: application/json' \\
         -d '{"model": "ckpt", "messages": [{"role": "user", "content": "What is 2 + 3?"}]}'

Endpoints: POST /v1/chat/completions, POST /v1/completions (both with ``stream: true`` as server-sent
events ending in ``data: [DONE]``), GET /v1/models, GET /health, GET /metrics (the engine's counters as
JSON), and a web chat page at /. Chat responses carry the
``<think>`` block as ``reasoning_content`` and the answer as ``content``, as DeepSeek's API does.
Completions take ``echo`` with ``logprobs`` (the prompt's tokens scored, from the engine's prompt
log-probs) and ``max_tokens: 0`` with echo, so log-likelihood evaluations (lm-evaluation-harness's
``local-completions``) score prompts through the server.

Concurrency: one thread drives ``engine.step()`` (continuous batching: requests join and leave
between steps) and sleeps on a condition while the engine is idle; each HTTP request owns an asyncio
queue its engine requests' events are posted to (``loop.call_soon_threadsafe``). A client that goes
away, or a stop string, aborts the engine request, which frees its cache blocks. ``n > 1`` submits one
engine group per prompt: the prompt is prefilled once and forked into the n choices (choice j seeded
``seed + j``), as vLLM's parallel sampling. Every error is an
OpenAI-style body ``{"error": {"message", "type", "param", "code"}}``.

No request can hurt another: what one request may ask is bounded (``Limits``: prompts, n, sequences,
stop strings, body bytes; a 4xx names the limit); tokenization and the chat template run in a worker
thread, never on the event loop; the engine thread survives any exception (the engine fails only the
requests that raised, those get a 500; a request whose failure the engine cannot attribute fails with
its batch, never the thread); a non-streaming request whose client hangs up is aborted like a stream;
each HTTP request is its own tenant of the engine's round-robin admission, so a 6,400-sequence request
does not starve a small one; ``/health`` answers 503 when the engine thread is dead or one step has run
longer than ``stuck_after`` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import threading
import time
import uuid
from collections import defaultdict
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..data.tokenizer import THINK
from ..inference.sampling import SamplingParams
from ..text import TextStream, max_token_bytes, token_bytes
from . import protocol as P

log = logging.getLogger("minke.serve")
PAGE = Path(__file__).with_name("static") / "index.html"  # the web chat page, served at /


@dataclass
class Limits:
    """What one HTTP request may ask for (a 400 or 413 names the limit it passes)."""
    max_prompts: int = 64  # prompts in one /v1/completions request
    max_n: int = 128  # samples per prompt
    max_sequences: int = 256  # prompts × n: the engine sequences one request becomes
    max_stop_chars: int = 256  # the length of each stop string (at most protocol.MAX_STOP of them)
    max_body_bytes: int = 8 << 20  # the request body


class EngineFailed(Exception):
    """The engine failed a request (its message says why)."""


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.body = status, P.ErrorBody(message=message, type=type, param=param, code=code)

    def response(self) -> JSONResponse:
        return JSONResponse(P.ErrorResponse(error=self.body).model_dump(), status_code=self.status)


# ---- the engine thread -------------------------------------------------------------------------
class EngineLoop:
    """Runs ``engine.step()`` in a background thread and posts each request's events to its queue."""

    def __init__(self, engine, stuck_after: float = 120.0):
        self.engine, self.stuck_after = engine, stuck_after
        self.queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.aborts: list[str] = []
        self.wake = threading.Condition()
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.step_started: float | None = None  # monotonic start of the step running now
        self.loop_errors = 0  # exceptions that escaped engine.step() (the loop survived them)
        self.submitting = 0  # threads waiting to add requests: Python's locks are not fair, and a busy
        # loop re-taking the engine's lock at once would keep a new request out for hundreds of steps

    def health(self) -> tuple[str, str | None]:
        """("ok" | "dead" | "stuck", why)."""
        if self.thread is None or not self.thread.is_alive():
            return "dead", "the engine thread is not running"
        started = self.step_started
        if started is not None and time.monotonic() - started > self.stuck_after:
            return "stuck", f"one engine step has run for {time.monotonic() - started:.0f} s (> {self.stuck_after:g} s)"
        return "ok", None

    def start(self) -> None:
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="minke-engine", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        with self.wake:
            self.stopping = True
            self.wake.notify()
        if self.thread is not None:
            self.thread.join(timeout=30)

    def submit(self, prompt_ids: list[int], params: SamplingParams, queue: asyncio.Queue,
               loop: asyncio.AbstractEventLoop, n: int = 1, tenant=None) -> list:
        """Queue n samples of one prompt whose events go to ``queue`` (n > 1: one engine group, the
        prompt prefilled once and forked, sample j seeded params.seed + j); returns their engine
        request ids. ValueError on a bad prompt or params. Blocking (the engine's lock is held during a
        step): call it from a worker thread."""
        gid = uuid.uuid4().hex
        rids = [gid] if n == 1 else [(gid, j) for j in range(n)]  # the engine's ids for a group's children
        with self.wake:
            for rid in rids:  # before add_request, so no event can precede it
                self.queues[rid] = (loop, queue)
            self.submitting += 1  # the loop lets us take the engine's lock between two steps
        try:
            self.engine.add_request(prompt_ids, params, request_id=gid, n=n, tenant=tenant)
        except BaseException:
            with self.wake:
                for rid in rids:
                    self.queues.pop(rid, None)
            raise
        finally:
            with self.wake:
                self.submitting -= 1
                self.wake.notify_all()
        return rids

    def abort(self, rid: str) -> None:
        """Non-blocking: the engine thread aborts it before its next step."""
        with self.wake:
            self.aborts.append(rid)
            self.wake.notify()

    def _run(self) -> None:
        while True:
            with self.wake:
                while not self.stopping and (self.submitting or not (self.aborts or self.engine.has_unfinished())):
                    self.wake.wait(0.05 if self.submitting else None)  # a submit holds the engine briefly
                if self.stopping:
                    return
                aborts, self.aborts = self.aborts, []
            try:
                self._step(aborts)
            except Exception:  # never let the thread die: /health would say ok while nothing runs
                self.loop_errors += 1
                log.exception("engine loop: unexpected error (the loop goes on)")

    def _step(self, aborts: list) -> None:
        self.step_started = time.monotonic()
        try:
            for rid in aborts:
                self.engine.abort(rid)
            events = self.engine.step()  # fails only the requests that raise (their events say "error")
        except Exception as e:  # the engine could not contain it: end everything in flight
            self.loop_errors += 1
            log.exception("engine step failed")
            with self.wake:
                queues, self.queues = self.queues, {}
            for rid, (loop, q) in queues.items():
                try:
                    self.engine.abort(rid)
                except Exception:
                    log.exception("engine: abort of %r failed", rid)
                self._post(loop, q, EngineFailed(f"{type(e).__name__}: {e}"))
            return
        finally:
            self.step_started = None
        by_rid = defaultdict(list)
        for ev in events:
            by_rid[ev.request_id].append(ev)
        with self.wake:  # a request whose queue is gone (its client left, an error) is skipped
            targets = [(self.queues.pop(rid, None) if evs[-1].finished else self.queues.get(rid), evs)
                       for rid, evs in by_rid.items()]
        # one callback per event loop and step, not one per request: with thousands of sequences the
        # loop's ready queue would fill with them, and every step of a new request waits behind the queue
        per_loop = defaultdict(list)
        for target, evs in targets:
            if target is not None:
                per_loop[target[0]].append((target[1], evs))
        for loop, items in per_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that event loop is closed
                pass

    @staticmethod
    def _post(loop, queue, item) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the request's event loop is closed
            pass


def _deliver(items) -> None:
    for queue, item in items:
        queue.put_nowait(item)


class _Choice:
    def __init__(self, index: int, rid: str, text: TextStream):
        self.index, self.rid, self.text = index, rid, text
        self.prompt: list[int] = []  # its prompt's token ids
        self.tokens, self.finish_reason = 0, None
        self.logprobs: list = []  # (token_id, logprob, top [(id, logprob)] or None)
        self.prompt_logprobs: list = []  # the same for the prompt's tokens (the first one's logprob None)
        self.text_offset = 0  # completions' logprobs: characters of the token strings so far
        self.echoed = False  # a completions stream has sent the prompt (echo)


class Generation:
    """The engine requests (choices) of one HTTP request, fed by one asyncio queue. ``requests``: per
    prompt (ids, params, one TextStream per sample); the choices are numbered prompt-major. The HTTP
    request is one tenant of the engine's fair admission."""

    def __init__(self, runner: EngineLoop, requests: list[tuple[list[int], SamplingParams, list[TextStream]]],
                 score_only: bool = False):
        """``score_only`` (completions' max_tokens 0 with echo): each choice ends with its first event,
        which brings the prompt's log-probs; the token the engine drew with it is dropped."""
        self.runner, self.requests, self.score_only = runner, requests, score_only
        self.queue: asyncio.Queue = asyncio.Queue()
        self.choices: list[_Choice] = []
        self.tenant = uuid.uuid4().hex

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            for ids, params, texts in self.requests:
                rids = await run_in_threadpool(self.runner.submit, ids, params, self.queue, loop, len(texts),
                                               self.tenant)
                self.choices += [_Choice(len(self.choices) + j, rid, t) for j, (rid, t) in enumerate(zip(rids, texts))]
                for c in self.choices[-len(texts):]:
                    c.prompt = ids
        except BaseException:
            self.close()
            raise

    async def updates(self):
        """Yields (choice, reasoning delta, content delta, new logprob entries) as tokens arrive; a
        choice's last update has its finish_reason set. Raises EngineFailed when the engine failed one."""
        by_rid = {c.rid: c for c in self.choices}
        while any(c.finish_reason is None for c in self.choices):
            item = await self.queue.get()
            if isinstance(item, Exception):
                raise item
            c = by_rid[item[0].request_id]
            if c.finish_reason is not None:
                continue  # events after a stop string ended it
            if item[-1].finish_reason == "error":
                c.finish_reason = "error"
                raise EngineFailed(item[-1].error or "the engine failed this request")
            first = next((e for e in item if e.prompt_logprobs is not None), None)
            if first is not None:
                tops = first.prompt_top_logprobs or [None] * len(first.prompt_logprobs)
                c.prompt_logprobs = list(zip(c.prompt, first.prompt_logprobs, tops))
            if self.score_only:
                c.finish_reason = "length"
                if not item[-1].finished:
                    self.runner.abort(c.rid)
                yield c, "", "", []
                continue
            ids = [e.token_id for e in item if e.token_id is not None]
            c.tokens += len(ids)
            lps = [(e.token_id, e.logprob, e.top_logprobs) for e in item if e.logprob is not None]
            c.logprobs += lps
            reasoning, content = c.text.add(ids)
            if c.text.stopped:
                c.finish_reason = "stop"
                self.runner.abort(c.rid)
            elif item[-1].finished:
                c.finish_reason = item[-1].finish_reason
                r2, c2 = c.text.finish()
                reasoning, content = reasoning + r2, content + c2
            yield c, reasoning, content, lps

    def close(self) -> None:
        """Abort what is still running (client gone, error, cancelled)."""
        for c in self.choices:
            if c.finish_reason is None:
                c.finish_reason = "abort"
                self.runner.abort(c.rid)

    __del__ = close  # a stream whose body never ran (client gone before the first chunk)

    def usage(self) -> P.Usage:
        prompt = sum(len(ids) for ids, _, _ in self.requests)  # n choices share a prompt
        completion = sum(c.tokens for c in self.choices)
        return P.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


# ---- the app -----------------------------------------------------------------------------------
class _BodyLimit:
    """A 413 for a request body over ``limit`` bytes: a declared Content-Length before anything is read,
    a chunked body as it arrives (the endpoint's body read raises; the handlers answer OpenAI style)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    def _error(self, n: str) -> str:
        return f"the request body has {n} bytes; this server accepts at most {self.limit} (Limits.max_body_bytes)"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        n = dict(scope["headers"]).get(b"content-length", b"")
        if n.isdigit() and int(n) > self.limit:
            e = APIError(413, self._error(n.decode()), code="body_too_large")
            return await e.response()(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            m = await receive()
            if m["type"] == "http.request":
                seen += len(m.get("body", b""))
                if seen > self.limit:
                    raise StarletteHTTPException(413, self._error(f"more than {self.limit}"))
            return m

        await self.app(scope, counted, send)


def create_app(engine, tokenizer, model_name: str = "minke", api_key: str | None = None,
               limits: Limits | None = None, stuck_after: float = 120.0) -> FastAPI:
    """The FastAPI app over ``engine`` (minke.inference.engine.Engine); its lifespan runs the engine thread."""
    limits = limits or Limits()
    runner = EngineLoop(engine, stuck_after=stuck_after)
    context = engine.context
    eos_ids = {*engine.eos_ids, tokenizer.eos_id} - {None}
    decode = tokenizer.decode
    created = int(time.time())
    key = None if api_key is None else api_key.encode()

    @asynccontextmanager
    async def lifespan(app):
        runner.start()
        try:
            yield
        finally:
            runner.stop()

    app = FastAPI(title="minke", lifespan=lifespan)
    app.state.engine_loop = runner
    app.add_middleware(_BodyLimit, limit=limits.max_body_bytes)

    # ---- errors, OpenAI style
    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        err = e.errors()[0]
        if err.get("type") == "json_invalid":
            return APIError(400, f"could not parse the JSON body of the request: {err.get('msg')}").response()
        # the field's path, without pydantic's union-branch tags ("str", "list[int]", "function-after[…]")
        loc = [str(x) for x in err.get("loc", ()) if x != "body" and x not in ("str", "int", "float", "bool")]
        param = ".".join(x for x in loc if "[" not in x) or None
        msg = str(err.get("msg", "invalid request")).removeprefix("Value error, ")
        got = f" (got {repr(err['input'])[:80]})" if param and not isinstance(err.get("input", {}), dict) else ""
        return APIError(400, f"{param}: {msg}{got}" if param else msg, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        code = {404: "not_found", 413: "body_too_large"}.get(e.status_code)
        return APIError(e.status_code, str(e.detail), code=code).response()

    @app.exception_handler(Exception)
    async def _crash(request, e: Exception):
        log.exception("request failed")
        return APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error").response()

    def authorize(request: Request) -> None:
        if key is None:
            return
        given = request.headers.get("authorization", "")
        # compare bytes: a str with non-ASCII characters makes compare_digest raise (a 500, not a 401);
        # header values arrive decoded as latin-1, so encoding back gives the bytes the client sent
        token = given[7:].strip().encode("latin-1") if given[:7].lower() == "bearer " else b""
        if not token or not secrets.compare_digest(token, key):
            raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    # ---- request → engine requests
    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{model_name}'.",
                           param="model", code="model_not_found")

    def check_prompt(ids: list[int], param: str) -> None:
        if len(ids) >= context:
            raise APIError(400, f"This model's maximum context length is {context} tokens, but the {param} "
                                f"has {len(ids)} tokens (one position must remain to generate).",
                           param=param, code="context_length_exceeded")

    per_token = max_token_bytes(tokenizer)

    def check_text(texts: list[str], param: str) -> None:
        """Before tokenizing: a text of B bytes has at least B / per_token tokens (byte-level BPE), so a
        text far beyond the context is refused without spending seconds of CPU on it."""
        if per_token is None:
            return
        for t in texts:
            least = len(t.encode("utf-8", "replace")) // per_token
            if least >= context:
                raise APIError(400, f"This model's maximum context length is {context} tokens, but the {param} "
                                    f"has at least {least} tokens ({len(t)} characters).",
                               param=param, code="context_length_exceeded")

    def check_limits(req, prompts: int) -> None:
        def over(param, msg):
            raise APIError(400, f"{param}: {msg}", param=param, code="limit_exceeded")

        if prompts > limits.max_prompts:
            over("prompt", f"{prompts} prompts in one request; this server accepts at most {limits.max_prompts} "
                           f"(Limits.max_prompts)")
        if req.n > limits.max_n:
            over("n", f"n = {req.n}; this server accepts at most {limits.max_n} (Limits.max_n)")
        if prompts * req.n > limits.max_sequences:
            over("n", f"{prompts} prompts x n = {req.n} is {prompts * req.n} sequences; this server accepts at "
                      f"most {limits.max_sequences} per request (Limits.max_sequences)")
        long = next((s for s in req.stop if len(s) > limits.max_stop_chars), None)
        if long is not None:
            over("stop", f"a stop string of {len(long)} characters; at most {limits.max_stop_chars} "
                         f"(Limits.max_stop_chars)")

    def sampling(req, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None = None) -> SamplingParams:
        # with n > 1 the engine seeds sample j with seed + j; the eos stops unless ignore_eos (vLLM)
        stop_ids = set(req.stop_token_ids or ()) | (set() if req.ignore_eos else eos_ids)
        return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                              top_k=req.top_k, seed=None if req.seed is None else req.seed % 2**63,
                              stop_token_ids=sorted(stop_ids), min_tokens=min(req.min_tokens, max_tokens),
                              repetition_penalty=req.repetition_penalty, logprobs=logprobs is not None,
                              top_logprobs=logprobs or 0, prompt_logprobs=prompt_logprobs)

    async def start(requests, param: str, score_only: bool = False) -> Generation:
        gen = Generation(runner, requests, score_only)
        try:
            await gen.start()
        except ValueError as e:  # the engine's own checks (prompt ids, cache size, params)
            msg = str(e)
            field = msg.split(":")[0].removeprefix("SamplingParams.")
            raise APIError(400, msg, param=param if field == "prompt_ids" else field) from None
        return gen

    # ---- endpoints
    if PAGE.exists():
        @app.get("/", include_in_schema=False)
        async def page():
            return FileResponse(PAGE)

    @app.get("/health")
    async def health():
        status, why = runner.health()
        body = {"status": status, "running": len(engine.running), "waiting": len(engine.waiting),
                "failed_requests": engine.stats.failed_requests, "loop_errors": runner.loop_errors}
        if why:
            body["reason"] = why
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    @app.get("/metrics")
    async def metrics():
        """The engine's counters since it started, as JSON (EngineStats: prefill and generated tokens,
        preemptions, prefix-cache figures…; benchmarks/serve.py reads its deltas), and the pool now."""
        return {**engine.stats.as_dict(), "running": len(engine.running), "waiting": len(engine.waiting),
                "num_blocks": engine.cache.num_blocks, "free_blocks": engine.cache.num_free_blocks}

    @v1.get("/models")
    async def models():
        return P.ModelList(data=[P.ModelCard(id=model_name, created=created, max_model_len=context)])

    def chat_ids(messages: list[dict]) -> tuple[list[int], str]:
        try:
            text = tokenizer.apply_chat_template(messages)
        except Exception as e:  # the template's raise_exception, or a template error
            raise APIError(400, f"messages: the chat template rejected them: {e}", param="messages") from None
        return tokenizer.encode(text), text

    @v1.post("/chat/completions")
    async def chat(req: P.ChatCompletionRequest, request: Request):
        check_model(req.model)
        check_limits(req, 1)
        messages = req.template_messages()
        check_text(["".join(m["content"] for m in messages)], "messages")
        ids, text = await run_in_threadpool(chat_ids, messages)  # never on the event loop
        check_prompt(ids, "messages")
        think = text.rstrip().endswith(THINK)
        max_tokens = req.max_completion_tokens or req.max_tokens or context  # the engine caps at the context
        top = (req.top_logprobs or 0) if req.logprobs else None
        gen = await start([(ids, sampling(req, max_tokens, top),
                            [TextStream(decode, req.stop, think) for _ in range(req.n)])], "messages")

        def logprobs(entries):
            if not req.logprobs:
                return None
            item = lambda i, lp: {"token": decode([i]), "logprob": lp, "bytes": list(token_bytes(tokenizer, i))}
            return {"content": [{**item(i, lp), "top_logprobs": [item(*t) for t in best or []]}
                                for i, lp, best in entries]}

        rid, model = f"chatcmpl-{uuid.uuid4().hex}", model_name
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            def chunk(choices, usage=None):
                return P.ChatCompletionChunk(id=rid, created=int(time.time()), model=model, choices=choices,
                                             usage=usage)

            async def events():
                for c in gen.choices:
                    yield chunk([P.ChunkChoice(index=c.index, delta=P.Delta(role="assistant", content=""))])
                async for c, reasoning, content, lps in gen.updates():
                    if reasoning:
                        yield chunk([P.ChunkChoice(index=c.index, delta=P.Delta(reasoning_content=reasoning),
                                                   logprobs=logprobs(lps))])
                        lps = []
                    if content or lps:
                        yield chunk([P.ChunkChoice(index=c.index, delta=P.Delta(content=content),
                                                   logprobs=logprobs(lps))])
                    if c.finish_reason:
                        yield chunk([P.ChunkChoice(index=c.index, delta=P.Delta(), finish_reason=c.finish_reason)])
                if include_usage:
                    yield chunk([], gen.usage())

            return sse(gen, events())
        await drain(gen, request)
        messages = [P.AssistantMessage(content=c.text.content, reasoning_content=c.text.reasoning or
                                       ("" if think else None)) for c in gen.choices]
        choices = [P.ChatChoice(index=c.index, message=m, finish_reason=c.finish_reason, logprobs=logprobs(c.logprobs))
                   for c, m in zip(gen.choices, messages)]
        return P.ChatCompletion(id=rid, created=int(time.time()), model=model, choices=choices, usage=gen.usage())

    def encode_prompts(prompts: list) -> list[list[int]]:
        return [q if isinstance(q, list) else tokenizer.encode(q, add_bos=tokenizer.bos_id is not None)
                for q in prompts]

    @v1.post("/completions")
    async def completions(req: P.CompletionRequest, request: Request):
        check_model(req.model)
        p = req.prompt
        prompts = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else p
        check_limits(req, len(prompts))
        check_text([q for q in prompts if isinstance(q, str)], "prompt")
        texts = list(prompts)
        prompts = await run_in_threadpool(encode_prompts, prompts)  # never on the event loop
        for q in prompts:
            check_prompt(q, "prompt")
        # echo: the prompt as sent (token ids: decoded), before each of its choices' text
        echo = [(t if isinstance(t, str) else decode(q)) if req.echo else "" for t, q in zip(texts, prompts)]
        # max_tokens 0 (echo only): the engine draws one token, which the Generation drops (vLLM does the same)
        gen = await start([(q, sampling(req, max(req.max_tokens, 1), req.logprobs,
                                        req.logprobs if req.echo else None),
                            [TextStream(decode, req.stop, split=False) for _ in range(req.n)])
                           for q in prompts], "prompt", score_only=req.max_tokens == 0)

        def logprobs(c: _Choice, entries):
            """OpenAI's legacy logprobs; text_offset counts from the start of the choice's text (the
            echoed prompt's tokens first, as their token strings' lengths)."""
            if req.logprobs is None:
                return None
            toks = [decode([i]) for i, _, _ in entries]
            offsets = []
            for t in toks:
                offsets.append(c.text_offset)
                c.text_offset += len(t)
            return {"tokens": toks, "token_logprobs": [lp for _, lp, _ in entries],
                    "top_logprobs": [None if lp is None else {decode([i]): v for i, v in top or []}
                                     for _, lp, top in entries],
                    "text_offset": offsets}

        def echoed(c: _Choice, content: str, entries: list) -> tuple[str, list]:
            """A choice's text and logprob entries with the prompt in front, the first time (echo)."""
            if not req.echo or c.echoed:
                return content, entries
            c.echoed = True
            return echo[c.index // req.n] + content, c.prompt_logprobs + entries

        rid, model = f"cmpl-{uuid.uuid4().hex}", model_name
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            async def events():
                async for c, _, content, lps in gen.updates():
                    content, lps = echoed(c, content, lps)
                    if content or lps or c.finish_reason:
                        yield P.Completion(id=rid, created=int(time.time()), model=model, choices=[
                            P.CompletionChoice(index=c.index, text=content, finish_reason=c.finish_reason,
                                               logprobs=logprobs(c, lps))])
                if include_usage:
                    yield P.Completion(id=rid, created=int(time.time()), model=model, choices=[], usage=gen.usage())

            return sse(gen, events())
        await drain(gen, request)
        whole = [echoed(c, c.text.content, c.logprobs) for c in gen.choices]
        return P.Completion(id=rid, created=int(time.time()), model=model, usage=gen.usage(), choices=[
            P.CompletionChoice(index=c.index, text=text, finish_reason=c.finish_reason,
                               logprobs=logprobs(c, lps)) for c, (text, lps) in zip(gen.choices, whole)])

    app.include_router(v1)
    return app


async def _disconnected(request: Request) -> None:
    """Returns when the client hangs up (the body has been read: the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def drain(gen: Generation, request: Request | None = None) -> None:
    """Run a non-streaming generation to its end; abort it when the client disconnects first."""
    async def consume():
        async for _ in gen.updates():
            pass

    work = asyncio.ensure_future(consume())
    gone = asyncio.ensure_future(_disconnected(request)) if request is not None else None
    try:
        done, _ = await asyncio.wait({work} | ({gone} if gone else set()), return_when=asyncio.FIRST_COMPLETED)
        if work not in done:  # the client is gone: nobody will read the answer
            gen.close()
            raise APIError(499, "the client closed the connection; the request was aborted", code="client_closed")
        work.result()
    except EngineFailed as e:
        raise APIError(500, f"generation failed: {e}", type="server_error") from None
    except APIError:
        raise
    except Exception as e:
        raise APIError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error") from None
    finally:
        for t in (work, gone):
            if t is not None and not t.done():
                t.cancel()
        gen.close()


def sse(gen: Generation, chunks) -> StreamingResponse:
    """Server-sent events; the generation is aborted if the client goes away (the stream is cancelled)."""
    async def body():
        try:
            async for c in chunks:
                yield f"data: {c.model_dump_json()}\n\n"
        except Exception as e:
            log.exception("stream failed")
            err = P.ErrorResponse(error=P.ErrorBody(message=f"generation failed: {e}", type="server_error"))
            yield f"data: {err.model_dump_json()}\n\n"
        finally:
            gen.close()
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


# ---- `minke serve` -----------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    from ..inference.generate import add_model_args

    p = argparse.ArgumentParser(prog="minke serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    d = Limits()
    # ---- server
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/* (visible in ps: prefer --api-key-file "
                        "or the MINKE_API_KEY environment variable)")
    p.add_argument("--api-key-file", default=None, help="read the API key from this file (its first line)")
    p.add_argument("--name", default=None, help="the model name clients send (default: the directory's name)")
    p.add_argument("--max-batch", type=int, default=32, help="sequences decoded together at most")
    p.add_argument("--max-prefill-tokens", type=int, default=8192,
                   help="prompt tokens prefilled per engine step; longer prompts are prefilled in chunks "
                        "between decode steps")
    p.add_argument("--no-prefix-cache", action="store_true",
                   help="turn off automatic prefix caching (every prompt is prefilled in full)")
    p.add_argument("--stuck-after", type=float, default=120.0,
                   help="/health answers 503 when one engine step has run longer than this many seconds")
    p.add_argument("--log-level", default="info", help="uvicorn log level")
    # ---- limits per request
    p.add_argument("--max-prompts", type=int, default=d.max_prompts, help="prompts in one /v1/completions request")
    p.add_argument("--max-n", type=int, default=d.max_n, help="samples per prompt (n)")
    p.add_argument("--max-sequences", type=int, default=d.max_sequences, help="prompts x n in one request")
    p.add_argument("--max-stop-chars", type=int, default=d.max_stop_chars, help="characters in one stop string")
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, help="bytes in one request body")
    return p


def api_key(a: argparse.Namespace) -> str | None:
    """The key from --api-key, else --api-key-file, else $MINKE_API_KEY; None: no key required."""
    if a.api_key is not None and a.api_key_file is not None:
        raise SystemExit("minke serve: give --api-key or --api-key-file, not both")
    if a.api_key_file is not None:
        try:
            lines = Path(a.api_key_file).read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise SystemExit(f"minke serve: --api-key-file {a.api_key_file}: {e.strerror}") from None
        key = lines[0].strip() if lines else ""
        if not key:
            raise SystemExit(f"minke serve: --api-key-file {a.api_key_file}: the file's first line is empty")
        return key
    if a.api_key is not None:
        return a.api_key
    return os.environ.get("MINKE_API_KEY") or None


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    from ..inference.generate import open_model

    a = _parser().parse_args(argv)
    key = api_key(a)
    engine, tokenizer, name = open_model(a, max_batch=a.max_batch, max_prefill_tokens=a.max_prefill_tokens,
                                         prefix_cache=not a.no_prefix_cache)
    limits = Limits(max_prompts=a.max_prompts, max_n=a.max_n, max_sequences=a.max_sequences,
                    max_stop_chars=a.max_stop_chars, max_body_bytes=a.max_body_bytes)
    app = create_app(engine, tokenizer, model_name=a.name or name, api_key=key, limits=limits,
                     stuck_after=a.stuck_after)
    print(f"minke serve: model '{a.name or name}' on http://{a.host}:{a.port}/v1 "
          f"(context {engine.context}, max batch {a.max_batch}, {engine.device}, {engine.dtype}"
          f"{', API key required' if key else ''})", flush=True)
    uvicorn.run(app, host=a.host, port=a.port, log_level=a.log_level)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())

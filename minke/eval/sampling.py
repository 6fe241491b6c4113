"""k completions per problem — the one place evaluation and rejection sampling draw responses, from
minke's engine in-process or from any OpenAI-compatible server.

Seeds: problem i's request has seed ``seed + i*k`` and its j-th sample ``seed + i*k + j`` (the engine's
n > 1 contract and minke serve's ``n`` both give choice j the request seed + j), so a run is
reproducible and the server path draws exactly what the in-process path draws.

Server path (``OpenAIBackend``): POST ``/v1/completions`` with the prompt TEXT that the local
tokenizer renders for the chosen format (the chat template included), ``n = k``. We use the plain
completions endpoint rather than chat so that the prompt is byte-identical to the in-process one for
every format (r1-zero and base have no chat form) and the server applies no template of its own.
The leading bos token text is left off, because completions servers (minke serve, vLLM) add bos
themselves when tokenizing a text prompt. The server must therefore serve a model with the same
tokenizer/template as ``--model`` (the directory is read for its tokenizer only).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

from ..data.prompts import completion_text, prompt_ids, prompt_text
from ..tasks import Problem


@dataclass
class Response:
    text: str  # what the model wrote after the prompt (the prompt's "<think>\n" not included)
    finish_reason: str | None  # "stop" | "length"
    tokens: float | None = None  # completion tokens, when known (a server gives a request's mean)


class EngineBackend:
    """In-process: the engine's batched generate over all problems at once."""

    def __init__(self, engine, tok):
        self.engine, self.tok = engine, tok

    def complete(self, problems: Sequence[Problem], fmt: str, n: int, params: list) -> list[list[Response]]:
        prompts = [prompt_ids(self.tok, p, fmt) for p in problems]
        outs = self.engine.generate(prompts, params, n=n)  # each prompt prefilled once, child j: seed + j
        res = [Response(completion_text(self.tok, c.token_ids, c.finish_reason), c.finish_reason, len(c.token_ids))
               for c in outs]
        return [res[i * n:(i + 1) * n] for i in range(len(problems))]


class OpenAIBackend:
    """Any OpenAI-compatible server's /v1/completions; ``concurrency`` requests in flight so the
    server can batch them."""

    def __init__(self, base_url: str, tok, model: str | None = None, api_key: str | None = None,
                 concurrency: int = 8, timeout: float = 600.0, client=None):
        import httpx

        self.tok = tok
        self.url = base_url.rstrip("/")
        if not self.url.endswith("/v1"):
            self.url += "/v1"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = client or httpx.Client(headers=headers, timeout=timeout)
        self.concurrency = concurrency
        self.model = model or self._first_model()

    def _request(self, method: str, path: str, **kw) -> dict:
        import httpx

        try:
            r = self.http.request(method, self.url + path, **kw)
        except httpx.HTTPError as e:
            raise RuntimeError(f"{self.url}{path}: request failed: {e}") from None
        if r.status_code != 200:
            try:
                msg = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                msg = r.text[:500]
            raise RuntimeError(f"{self.url}{path}: HTTP {r.status_code}: {msg}")
        try:
            return r.json()
        except json.JSONDecodeError:
            raise RuntimeError(f"{self.url}{path}: the reply is not JSON: {r.text[:200]!r}") from None

    def _first_model(self) -> str:
        data = self._request("GET", "/models").get("data") or []
        if not data:
            raise RuntimeError(f"{self.url}/models lists no model; pass --api-model")
        return data[0]["id"]

    def _prompt(self, problem: Problem, fmt: str) -> str:
        text = prompt_text(self.tok, problem, fmt)
        bos = self.tok.decode([self.tok.bos_id]) if self.tok.bos_id is not None else ""
        return text[len(bos):] if bos and text.startswith(bos) else text

    def _one(self, problem: Problem, fmt: str, n: int, params) -> list[Response]:
        body = {"model": self.model, "prompt": self._prompt(problem, fmt), "n": n,
                "max_tokens": params.max_tokens, "temperature": params.temperature, "top_p": params.top_p}
        if params.seed is not None:
            body["seed"] = params.seed
        out = self._request("POST", "/completions", json=body)
        choices = sorted(out.get("choices") or [], key=lambda c: c.get("index", 0))
        if len(choices) != n:
            raise RuntimeError(f"{self.url}/completions returned {len(choices)} choices for n={n}")
        # usage counts the request's n choices together: each gets the mean, so mean lengths are exact
        used = (out.get("usage") or {}).get("completion_tokens")
        return [Response(c.get("text") or "", c.get("finish_reason"), None if used is None else used / n)
                for c in choices]

    def complete(self, problems: Sequence[Problem], fmt: str, n: int, params: list) -> list[list[Response]]:
        with ThreadPoolExecutor(max_workers=max(1, self.concurrency)) as pool:
            return list(pool.map(lambda ip: self._one(ip[1], fmt, n, params[ip[0]]), enumerate(problems)))


def backend_for(model, tok, max_batch: int = 32):
    """An engine backend for a model or an Engine; a backend is returned unchanged."""
    if hasattr(model, "complete"):
        return model
    from ..inference.engine import Engine

    engine = model if isinstance(model, Engine) else Engine(model, max_batch=max_batch, decode_fn=tok.decode)
    return EngineBackend(engine, tok)


def sample_responses(backend, tok, problems: Sequence[Problem], k: int, temperature: float, top_p: float,
                     max_tokens: int, fmt: str, seed: int = 0, chunk: int | None = None,
                     progress=None) -> list[list[Response]]:
    """k responses per problem (problem-major). ``chunk`` problems per backend call (None: all at
    once); ``progress(done, total)`` is called after each chunk."""
    from ..inference.sampling import SamplingParams

    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    eos = getattr(tok, "eos_id", None)  # None: the backend's own stop tokens
    stop = None if eos is None else [eos]
    params = [SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                             seed=(seed + i * k) % 2**63, stop_token_ids=stop).validate()
              for i in range(len(problems))]
    chunk = chunk or max(1, len(problems))
    out: list[list[Response]] = []
    for s in range(0, len(problems), chunk):
        out += backend.complete(problems[s:s + chunk], fmt, k, params[s:s + chunk])
        if progress:
            progress(len(out), len(problems))
    return out

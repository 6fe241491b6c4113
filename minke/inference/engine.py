"""The inference engine: the one generation path (RL rollouts, evaluation, chat and the server all call
it). It knows token ids, not text.

- Prefill runs in MLA's MHA mode, decode in the absorbed MQA mode over a paged latent cache
  (paged.py: c_kv + k_pe only, fixed-size blocks, a block table per sequence, one free pool).
- Continuous batching: requests join (``add_request``) and leave (finish, ``abort``) between steps.
  ``step()`` (a) builds one prefill forward within ``max_prefill_tokens`` padded tokens: first the
  next chunk of each prompt being prefilled in chunks, then waiting requests while a batch row and
  enough free blocks (prompt + lookahead) remain, and (b) runs one batched decode forward for every
  running sequence (the just-prefilled ones included). A prompt longer than the budget left is
  prefilled in chunks over several steps (MHA mode over the cached prefix), so running sequences
  keep decoding every step (with speculative decoding a prompt is prefilled whole, alone if need be).
- Fair admission: every request has a tenant (``add_request(..., tenant=)``; the server uses one per
  HTTP request; default: the request, or the group, itself). Tenants take turns, those not yet served
  first, then the least recently served, FCFS within a tenant (``_Waiting``), so a request of 6,400
  sequences does not starve a small one. A running sequence that needs a block when the pool is empty
  preempts a part-prefilled prompt, else the newest running request, back to the head of the queue
  (its blocks freed; it is recomputed from prompt + generated tokens when re-admitted, with its random
  stream intact, so preemption does not change its output).
- Failures stay with their request: a forward that raises is retried over halves of its rows until
  the row that raises fails alone (finish_reason "error", ``Event.error``); a row whose logits are not
  finite fails alone (sampling.py); a fault outside a forward fails the in-flight batch; ``step()``
  itself does not raise.
- Parallel sampling (``n > 1``, vLLM's fork): the n samples of a prompt form a group whose prompt is
  prefilled once, as one row of the prefill batch, under the group's own cache entry; each child then
  forks it (shares its blocks, copying the partly filled last one before writing into it, paged.py)
  and draws its first token from the stored last-position logits with its own generator. Child j runs
  with seed ``params.seed + j``, so a group gives exactly the tokens of n separate requests seeded so.
  Children are admitted as batch rows allow (a group larger than the free rows forks over several
  steps); the group's entry holds the prompt's blocks until its last child has forked. After the fork
  a child is an ordinary request: it may be preempted (recomputed alone) or aborted on its own.
- The engine holds no copy or derivative of the weights (the absorbed MLA matrices are views taken
  at every forward; decode's packed GEMM weights, kernels/linear.py, are re-packed when a weight's
  version counter moves), so a trainer updating the model in place is seen by the next step.
- Sampling per request (sampling.py), with per-request generators: a request's tokens do not depend
  on its batch mates. Stop token ids (default: the model's eos) end a request with the stop token as
  its last id; stop strings need ``decode_fn`` and end it on the token that completes the string
  (the text layer trims the text; ``stop_reason`` says which string).
- With ``speculative=True`` decode steps draft with the MTP module and verify (speculative.py).
- Prefix caching (vLLM's automatic prefix caching; on unless ``prefix_cache=False``): a sequence's full
  blocks whose latents are final are published in the paged cache under the hash of their token
  prefix, after its prefill and when it finishes or is preempted; an admitted request (or a group's
  prompt, or a preempted request coming back) adopts the longest run of cached blocks of its tokens,
  read-only, and prefills only the rest (at least its last token, whose logits it needs). Cached blocks
  nobody holds stay until the pool needs them, evicted least recently released first; a block in use
  is never evicted, and a cached block is copied before anything writes into it. With speculative
  decoding a block's key also holds the token after it (its MTP entry read it). A request asking for
  prompt log-probs prefills every prompt token. The cache follows the weights: an in-place change of
  any parameter or buffer (an optimizer step, load_state_dict) is seen by its version counter at the
  next admission and drops every cached prefix (``reset_prefix_cache`` for any other change).
- Thread safety: one re-entrant lock guards every public method, so a server can drive ``step()`` from
  one background thread while request threads call ``add_request`` / ``abort``.

Shape legend: B rows, T new tokens per row, V vocab, D hidden.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Sequence

import torch

from ..kernels.linear import DecodeWeights
from ..model.layers import MLP, RMSNorm
from ..model.moe import Experts, Gate
from ..text import first_stop
from . import paged, sampling, speculative as spec
from .dsa_cache import DSAPagedCache
from .paged import PagedLatentCache, bytes_per_token
from .sampling import SamplingParams

DEFAULT_CACHE_BYTES = 1 << 30  # when neither num_blocks nor cache_bytes is given (capped by need)
log = logging.getLogger("minke.engine")


@dataclass
class Event:
    """One streamed token (``token_id`` None on a final event that carries no token: abort, or a
    sequence that outgrew the cache)."""
    request_id: object
    token_id: int | None
    logprob: float | None = None
    top_logprobs: list | None = None  # [(token_id, logprob)] most likely first
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    error: str | None = None  # why the request failed (finish_reason "error")
    # on a request's first token only, when SamplingParams.prompt_logprobs is set (see Completion)
    prompt_logprobs: list | None = None
    prompt_top_logprobs: list | None = None


@dataclass
class Completion:
    request_id: object
    prompt_ids: list
    token_ids: list  # a stop token, when one ended it, is the last id
    finish_reason: str
    stop_reason: int | str | None = None
    logprobs: list | None = None  # one float per token
    top_logprobs: list | None = None  # per token: [(token_id, logprob)]
    error: str | None = None  # finish_reason "error": why
    # SamplingParams.prompt_logprobs (vLLM's prompt_logprobs): per prompt token its log-prob given the
    # tokens before it (the first token has none: None), and with prompt_logprobs = N > 0 the N most
    # likely tokens there [(token_id, logprob)] (None for the first token)
    prompt_logprobs: list | None = None
    prompt_top_logprobs: list | None = None


@dataclass
class EngineStats:
    steps: int = 0
    prefills: int = 0
    prefill_tokens: int = 0  # a group's prompt counts once
    prefill_chunks: int = 0  # rows of prefill forwards (a prompt prefilled in chunks counts each chunk)
    max_prefill_batch_tokens: int = 0  # the largest prefill forward, in padded tokens (rows × chunk)
    forks: int = 0  # children of groups started from their prompt's shared prefill
    generated_tokens: int = 0
    decode_forwards: int = 0
    preemptions: int = 0
    draft_proposed: int = 0
    draft_accepted: int = 0
    failed_forwards: int = 0  # forwards (or samplings) that raised; their rows were retried apart or failed
    failed_requests: int = 0
    prefix_queried_tokens: int = 0  # tokens of the rows admitted with a prefix-cache lookup
    prefix_hit_tokens: int = 0  # of those, the tokens found cached (not prefilled)

    @property
    def acceptance_rate(self) -> float | None:
        return self.draft_accepted / self.draft_proposed if self.draft_proposed else None

    @property
    def prefix_hit_rate(self) -> float | None:
        return self.prefix_hit_tokens / self.prefix_queried_tokens if self.prefix_queried_tokens else None

    def as_dict(self) -> dict:
        return {**self.__dict__, "acceptance_rate": self.acceptance_rate, "prefix_hit_rate": self.prefix_hit_rate}


class _Request:
    def __init__(self, rid, prompt, params: SamplingParams, stop_ids, max_new, generator, arrival):
        self.id, self.prompt, self.params = rid, prompt, params
        self.stop_ids, self.max_new, self.gen, self.arrival = stop_ids, max_new, generator, arrival
        self.out: list[int] = []
        self.logprobs = [] if params.logprobs else None
        self.top = [] if params.top_logprobs else None
        self.prompt_lps, self.prompt_top = _prompt_logprob_lists(params)
        self.finish_reason = self.stop_reason = self.error = None
        self.stop_window = 4 * max(map(len, params.stop)) + 4 if params.stop else 0  # ≤ 4 tokens per char
        self.drafts: list[int] = []  # speculative: draft tokens after out[-1]
        self.draft_q: list = []  # their draft distributions (V,) when sampling
        self.draft_logits = None  # the first draft's MTP logits (V,), kept for tests
        self.tenant = rid  # admission takes turns between tenants (engine.add_request)
        self.block_hashes: list[bytes] = []  # prefix-cache hashes of its first full blocks (paged.chain_hashes)
        self.cache_epoch = None  # the engine's prefix-cache epoch when its cache entry began
        self.group: _Group | None = None  # parallel sampling: the child's group
        self.forked = False  # a child that has started from the group's prompt
        self.queued = False  # in engine.waiting

    @property
    def unforked(self) -> bool:
        return self.group is not None and not self.forked

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.out

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Its prompt log-probs are not all computed yet: its prefill must forward every prompt position
        (admission must not start it past cached prefix blocks)."""
        return self.prompt_lps is not None and len(self.prompt_lps) < len(self.prompt)

    def completion(self) -> Completion:
        return Completion(self.id, list(self.prompt), list(self.out), self.finish_reason, self.stop_reason,
                          self.logprobs, self.top, self.error, self.prompt_lps, self.prompt_top)


class _Group:
    """The n samples of one prompt. Its prompt is one row of a prefill batch; the group is its own
    cache key (the prompt's blocks) until the last child forks."""

    def __init__(self, gid, prompt: list[int], children: list[_Request]):
        self.gid, self.prompt, self.children = gid, prompt, children
        self.to_fork = len(children)  # children neither forked nor finished
        self.unfinished = len(children)
        self.held = False  # its prompt is prefilled and in the cache
        self.logits = self.hidden = None  # after the prefill: last position's logits (V,), hidden (D,)
        self.block_hashes: list[bytes] = []  # as _Request's
        self.cache_epoch = None
        self.params = children[0].params  # the children differ in their seeds only
        self.prompt_lps, self.prompt_top = _prompt_logprob_lists(self.params)  # handed to each child at its fork
        for c in children:
            c.group = self

    @property
    def id(self):  # the cache key, as for a request
        return self

    @property
    def tokens(self) -> list[int]:
        return self.prompt

    needs_prompt_logprobs = _Request.needs_prompt_logprobs


class _Waiting:
    """Requests waiting for admission. Preempted ones come first (they ran before; FCFS among them);
    then tenants take turns: tenants not yet served first, in arrival order, then the least recently
    served; FCFS within a tenant. A tenant counts as served while any of its requests is in the engine,
    so a huge request (one tenant) cannot starve a small one behind it, nor jump ahead by refilling."""

    def __init__(self):
        self.preempted: deque[_Request] = deque()
        self.fresh: OrderedDict = OrderedDict()  # tenant → deque of its waiting requests, never served
        self.served: OrderedDict = OrderedDict()  # the same, least recently served first
        self.live: dict = {}  # tenant → its requests in the engine (waiting or not)
        self.n = 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        yield from self.preempted
        for d in itertools.chain(self.fresh.values(), self.served.values()):
            yield from d

    def add(self, r: _Request) -> None:
        """A new request (its tenant's turn comes as described above)."""
        t = r.tenant
        self.live[t] = self.live.get(t, 0) + 1
        d = self.fresh.get(t) if t in self.fresh else self.served.get(t)
        if d is None:
            d = (self.served if self.live[t] > 1 else self.fresh)[t] = deque()  # still live: it was served
        d.append(r)
        r.queued = True
        self.n += 1

    def requeue(self, r: _Request) -> None:
        """A preempted request: ahead of everyone."""
        self.preempted.appendleft(r)
        r.queued = True
        self.n += 1

    def gone(self, r: _Request) -> None:
        """``r`` has finished: its tenant's count drops."""
        t = r.tenant
        self.live[t] -= 1
        if not self.live[t]:
            del self.live[t]

    def head(self, skip=()):
        """(request, the deque it heads) whose turn it is, passing over tenants in ``skip``; (None, None)."""
        if self.preempted:
            return self.preempted[0], self.preempted
        for d in itertools.chain(self.fresh.values(), self.served.values()):
            if d[0].tenant not in skip:
                return d[0], d
        return None, None

    def take(self, d: deque, k: int = 1) -> None:
        """Admit the first k requests of ``d`` (one turn of its tenant, which goes to the back)."""
        for _ in range(k):
            r = d.popleft()
            r.queued = False
        self.n -= k
        if d is not self.preempted:
            t = r.tenant
            (self.fresh if t in self.fresh else self.served).pop(t)
            if d:
                self.served[t] = d

    def remove(self, r: _Request) -> None:
        if r in self.preempted:
            self.preempted.remove(r)
        else:
            table = self.fresh if r.tenant in self.fresh else self.served
            d = table[r.tenant]
            d.remove(r)
            if not d:
                del table[r.tenant]
        r.queued = False
        self.n -= 1


def decode_weights(model) -> DecodeWeights:
    """The laid-out decode weights the engine enters around every decode step (``packed_decode``):
    minke's MLPs, experts, norms and routers, and plain nn.Linear (kernels/linear.py)."""
    return DecodeWeights(model, (Experts,), (MLP,), (RMSNorm,), (Gate,))


class Engine:
    def __init__(self, model, max_batch: int = 8, block_size: int = 16, num_blocks: int | None = None,
                 cache_bytes: int | None = None, device=None, dtype: torch.dtype | None = None,
                 decode_fn: Callable[[list[int]], str] | None = None, speculative: bool = False,
                 num_draft: int = 1, max_prefill_tokens: int = 8192, prefix_cache: bool = True,
                 packed_decode: bool = True):
        """``device``/``dtype`` are the cache's (default: the model's; the model is not moved).
        Cache size: ``num_blocks``, else ``cache_bytes``, else enough for ``max_batch`` full-context
        sequences up to 1 GiB. ``speculative``: MTP drafting of ``num_draft`` tokens per step.
        ``prefix_cache``: reuse cached blocks of earlier requests' token prefixes (module docstring).
        ``packed_decode``: decode steps run the model's GEMMs through weights packed for CPU GEMV
        (kernels/linear.py; False: the model's own forward, the reference)."""
        cfg = model.config
        p = next(model.parameters())
        self.model = model
        self.config = cfg
        self.device = torch.device(device) if device is not None else p.device
        self.dtype = dtype or p.dtype
        self.decode_fn = decode_fn
        for name, v in (("max_batch", max_batch), ("block_size", block_size), ("num_draft", num_draft),
                        ("max_prefill_tokens", max_prefill_tokens)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"Engine: {name} must be an integer >= 1, got {v!r}")
        if speculative and not len(model.mtp):
            raise ValueError("Engine: speculative=True needs an MTP module (num_nextn_predict_layers >= 1)")
        self.max_batch, self.max_prefill_tokens = max_batch, max_prefill_tokens
        self.prefix_cache = bool(prefix_cache)
        self._epoch = 0  # bumped whenever the cached prefixes are dropped (the weights changed)
        self._weights = None  # the weights' version fingerprint the cached prefixes were computed with
        self._tensors = None  # the model's parameters and buffers, collected once (walking the modules is slow)
        self.speculative, self.num_draft = speculative, num_draft
        # cache slots a running sequence must hold beyond its length before a decode step
        self.lookahead = 2 * num_draft if speculative else 1
        self.context = cfg.max_position_embeddings
        self.vocab_size = cfg.vocab_size
        eos = cfg.eos_token_id
        self.eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

        block_bytes = bytes_per_token(cfg, self.dtype, mtp=speculative) * block_size
        if num_blocks is None:
            if cache_bytes is None:
                need = -(-(self.context + self.lookahead) // block_size) * max_batch
                num_blocks = max(1, min(need, DEFAULT_CACHE_BYTES // block_bytes))
            else:
                num_blocks = int(cache_bytes) // block_bytes
                if num_blocks < 1:
                    raise ValueError(f"Engine: cache_bytes={cache_bytes} is less than one block ({block_bytes} bytes)")
        cache_cls = DSAPagedCache if cfg.dsa else PagedLatentCache  # DSA: indexer keys beside the latents
        self.cache = cache_cls(cfg, num_blocks, block_size, self.dtype, self.device, mtp=speculative)

        self.lock = threading.RLock()
        self.waiting = _Waiting()
        self.running: list[_Request] = []
        self.prefilling: list = []  # requests and groups part-way through a chunked prefill (admitted)
        self.requests: dict = {}
        self.groups: dict = {}  # group id → _Group, while any child is unfinished
        self._pending: list[Event] = []  # final events of aborted requests, returned by the next step()
        self._ids = itertools.count()
        self._arrivals = itertools.count()
        self.stats = EngineStats()
        self.decode_weights = decode_weights(model) if packed_decode else contextlib.nullcontext()

    # ---- requests ------------------------------------------------------------------------------
    def _make_request(self, prompt_ids, params: SamplingParams | None, request_id) -> _Request:
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        params.validate(self.vocab_size)
        if params.stop and self.decode_fn is None:
            raise ValueError("SamplingParams.stop: stop strings need text; build the engine with "
                             "Engine(..., decode_fn=tokenizer.decode) or use stop_token_ids")
        if isinstance(prompt_ids, torch.Tensor):
            prompt_ids = prompt_ids.flatten().tolist()
        prompt = list(prompt_ids)
        if not prompt:
            raise ValueError("prompt_ids: the prompt is empty (give at least one token, e.g. bos)")
        if not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in prompt):
            bad = next(t for t in prompt if not (isinstance(t, int) and 0 <= t < self.vocab_size))
            raise ValueError(f"prompt_ids: {bad!r} is not a token id in [0, vocab_size={self.vocab_size})")
        P = len(prompt)
        if P >= self.context:
            raise ValueError(f"prompt_ids: the prompt has {P} tokens but the model's context "
                             f"(max_position_embeddings) is {self.context} tokens, and one position must "
                             f"remain to generate")
        if P + self.lookahead > self.cache.num_slots:
            raise ValueError(f"prompt_ids: the prompt has {P} tokens (+{self.lookahead} to decode) but the "
                             f"whole cache holds {self.cache.num_slots} tokens ({self.cache.num_blocks} "
                             f"blocks of {self.cache.block_size}); raise num_blocks or cache_bytes")
        if self.speculative and (params.min_tokens or params.repetition_penalty != 1):
            raise ValueError("SamplingParams.min_tokens / repetition_penalty: not supported with speculative "
                             "decoding (the drafts and the verify do not run the logits processors)")
        if params.stop_token_ids is not None:
            stop_ids = set(params.stop_token_ids)
        else:
            stop_ids = set() if params.ignore_eos else set(self.eos_ids)
        rid = next(self._ids) if request_id is None else request_id
        return _Request(rid, prompt, params, stop_ids, min(params.max_tokens, self.context - P),
                        params.generator(self.device), next(self._arrivals))

    def _enqueue(self, r: _Request) -> None:
        if r.id in self.requests or r.id in self.groups:
            raise ValueError(f"request_id {r.id!r} is already in use")
        self.requests[r.id] = r
        self.waiting.add(r)

    def _make_group(self, prompt_ids, params: SamplingParams | None, gid, n: int) -> _Group:
        """n children ``(gid, j)``; child j's seed is ``params.seed + j`` (fresh random seeds when None)."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        gid = next(self._ids) if gid is None else gid
        kids = [self._make_request(prompt_ids, params if params.seed is None
                                   else replace(params, seed=(params.seed + j) % 2**63), (gid, j))
                for j in range(n)]
        for k in kids:
            k.tenant = gid
        return _Group(gid, kids[0].prompt, kids)

    def _enqueue_group(self, g: _Group) -> None:
        if g.gid in self.requests or g.gid in self.groups:
            raise ValueError(f"request_id {g.gid!r} is already in use")
        for c in g.children:
            if c.id in self.requests:
                raise ValueError(f"request_id {c.id!r} is already in use")
        self.groups[g.gid] = g
        for c in g.children:
            self._enqueue(c)

    def add_request(self, prompt_ids: Sequence[int], params: SamplingParams | None = None,
                    request_id=None, n: int = 1, tenant=None):
        """Queue a request; returns its id (an int unless ``request_id`` is given). Thread-safe.

        ``n > 1`` queues a group of n samples sharing the prompt's prefill and returns the children's
        ids ``[(request_id, 0), …, (request_id, n - 1)]`` (``request_id`` generated when None); events
        carry the child ids; ``abort(request_id)`` aborts every child, ``abort((request_id, j))`` one.
        ``tenant``: who the request is for (e.g. one HTTP request's prompts): admission takes turns between
        tenants (default: the request, or the group, is its own)."""
        _check_n(n)
        with self.lock:
            if n == 1:
                r = self._make_request(prompt_ids, params, request_id)
                r.tenant = r.id if tenant is None else tenant
                self._enqueue(r)
                return r.id
            g = self._make_group(prompt_ids, params, request_id, n)
            for c in g.children:
                c.tenant = g.gid if tenant is None else tenant
            self._enqueue_group(g)
            return [c.id for c in g.children]

    def abort(self, request_id) -> bool:
        """Drop a request now, freeing its blocks; the next ``step()`` returns its final "abort" event.
        False when it is unknown or already finished. Thread-safe."""
        with self.lock:
            g = self.groups.get(request_id)
            if g is not None:  # the parent: every child still unfinished
                for c in list(g.children):
                    if c.finish_reason is None:
                        self._finish(c, "abort", events=self._pending)
                return True
            r = self.requests.get(request_id)
            if r is None:
                return False
            self._finish(r, "abort", events=self._pending)
            return True

    def has_unfinished(self) -> bool:
        with self.lock:
            return bool(self.waiting or self.running or self.prefilling or self._pending)

    # ---- the step ------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[Event]:
        """Admit and prefill what fits, then one batched decode step. Returns this step's events."""
        with self.lock:
            events, self._pending = self._pending, []
            training = self.model.training  # a trainer may share the model (RL): leave its mode as found
            if training:
                self.model.eval()
            try:
                self._admit(events)
                rows = self._make_room(events)
                if rows and self.speculative:
                    try:
                        with self.decode_weights:
                            spec.decode_step(self, events, rows)
                    except Exception as e:  # drafts and cache lengths are half updated: no retry
                        self._failed(rows, e, events)
                elif rows:
                    self._isolate(rows, self._decode, events)
            except Exception as e:  # outside any one forward: the culprit is unknown
                log.exception("engine step failed")
                self._fail_in_flight(e, events)
            finally:
                self.cache._view = None
                if training:
                    self.model.train()
            self.stats.steps += 1
            return events

    # ---- failures: one request must never take down the others ---------------------------------
    def _isolate(self, rows: list, run: Callable, events: list[Event]) -> None:
        """``run(rows, events)``; when it raises, retry each half of the rows apart, down to single rows,
        which then fail alone: a deterministic fault in one row's forward fails that row only. Safe
        because a run commits nothing before its forward and sampling succeeded (cache lengths are
        restored here; a retried sampling row draws from where its generator stopped). A row is a
        request, a group, or a prefill row (row, start, end)."""
        lengths = {q.id: self.cache.lengths.get(q.id) for q in map(_row, rows)}
        try:
            run(rows, events)
        except Exception as e:
            self.stats.failed_forwards += 1
            for sid, n in lengths.items():
                if n is not None and sid in self.cache.lengths:
                    self.cache.lengths[sid] = n
            if len(rows) == 1:
                self._failed([_row(rows[0])], e, events)
                return
            log.warning("engine: a forward over %d rows failed (%s: %s); retrying its halves apart",
                        len(rows), type(e).__name__, e)
            h = len(rows) // 2
            self._isolate(rows[:h], run, events)
            self._isolate([q for q in rows[h:] if self._live(_row(q))], run, events)

    @staticmethod
    def _live(q) -> bool:
        if isinstance(q, _Group):
            return q.held or any(c.finish_reason is None for c in q.children)
        return q.finish_reason is None

    def _failed(self, rows: list, e: BaseException | str, events: list[Event]) -> None:
        """Fail ``rows`` (requests; a group fails every unfinished child) with the error's message."""
        msg = e if isinstance(e, str) else f"{type(e).__name__}: {e}"
        if not isinstance(e, str):
            log.error("engine: failing %d request(s): %s", len(rows), msg)
        for q in rows:
            if isinstance(q, _Group):
                self._release_group(q)
                self._failed([c for c in q.children if c.finish_reason is None], msg, events)
            elif q.finish_reason is None:
                q.error = msg
                self.stats.failed_requests += 1
                self._finish(q, "error", events=events)

    def _fail_in_flight(self, e: BaseException, events: list[Event]) -> None:
        """The step failed outside a forward we can attribute: fail every request that holds cache
        blocks or runs (the in-flight batch), drop held prompts; waiting requests stay queued."""
        self._failed([r for r in list(self.requests.values()) if not r.queued or r.id in self.cache.tables],
                     e, events)
        for g in list(self.groups.values()):
            self._release_group(g)
        self.prefilling = []

    def _admit(self, events: list[Event]) -> None:
        """Build this step's prefill batch within the token budget (``max_prefill_tokens`` padded tokens:
        rows × the longest chunk): first the next chunk of each prompt being prefilled in chunks, then
        waiting requests in turn order (``_Waiting``) while a batch row and free blocks (the whole prompt
        + lookahead) remain. A prompt longer than what the budget leaves is prefilled in chunks over
        several steps, while the running sequences keep decoding (not with speculative decoding: its
        MTP pass needs the whole prompt, which is then prefilled alone). A new row starts past the
        blocks of its tokens the prefix cache holds (``_lookup``); they take no new blocks, only those
        nobody held leave the free count. Then prefill the batch in one forward and fork the admitted
        children of groups whose prompt is in the cache."""
        self._check_weights()
        batch: list[tuple] = []  # (row, start, end): a _Request or a _Group (its prompt once), tokens [start, end)
        forks: list[tuple[_Group, list[_Request]]] = []
        rows = 0  # running rows taken this step (requests and forked children)
        T = 0  # the batch's longest chunk: every row is padded to it
        promised = 0  # free blocks the forks after this prefill will take
        cache, budget, chunkable = self.cache, self.max_prefill_tokens, not self.speculative

        def chunk(m: int) -> int:
            """How many of a row's m remaining tokens this batch can take (0: none)."""
            k = len(batch) + 1
            if not batch:
                return min(m, budget) if chunkable else m
            if k * max(T, m) <= budget:
                return m
            return T if chunkable and k * T <= budget else 0

        def pad(T_new: int) -> int:
            """Blocks the rows already in the batch lack to be padded to T_new."""
            return sum(max(0, cache.blocks_for(s + T_new) - len(cache.tables[q.id])) for q, s, _ in batch)

        def grow(T_new: int) -> None:
            for q, s, _ in batch:
                self._reserve([q.id], s + T_new)

        for q in list(self.prefilling):  # prompts part-way through their prefill go on first
            start = cache.lengths[q.id]
            c = chunk(len(q.tokens) - start)
            T_new = max(T, c)
            if not c or cache.blocks_for(start + T_new) - len(cache.tables[q.id]) + pad(T_new) > cache.num_free_blocks:
                break
            grow(T_new)
            self._reserve([q.id], start + T_new)
            batch.append((q, start, start + c))
            T = T_new
        finishing = {id(q) for q, s, e in batch if e == len(q.tokens)}
        skip = set()  # tenants whose head cannot go this step (its group's prompt is still being prefilled)
        while len(self.running) + self._prefilling_rows() + rows < self.max_batch:
            r, d = self.waiting.head(skip)
            if r is None:
                break
            g = r.group if r.unforked else None
            n = len(r.tokens)
            if g is None and n + self.lookahead > cache.num_slots:  # a preempted request that outgrew the cache
                self._finish(r, "length", events=events)
                continue
            if g is not None and g in self.prefilling and id(g) not in finishing:
                skip.add(r.tenant)
                continue
            prefill = g is None or not (g.held or id(g) in finishing)
            hit = self._lookup(r if g is None else g) if prefill else []  # cached blocks of its prefix
            h = len(hit) * cache.block_size  # its prefill starts there
            held = len(hit) - cache.num_evictable(hit)  # hit blocks someone holds: not in the free count
            c = chunk(n - h) if prefill else 0
            if prefill and not c:
                break  # prefill budget spent: the rest waits for the next step
            T_new = max(T, c)
            avail = cache.num_free_blocks - promised - pad(T_new)
            if g is None:
                # nobody overtakes the head for lack of blocks (no starvation of long prompts)
                if cache.blocks_for(max(n + self.lookahead, h + T_new)) - held > avail:
                    if self._drop_prefixes(batch, forks):
                        continue
                    break
                self._adopt(r, hit)  # first: growing the batch's rows must not evict these
                grow(T_new)
                self._reserve([r.id], max(n + self.lookahead, h + T_new))
                self.waiting.take(d)
                batch.append((r, h, h + c))
                rows += 1
            else:
                kids = list(itertools.takewhile(lambda q: q.group is g and q.unforked, d))
                kids = kids[:self.max_batch - len(self.running) - self._prefilling_rows() - rows]
                parent = cache.blocks_for(max(n, h + T_new)) - held if prefill else 0
                whole = not prefill or c == n - h  # its children fork this step
                k = next((k for k in range(len(kids), 0, -1)
                          if parent + (self._fork_blocks(g, k) if whole else 0) <= avail), 0)
                if not k:
                    if self._drop_prefixes(batch, forks):
                        continue
                    break
                if prefill:
                    self._adopt(g, hit)
                grow(T_new)
                if prefill:
                    self._reserve([g], max(n, h + T_new))
                    batch.append((g, h, h + c))
                if not whole:  # its prompt is prefilled in chunks: the children wait for the last one
                    skip.add(r.tenant)
                    T = T_new
                    continue
                self.waiting.take(d, k)
                forks.append((g, kids[:k]))
                promised += self._fork_blocks(g, k)
                rows += k
            T = T_new
        if batch:
            self._isolate(batch, self._prefill, events)
        for g, kids in forks:
            kids = [c for c in kids if c.finish_reason is None]
            if not kids:
                continue
            if not g.held:  # its prompt's prefill failed (the children were failed with it)
                self._failed(kids, "the shared prompt's prefill failed", events)
                continue
            try:
                self._fork(g, kids, events)
            except Exception as e:  # half-forked: no retry
                self._failed(kids, e, events)

    def _prefilling_rows(self) -> int:
        return sum(not isinstance(q, _Group) for q in self.prefilling)

    def _drop_prefixes(self, batch: list, forks: list) -> bool:
        """When nothing runs or is being admitted, no blocks will come back by waiting: drop the prompts
        groups hold for their unforked children (they are prefilled again when admitted). True if any."""
        if self.running or self.prefilling or batch or forks:
            return False
        held = [g for g in self.groups.values() if g.held]
        for g in held:
            self._release_group(g)
        return bool(held)

    # ---- prefix cache --------------------------------------------------------------------------
    def reset_prefix_cache(self) -> None:
        """Drop every cached prefix: the next requests prefill in full, and the sequences in flight do not
        publish theirs. Needed only after a change to the model that its parameters' and buffers' version
        counters do not show: a parameter or buffer replaced by another tensor, ``.data`` assigned or
        written (in-place updates are detected at the next admission)."""
        with self.lock:
            self.cache.reset_prefix_cache()
            self._epoch += 1

    def _check_weights(self) -> None:
        """Before any lookup: when a parameter or buffer changed in place (its version counter: an
        optimizer step, load_state_dict), the cached latents are stale; drop them, and start a new epoch
        so that sequences computed partly with the old weights never publish. ~10 µs per 200 tensors."""
        if not self.prefix_cache or not self.waiting:
            return
        if self._tensors is None:  # an inference tensor has no version counter (and cannot change outside)
            self._tensors = [t for t in itertools.chain(self.model.parameters(), self.model.buffers())
                             if not t.is_inference()]
        fp = [t._version for t in self._tensors]
        if fp != self._weights:
            if self._weights is not None:
                self.reset_prefix_cache()
            self._weights = fp

    def _hashes(self, q, n_blocks: int) -> list[bytes]:
        """The prefix hashes of q's first ``n_blocks`` full blocks (computed once per request)."""
        if len(q.block_hashes) < n_blocks:
            paged.chain_hashes(q.tokens, self.cache.block_size, q.block_hashes, n_blocks, self.speculative)
        return q.block_hashes[:n_blocks]

    def _lookup(self, q) -> list[int]:
        """The cached blocks q (a request or a group's prompt, about to be prefilled) can start from: the
        longest cached run of its full blocks, leaving at least its last token to prefill (it needs that
        position's logits; speculative: every key holds the token after its block, so also < len). None
        when prefix caching is off or q wants the log-probs of every prompt token."""
        if not self.prefix_cache or getattr(q, "needs_prompt_logprobs", False):
            return []
        return self.cache.cached_prefix(self._hashes(q, (len(q.tokens) - 1) // self.cache.block_size))

    def _adopt(self, q, blocks: list[int]) -> None:
        """q's cache entry begins, with the cached ``blocks`` (its prefix) when there are any."""
        if blocks:
            self.cache.adopt(q.id, blocks)
        q.cache_epoch = self._epoch
        if self.prefix_cache and not getattr(q, "needs_prompt_logprobs", False):
            self.stats.prefix_queried_tokens += len(q.tokens)
            self.stats.prefix_hit_tokens += len(blocks) * self.cache.block_size

    def _publish(self, q) -> None:
        """Publish q's full blocks whose latents are final: below its cache length and, speculative, with
        the token after the block known (its MTP entry at the block's last position read that token), all
        computed in the current epoch."""
        if not self.prefix_cache or q.cache_epoch != self._epoch or q.id not in self.cache.lengths:
            return
        final = min(self.cache.lengths[q.id], len(q.tokens) - self.speculative)
        n = final // self.cache.block_size
        if n:
            self.cache.publish(q.id, self._hashes(q, n))

    def _reserve(self, seqs: list, n_tokens: int) -> None:
        for q in seqs:
            if not self.cache.reserve(q, n_tokens):  # admission counted these blocks as free
                raise RuntimeError(f"engine: no free blocks for {q!r} although admission counted them")

    def _fork_blocks(self, g: _Group, k: int) -> int:
        """Free blocks k children of ``g`` take when they fork: each one its lookahead's new blocks and a
        private copy of the prompt's last block when that block is written (the partial block; for
        speculative decoding the block of the prompt's last position, whose MTP entry is per child),
        except that the last child to fork takes over the group's own blocks."""
        bs, P = self.cache.block_size, len(g.prompt)
        ext = self.cache.blocks_for(P + self.lookahead) - self.cache.blocks_for(P)
        first_write = P - 1 if self.speculative else P
        cow = self.cache.blocks_for(P) - first_write // bs  # 0 or 1
        return k * ext + (k - (k == g.to_fork)) * cow

    def _prefill(self, rows: list[tuple], events: list[Event]) -> None:
        """One MHA-mode forward over each row's tokens [start, end) (its prompt, plus its output when
        recomputing a preempted request; a group's prompt once), over the row's cached history, right-
        padded to the longest chunk: under the causal mask no real token sees the padding, whose cache
        entries are then rolled back. Rows whose prefill is complete draw their first token (requests)
        or keep the last position's logits and hidden state for their children (groups); the others
        wait in ``prefilling`` for their next chunk."""
        lens = [e - s for _, s, e in rows]
        B, T = len(rows), max(lens)
        ids = torch.tensor([q.tokens[s:e] + [0] * (T - e + s) for q, s, e in rows], device=self.device)  # (B, T)
        self.cache.begin([q.id for q, _, _ in rows], T)
        out = self.model(ids, positions=self.cache.positions(T), cache=self.cache, absorb=False, logits=False)
        for i, (q, s, e) in enumerate(rows):
            if q.needs_prompt_logprobs:
                self._prompt_logprobs(q, s, e, out.hidden[i])
        done = [i for i, (q, _, e) in enumerate(rows) if e == len(q.tokens)]
        last = torch.tensor([lens[i] - 1 for i in done], device=self.device, dtype=torch.long)
        h = out.hidden[torch.tensor(done, device=self.device, dtype=torch.long), last]  # (b, D)
        logits = self.model.head(h)  # (b, V): only the finished rows' last positions
        req = [j for j, i in enumerate(done) if not isinstance(rows[i][0], _Group)]
        reqs = [rows[done[j]][0] for j in req]
        toks, lps, tops = self._choose(reqs, logits[req]) if reqs else ([], [], [])
        g = None
        if self.speculative:  # every row is a whole sequence here (no chunks)
            nxt = {done[j]: t for j, t in zip(req, toks)}  # a group's row (or one that failed): a placeholder
            g = spec.prefill_drafts(self, [q for q, _, _ in rows], out.hidden, [nxt.get(i) or 0 for i in range(B)],
                                    lens, draft=[done[j] for j in req], starts=[s for _, s, _ in rows])
        self.cache.advance(T)
        for (q, s, e), n in zip(rows, lens):
            self.cache.truncate(q.id, e)
            whole = len(q.tokens) + (0 if isinstance(q, _Group) else self.lookahead)
            self.cache.shrink(q.id, whole)
        for i in done:
            q = rows[i][0]
            if q in self.prefilling:
                self.prefilling.remove(q)
        for j, i in enumerate(done):
            q = rows[i][0]
            if isinstance(q, _Group):
                q.logits, q.hidden, q.held = logits[j].clone(), h[j].clone(), True
            elif q not in self.running:
                self.running.append(q)
        for q, _, e in rows:
            if e < len(q.tokens) and q not in self.prefilling:
                self.prefilling.append(q)
        if g is not None:
            spec.chain(self, reqs, g)
        self.stats.prefills += len(done)
        self.stats.prefill_chunks += B
        self.stats.prefill_tokens += sum(lens)
        self.stats.max_prefill_batch_tokens = max(self.stats.max_prefill_batch_tokens, B * T)
        for r, t, lp, top in zip(reqs, toks, lps, tops):
            self._append(r, t, lp, top, events)
        for q, _, _ in rows:  # its prefix is cached for the requests after it (a finished one published already)
            self._publish(q)

    def _prompt_logprobs(self, q, s: int, e: int, hidden: torch.Tensor) -> None:
        """Append the log-probs of q's prompt tokens that the chunk [s, e) predicts: position j's logits
        (float32 log_softmax) score token s + j + 1. hidden (T, D) is q's row of the prefill forward
        (padding past e - s). Only tokens not yet scored are added (a preempted request recomputed
        keeps its list; a retried forward does not add twice). The head runs over pieces of positions
        so that (piece, V) float32 logits stay near 64 MB."""
        lps, top, P = q.prompt_lps, q.prompt_top, len(q.prompt)
        a, b = len(lps), min(e, P - 1) + 1  # the targets: prompt tokens [a, b)
        if a >= b:
            return
        if a - 1 < s:
            raise RuntimeError(f"prompt log-probs: positions {a - 1}..{s - 1} of the prompt were not forwarded "
                               f"(a request with prompt_logprobs must not start past cached prefix blocks)")
        n, ids = q.params.prompt_logprobs, torch.tensor(q.prompt[a:b], device=hidden.device)
        piece = max(1, (1 << 24) // self.vocab_size)
        for k in range(a, b, piece):
            m = min(b, k + piece)
            x = self.model.head(hidden[k - 1 - s:m - 1 - s]).float().log_softmax(-1)  # (m - k, V)
            lps += x.gather(-1, ids[k - a:m - a, None])[:, 0].tolist()
            if n:
                v, i = x.topk(n, dim=-1)  # (m - k, n)
                top += [list(zip(ii, vv)) for ii, vv in zip(i.tolist(), v.tolist())]

    def _fork(self, g: _Group, kids: list[_Request], events: list[Event]) -> None:
        """Start ``kids`` from the group's prefilled prompt: share its blocks, give each child private
        copies of those it writes into, draw each one's first token from the prompt's logits with its
        own generator (as its own prefill would), and, speculative, fill its MTP entry at the prompt's
        last position (which reads the child's first token) and draft."""
        P = len(g.prompt)
        for c in kids:
            self.cache.fork(g, c.id)
            c.forked = True
            c.cache_epoch, c.block_hashes = g.cache_epoch, list(g.block_hashes)  # the same prompt, same latents
            g.to_fork -= 1
            if g.prompt_lps is not None:
                c.prompt_lps, c.prompt_top = list(g.prompt_lps), g.prompt_top and list(g.prompt_top)
        logits, hidden = g.logits, g.hidden
        if g.to_fork == 0:
            self._release_group(g)
        for c in kids:
            if self.speculative:  # its own MTP entry at P - 1 (copy-on-write of that block)
                self.cache.truncate(c.id, P - 1)
            self._reserve([c.id], P + self.lookahead)
        self.running.extend(kids)
        toks, lps, tops = self._choose(kids, logits.expand(len(kids), -1))  # (k, V)
        if self.speculative:
            spec.chain(self, kids, spec.fork_drafts(self, kids, hidden, toks))
        self.stats.forks += len(kids)
        for c, t, lp, top in zip(kids, toks, lps, tops):
            self._append(c, t, lp, top, events)

    def _release_group(self, g: _Group) -> None:
        """No child will fork any more (or its prompt must make room): the group's hold on the prompt's
        blocks goes, also part-way through a chunked prefill."""
        if g in self.prefilling:
            self.prefilling.remove(g)
            self.cache.free(g)
        if g.held:
            self.cache.free(g)
            g.held, g.logits, g.hidden = False, None, None

    def _decode(self, rows: list[_Request], events: list[Event]) -> None:
        ids = torch.tensor([[r.out[-1]] for r in rows], device=self.device)  # (B, 1)
        self.cache.begin([r.id for r in rows], 1)
        with self.decode_weights:
            logits = self.model(ids, positions=self.cache.positions(1), cache=self.cache).logits[:, -1]  # (B, V)
        self.stats.decode_forwards += 1
        toks, lps, tops = self._choose(rows, logits)  # before advance: a failure leaves nothing committed
        self.cache.advance(1)
        for r, t, lp, top in zip(rows, toks, lps, tops):
            self._append(r, t, lp, top, events)

    def _make_room(self, events: list[Event]) -> list[_Request]:
        """Reserve ``lookahead`` slots past each running sequence, oldest first; when the pool runs dry
        preempt a prompt part-way through a chunked prefill, else the newest running request (recomputed
        later), or, when a sequence is alone and still short, finish it with "length" (it has outgrown
        the whole cache)."""
        for r in sorted(self.running, key=lambda q: q.arrival):
            if r.finish_reason is not None or r not in self.running:
                continue
            while not self.cache.reserve(r.id, self.cache.lengths[r.id] + self.lookahead):
                if self.prefilling:  # a prompt part-way through its prefill makes room first
                    q = self.prefilling.pop()
                    self.cache.free(q.id)
                    if not isinstance(q, _Group):
                        self.waiting.requeue(q)
                        self.stats.preemptions += 1
                    continue
                if len(self.running) == 1:
                    self._finish(r, "length", events=events)
                    break
                victim = max(self.running, key=lambda q: q.arrival)
                self._preempt(victim)
                if victim is r:
                    break
        return list(self.running)

    def _preempt(self, r: _Request) -> None:
        self._publish(r)  # its recompute, when re-admitted, starts past them if they are still cached
        self.cache.free(r.id)
        self.running.remove(r)
        r.drafts, r.draft_q = [], []
        self.waiting.requeue(r)
        self.stats.preemptions += 1

    # ---- tokens --------------------------------------------------------------------------------
    def _choose(self, rows: list[_Request], logits: torch.Tensor):
        """logits (B, V) → tokens, logprobs and top logprobs per row (None where not asked for). A row
        whose logits are not finite gets token None (``_append`` fails it alone)."""
        toks = sampling.sample(self._process(rows, logits), [r.params for r in rows], [r.gen for r in rows])
        lps, tops = [None] * len(rows), [None] * len(rows)
        need = [i for i, r in enumerate(rows) if r.params.logprobs and toks[i] is not None]
        if need:
            top = max(rows[i].params.top_logprobs for i in need)
            chosen, best = sampling.logprobs(logits[need], [toks[i] for i in need], top)
            for j, i in enumerate(need):
                lps[i] = chosen[j]
                n = rows[i].params.top_logprobs
                tops[i] = best[j][:n] if n else None
        return toks, lps, tops

    @staticmethod
    def _process(rows: list[_Request], logits: torch.Tensor) -> torch.Tensor:
        """The logits processors that depend on a request's tokens (vLLM's semantics), before
        sampling.sample's temperature/top-k/top-p: ``repetition_penalty`` divides the positive logits
        and multiplies the negative ones of every token in the prompt or output; below ``min_tokens``
        the stop token ids are masked. logits (B, V) → (B, V); the same tensor when neither applies."""
        pen = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1]
        short = [i for i, r in enumerate(rows) if len(r.out) < r.params.min_tokens and r.stop_ids]
        if not pen and not short:
            return logits
        x = logits.float().clone()
        for i in pen:
            seen = torch.tensor(sorted(set(rows[i].tokens)), device=x.device)
            v, p = x[i, seen], rows[i].params.repetition_penalty
            x[i, seen] = torch.where(v > 0, v / p, v * p)
        for i in short:
            x[i, torch.tensor(sorted(rows[i].stop_ids), device=x.device)] = float("-inf")
        return x

    def _append(self, r: _Request, tok: int | None, lp, top, events: list[Event]) -> bool:
        """Add one generated token, emit its event, finish the request on a stop; True when finished.
        ``tok`` None (its logits were not finite) or a failing stop-string check fails the request alone."""
        if tok is None:
            self._failed([r], "the model's logits for this request are not finite (nan or inf)", events)
            return True
        r.out.append(tok)
        if r.logprobs is not None:
            r.logprobs.append(lp)
        if r.top is not None:
            r.top.append(top)
        self.stats.generated_tokens += 1
        reason = stop = None
        early = len(r.out) < r.params.min_tokens  # vLLM: nothing stops a request before min_tokens
        if tok in r.stop_ids and not early:
            reason, stop = "stop", tok
        elif r.stop_window and not early and (s := self._stop_string(r, events)) is not None:
            if s is False:
                return True
            reason, stop = "stop", s
        elif len(r.out) >= r.max_new:
            reason = "length"
        first = len(r.out) == 1 and r.prompt_lps is not None  # the prompt's log-probs ride on the first token
        events.append(Event(r.id, tok, lp, top, reason is not None, reason, stop,
                            prompt_logprobs=r.prompt_lps if first else None,
                            prompt_top_logprobs=r.prompt_top if first else None))
        if reason is not None:
            self._finish(r, reason, stop)
        return reason is not None

    def _stop_string(self, r: _Request, events: list[Event]) -> str | None | bool:
        """The stop string the newest token completed, None, or False when decode_fn raised (the
        request has failed). Only the tail can hold it (earlier tokens were checked before)."""
        try:
            text = self.decode_fn(r.out[-r.stop_window:])
        except Exception as e:
            events.append(Event(r.id, r.out[-1], finished=False))
            self._failed([r], e, events)
            return False
        hit = first_stop(text, r.params.stop)
        return None if hit is None else hit[1]

    def _finish(self, r: _Request, reason: str, stop=None, events: list[Event] | None = None) -> None:
        r.finish_reason, r.stop_reason = reason, stop
        g = r.group
        if g is not None:
            if not r.forked:  # finished before forking (aborted while waiting)
                r.forked = True
                g.to_fork -= 1
                if g.to_fork == 0:
                    self._release_group(g)
            g.unfinished -= 1
            if g.unfinished == 0:
                self.groups.pop(g.gid, None)
        if r in self.running:
            self.running.remove(r)
        elif r.queued:
            self.waiting.remove(r)
        elif r in self.prefilling:
            self.prefilling.remove(r)
        if reason != "error":  # a failed request's latents may be the fault's (nan)
            self._publish(r)
        self.cache.free(r.id)
        if self.requests.pop(r.id, None) is not None:
            self.waiting.gone(r)
        r.drafts, r.draft_q = [], []
        if events is not None:
            events.append(Event(r.id, None, finished=True, finish_reason=reason, stop_reason=stop, error=r.error))

    # ---- blocking conveniences -----------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None, n: int = 1) -> list[Completion]:
        """Run prompts to completion (one params for all, or one per prompt); completions in order.
        ``n > 1``: n samples per prompt, each prompt prefilled once (see the module docstring);
        len(prompts) · n completions, prompt-major (prompt i's are ``[i*n:(i+1)*n]``), sample j seeded
        ``params.seed + j``. Drives ``step()`` itself: not for use while another thread drives the engine."""
        _check_n(n)
        if params is None or isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"params: {len(params)} SamplingParams for {len(prompts)} prompts")
        with self.lock:
            if n == 1:
                reqs = [self._make_request(p, sp, None) for p, sp in zip(prompts, params)]  # all valid first
                for r in reqs:
                    self._enqueue(r)
            else:
                groups = [self._make_group(p, sp, None, n) for p, sp in zip(prompts, params)]
                for g in groups:
                    self._enqueue_group(g)
                reqs = [c for g in groups for c in g.children]
        while any(r.finish_reason is None for r in reqs):
            if not self.step() and not self.running and not self.prefilling and self.waiting:
                raise RuntimeError("engine made no progress: the head of the queue cannot be admitted")
        failed = [r for r in reqs if r.finish_reason == "error"]
        if failed:
            raise RuntimeError(f"engine: {len(failed)} of {len(reqs)} requests failed; request "
                               f"{failed[0].id!r}: {failed[0].error}")
        return [r.completion() for r in reqs]

    def stream(self, prompt_ids: Sequence[int], params: SamplingParams | None = None) -> Iterator[Event]:
        """Yield one request's events as they come (drives ``step()``; closing the generator aborts it)."""
        rid = self.add_request(prompt_ids, params)
        try:
            while True:
                for e in self.step():
                    if e.request_id == rid:
                        yield e
                        if e.finished:
                            return
        finally:
            with self.lock:
                r = self.requests.get(rid)
                if r is not None:
                    self._finish(r, "abort")


def _row(q):
    return q[0] if isinstance(q, tuple) else q


def _prompt_logprob_lists(params: SamplingParams) -> tuple[list | None, list | None]:
    """The (log-prob, top) lists a request's prompt log-probs fill, the first token's entries None."""
    if params.prompt_logprobs is None:
        return None, None
    return [None], [None] if params.prompt_logprobs else None


def _check_n(n) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n: the number of samples per prompt must be an integer >= 1, got {n!r}")

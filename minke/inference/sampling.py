"""Per-request sampling: parameters, their validation, and logits → token.

Order of the logits processors (as vLLM and transformers apply them): temperature, then top-k, then
top-p (nucleus, always keeping the most likely token). A temperature below ``GREEDY_TEMPERATURE`` (1e-5,
vLLM's threshold too) means greedy (argmax, no randomness): dividing by a smaller one overflows fp32
(1e-40 turned every logit into ±inf and the softmax into nan), and its distribution is the argmax's
anyway. Sampling runs in fp32 on logits minus each row's maximum, so every finite row gives a proper
distribution; a row whose logits hold a nan or +inf, or no finite value, gets no token (None) and fails
alone. Each request owns a ``torch.Generator`` seeded from its ``seed``, and rows are sampled one by one
with their own generator, so a request's tokens do not depend on its batch mates.

Logprobs are those of the model's raw distribution, ``log_softmax(logits)`` before temperature,
top-k and top-p (what an RL trainer compares its policy against at temperature 1).

Shape legend: B rows, V vocab, K top_logprobs.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import torch

MAX_TOP_LOGPROBS = 20  # OpenAI's bound on top_logprobs; the server's requests use this one
GREEDY_TEMPERATURE = 1e-5  # temperatures below it are greedy


@dataclass
class SamplingParams:
    max_tokens: int = 256  # new tokens at most (finish_reason "length")
    temperature: float = 1.0  # below GREEDY_TEMPERATURE (0 included) = greedy
    top_p: float = 1.0  # nucleus mass in (0, 1]; 1 = off
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    seed: int | None = None  # per-request generator; None = a fresh random seed
    stop_token_ids: list[int] | None = None  # None = the model's eos token(s) (none with ignore_eos); [] = none
    ignore_eos: bool = False  # the model's eos does not stop (explicit stop_token_ids still do)
    min_tokens: int = 0  # no stop token or stop string ends the request before this many tokens
    repetition_penalty: float = 1.0  # vLLM/CTRL: > 1 discourages tokens already in the prompt or output
    stop: list[str] | None = None  # stop strings; need the engine's decode_fn
    logprobs: bool = False  # return the chosen token's logprob
    top_logprobs: int = 0  # and the n most likely tokens' logprobs (needs logprobs=True)
    # log-probs of the prompt's tokens (vLLM's prompt_logprobs): None = off; 0 = each prompt token's own;
    # N = also the N most likely tokens at each position (the first token has none: Completion carries None)
    prompt_logprobs: int | None = None

    def validate(self, vocab_size: int | None = None) -> "SamplingParams":
        """Raise ValueError naming the first bad field; returns self."""
        def bad(name, msg):
            raise ValueError(f"SamplingParams.{name}: {msg}, got {getattr(self, name)!r}")

        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            bad("max_tokens", "must be an integer >= 1")
        if not _is_num(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            bad("temperature", "must be a finite number >= 0 (0 = greedy)")
        if not _is_num(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", "must lie in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < 0:
            bad("top_k", "must be an integer >= 0 (0 = off)")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**63):
            bad("seed", "must be None or an integer in [0, 2**63)")
        if self.stop_token_ids is not None:
            if isinstance(self.stop_token_ids, (str, bytes)) or not all(_is_int(t) for t in self.stop_token_ids):
                bad("stop_token_ids", "must be a list of token ids")
            if vocab_size is not None and any(not 0 <= t < vocab_size for t in self.stop_token_ids):
                bad("stop_token_ids", f"ids must lie in [0, vocab_size={vocab_size})")
        if self.stop is not None:
            if isinstance(self.stop, str):
                self.stop = [self.stop]
            if not all(isinstance(s, str) and s for s in self.stop):
                bad("stop", "must be a list of non-empty strings")
        if not isinstance(self.ignore_eos, bool):
            bad("ignore_eos", "must be a bool")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            bad("min_tokens", f"must be an integer in [0, max_tokens={self.max_tokens}]")
        if (not _is_num(self.repetition_penalty) or not math.isfinite(self.repetition_penalty)
                or self.repetition_penalty <= 0):
            bad("repetition_penalty", "must be a finite number > 0 (1 = off)")
        if not isinstance(self.logprobs, bool):
            bad("logprobs", "must be a bool")
        if not _is_int(self.top_logprobs) or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            bad("top_logprobs", f"must be an integer in [0, {MAX_TOP_LOGPROBS}]")
        if self.top_logprobs and not self.logprobs:
            bad("top_logprobs", "needs logprobs=True")
        if self.prompt_logprobs is not None and (not _is_int(self.prompt_logprobs)
                                                 or not 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS):
            bad("prompt_logprobs", f"must be None or an integer in [0, {MAX_TOP_LOGPROBS}]")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    def generator(self, device) -> torch.Generator | None:
        """The request's own random stream (None when greedy: it draws nothing)."""
        if self.greedy:
            return None
        seed = self.seed if self.seed is not None else secrets.randbits(63)
        return torch.Generator(device=device).manual_seed(seed)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def filter_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                  top_p: torch.Tensor) -> torch.Tensor:
    """logits (B, V) → processed logits (B, V) fp32, -inf outside each row's top-k / top-p set.

    temperature (B,) >= GREEDY_TEMPERATURE, top_k (B,) int (0 = off), top_p (B,) in (0, 1]. Vectorized
    over rows. Each row's maximum is subtracted first, so a finite row keeps one logit at 0 and its
    softmax is never nan (rows must be finite: see ``finite_rows``).
    """
    x = logits.float()
    x = (x - x.max(-1, keepdim=True).values) / temperature[:, None]
    if bool((top_k > 0).any()) or bool((top_p < 1).any()):
        V = x.shape[-1]
        sorted_x, order = x.sort(dim=-1, descending=True)  # (B, V)
        rank = torch.arange(V, device=x.device)
        k = torch.where(top_k > 0, top_k.clamp(max=V), torch.full_like(top_k, V))
        drop = rank[None] >= k[:, None]
        sorted_x = sorted_x.masked_fill(drop, float("-inf"))
        p = sorted_x.softmax(-1)
        # mass before each token; drop once the tokens before it already hold top_p (the first stays)
        before = p.cumsum(-1) - p
        drop = before >= top_p[:, None]
        drop[:, 0] = False
        sorted_x = sorted_x.masked_fill(drop, float("-inf"))
        x = torch.full_like(x, float("-inf")).scatter(-1, order, sorted_x)
    return x


def probabilities(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """logits (B, V) → the sampling distribution (B, V) fp32 of each row's params (temperature > 0)."""
    dev = logits.device
    t = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=dev)
    k = torch.tensor([p.top_k for p in params], dtype=torch.long, device=dev)
    tp = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=dev)
    return filter_logits(logits, t, k, tp).softmax(-1)


def finite_rows(logits: torch.Tensor) -> list[bool]:
    """logits (B, V) → per row: no nan or +inf, and at least one finite value (-inf masks are fine)."""
    x = logits.float()
    if bool(torch.isfinite(x.sum()).all()):  # a finite sum has only finite terms: every row is fine
        return [True] * x.shape[0]
    return ((~torch.isnan(x) & (x != float("inf"))).all(-1) & torch.isfinite(x).any(-1)).tolist()


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list) -> list[int | None]:
    """logits (B, V) → one token per row: argmax for greedy rows, otherwise drawn with the row's
    generator; None for a row that cannot be sampled (``finite_rows``), which the caller fails alone."""
    ok = finite_rows(logits)
    tokens = [t if good else None for t, good in zip(logits.argmax(-1).tolist(), ok)]
    rows = [i for i, p in enumerate(params) if not p.greedy and ok[i]]
    if rows:
        probs = probabilities(logits[rows], [params[i] for i in rows])
        for j, i in enumerate(rows):
            try:
                tokens[i] = int(torch.multinomial(probs[j], 1, generator=generators[i]))
            except RuntimeError:  # cannot happen for a finite row; if it does, that row alone fails
                tokens[i] = None
    return tokens


def logprobs(logits: torch.Tensor, tokens: list[int], top: int = 0):
    """logits (B, V), tokens (B,) → (chosen logprobs list[float], top list[list[(id, logprob)]] or None)."""
    lp = logits.float().log_softmax(-1)
    chosen = lp.gather(-1, torch.tensor(tokens, device=lp.device)[:, None])[:, 0].tolist()
    if not top:
        return chosen, None
    v, i = lp.topk(top, dim=-1)  # (B, K)
    return chosen, [list(zip(ii, vv)) for ii, vv in zip(i.tolist(), v.tolist())]

"""The OpenAI wire format (request and response models) and the text layer between the engine's token
ids and it.

Requests are pydantic models: a field out of range becomes a 400 naming it (server.py). Unknown
fields are ignored as OpenAI's optional extras (``user``, ``metadata``…), except those whose meaning
minke would silently drop (``UNSUPPORTED``): a non-default value of one of them is a 400.

`TextStream` turns one choice's token ids into text deltas: incremental detokenization that holds
back an unfinished UTF-8 sequence, stop strings (the text is cut before the string; a string still
forming is held back), and DeepSeek-R1's split of the ``<think>…</think>`` block into
``reasoning_content`` and ``content`` (as DeepSeek's API returns them).
"""

from __future__ import annotations

from typing import Callable, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..data.tokenizer import END_THINK, THINK

UNSUPPORTED = ("presence_penalty", "frequency_penalty", "logit_bias", "tools", "functions", "suffix", "echo")
MAX_TOP_LOGPROBS = 20


# ---- requests ----------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    temperature: float = Field(1.0, ge=0, le=2)  # 0 = greedy
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # vLLM's extension; 0 = off
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = Field(default_factory=list)  # a list after validation
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        v = [v] if isinstance(v, str) else v or []
        if not all(v):
            raise ValueError("stop strings must not be empty")
        return v

    @model_validator(mode="after")
    def _unsupported(self):
        for k, v in (self.model_extra or {}).items():
            if k in UNSUPPORTED and v not in (None, 0, False, [], {}, ""):
                raise ValueError(f"{k} is not supported by minke (got {v!r})")
        return self


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        c = self.content
        return "" if c is None else c if isinstance(c, str) else "".join(p.text for p in c)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        return self

    def template_messages(self) -> list[dict]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = Field(16, ge=1)  # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # top-n per token; 0 = the chosen only

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and (not v or any(isinstance(p, list) and not p for p in v)):
            raise ValueError("prompt must not be empty")
        return v


# ---- responses ---------------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: str = "assistant"
    content: str | None = None
    reasoning_content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: dict | None = None


class _Response(BaseModel):
    """What every OpenAI response object carries besides its ``object`` kind, choices and usage."""
    id: str
    created: int
    model: str


class ChatCompletion(_Response):
    object: str = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: str | None = None
    content: str | None = None
    reasoning_content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: dict | None = None


class ChatCompletionChunk(_Response):
    object: str = "chat.completion.chunk"
    choices: list[ChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None = None
    logprobs: dict | None = None


class Completion(_Response):
    object: str = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str = "minke"
    max_model_len: int


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


# ---- text --------------------------------------------------------------------------------------
def _partial(text: str, patterns: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of one of ``patterns``."""
    for k in range(min(len(text), max(map(len, patterns), default=1) - 1), 0, -1):
        if any(p.startswith(text[-k:]) for p in patterns):
            return k
    return 0


class TextStream:
    """One choice's token ids → (reasoning, content) text deltas.

    ``think``: the prompt opened a ``<think>`` block (R1's generation prompt ends with "<think>\\n"),
    so the text is reasoning until ``</think>``; with ``think=False`` a response that itself opens
    with ``<think>`` is split too. ``split=False`` (plain completions) keeps all text as content.
    After ``add`` returns, ``stopped`` says a stop string ended the text (abort the sequence).
    """

    def __init__(self, decode: Callable[..., str], stop: Sequence[str] = (), think: bool = False,
                 split: bool = True):
        self.decode, self.stop = decode, list(stop)
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] is context already emitted; ids[read:] is new
        self.text, self.sent = "", 0  # text decoded so far; how much of it passed the stop check
        self.stopped = False
        self.state = ("think" if think else "start") if split else "content"
        self.pending = ""  # released text still waiting for the reasoning split
        self.reasoning, self.content = "", ""

    def add(self, ids: Sequence[int], final: bool = False) -> tuple[str, str]:
        if self.stopped:
            return "", ""
        self.ids.extend(ids)
        # Decode a short window so each step costs O(new tokens): the window's first tokens are context
        # (sentencepiece-style decoders treat a leading space differently at the start of a text).
        context = self.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        window = self.decode(self.ids[self.prefix:], skip_special_tokens=True)
        if window.endswith("\ufffd") and not final:
            return "", ""  # an unfinished UTF-8 sequence: wait for its other bytes
        self.text += window[len(context):]
        self.prefix, self.read = self.read, len(self.ids)
        hits = [i for i in (self.text.find(s, max(0, self.sent - len(s) + 1)) for s in self.stop) if i >= 0]
        if hits:
            self.stopped, end = True, min(hits)
        else:
            end = len(self.text) - (0 if final else _partial(self.text[self.sent:], self.stop))
        new, self.sent = self.text[self.sent:end], max(self.sent, end)
        return self._split(new, final or self.stopped)

    def finish(self) -> tuple[str, str]:
        """The text held back, once the sequence has ended."""
        return self.add([], final=True)

    def _split(self, new: str, final: bool) -> tuple[str, str]:
        s = self.pending + new
        reasoning = content = ""
        if self.state == "start":  # nothing released yet: does the response open a <think> block?
            head = s.lstrip()
            if head.startswith(THINK):
                self.state, s = "think", head[len(THINK):]
            elif THINK.startswith(head) and not final:
                self.pending = s
                return "", ""
            else:
                self.state = "content"
        if self.state == "think":
            i = s.find(END_THINK)
            if i >= 0:
                reasoning, content, self.state = s[:i], s[i + len(END_THINK):], "content"
                s = ""
            else:
                k = 0 if final else _partial(s, [END_THINK])
                reasoning, s = s[:len(s) - k], s[len(s) - k:]
        else:
            content, s = s, ""
        self.pending = s
        self.reasoning += reasoning
        self.content += content
        return reasoning, content


def split_reasoning(text: str, think: bool = True) -> tuple[str, str]:
    """(reasoning, content) of a whole response; the streaming split gives the same."""
    t = TextStream(lambda ids, **_: "", think=think)
    t._split(text, final=True)
    return t.reasoning, t.content

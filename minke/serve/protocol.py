"""The OpenAI wire format: request and response models (the text itself is minke/text.py's).

Requests are pydantic models: a field out of range becomes a 400 naming it (server.py). Unknown
fields are ignored as OpenAI's optional extras (``user``, ``metadata``…), except those whose meaning
minke would silently drop (``UNSUPPORTED``): a value of one of them other than None or its "off"
value is a 400 naming it. vLLM's extensions minke implements: ``top_k``, ``min_tokens``,
``ignore_eos``, ``repetition_penalty``, ``stop_token_ids``. ``echo`` (with ``max_tokens: 0`` for scoring a
prompt) exists on completions only.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..inference.sampling import MAX_TOP_LOGPROBS

MAX_STOP = 4  # OpenAI's bound on the number of stop strings
# field → the values that mean "off" (None always does): anything else would be silently ignored
UNSUPPORTED = {
    "presence_penalty": (0,), "frequency_penalty": (0,), "logit_bias": ({},), "suffix": ("",), "echo": (False,),
    "tools": ([],), "functions": ([],), "tool_choice": ("none",), "function_call": ("none",),
    "response_format": ({"type": "text"},), "best_of": (1,), "use_beam_search": (False,), "prompt_logprobs": (0,),
    "guided_json": (), "guided_regex": (), "guided_choice": (), "guided_grammar": (), "structured_outputs": (),
    "prediction": (), "audio": (), "modalities": (["text"],),
}


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
    stop_token_ids: list[int] | None = None  # stop on these too (the model's eos stops unless ignore_eos)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    repetition_penalty: float = Field(1.0, gt=0)
    n: int = Field(1, ge=1)  # the server's limits bound it
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        v = [v] if isinstance(v, str) else v or []
        if not all(v):
            raise ValueError("stop strings must not be empty")
        if len(v) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings, got {len(v)}")
        return v

    @model_validator(mode="after")
    def _unsupported(self):
        for k, v in (self.model_extra or {}).items():
            if k in UNSUPPORTED and v is not None and v not in UNSUPPORTED[k]:
                raise ValueError(f"{k} is not supported by minke (got {repr(v)[:80]})")
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
    max_tokens: int = Field(16, ge=0)  # OpenAI's default for completions; 0 only with echo (scoring)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # top-n per token; 0 = the chosen only
    # the prompt comes back before the completion, and with logprobs its tokens' log-probs (the first
    # token's None), as lm-evaluation-harness's local-completions model scores a continuation
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and (not v or any(isinstance(p, list) and not p for p in v)):
            raise ValueError("prompt must not be empty")
        return v

    @model_validator(mode="after")
    def _nothing_to_generate(self):
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens: 0 generates nothing; it is allowed only with echo=true (to score "
                             "the prompt with logprobs)")
        return self


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

"""The text layer between token ids and what a person reads, under both inference and serve.

- `TextStream`: one sequence's token ids → text deltas: incremental detokenization that holds back an
  unfinished UTF-8 sequence, stop strings (the text is cut before the string; a string still forming is
  held back), and DeepSeek-R1's split of the ``<think>…</think>`` block into reasoning and content (as
  DeepSeek's API returns ``reasoning_content`` and ``content``).
- `first_stop`: the one stop-string search (the engine ends a request on the token that completes a
  string with it; `TextStream` cuts the text with it).
- `token_bytes`: a token's own bytes (a byte-level BPE token may be part of a UTF-8 character, whose
  decoded text is U+FFFD): what OpenAI's logprobs ``bytes`` field carries.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable, Sequence

from .data.tokenizer import END_THINK, THINK


def first_stop(text: str, stops: Sequence[str], since: int = 0) -> tuple[int, str] | None:
    """The earliest (index, stop string) in ``text`` among occurrences that end after ``since`` (text
    before ``since`` was searched already); None when there is none."""
    hits = [(i, s) for s in stops if (i := text.find(s, max(0, since - len(s) + 1))) >= 0]
    return min(hits, default=None)


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
        hit = first_stop(self.text, self.stop, self.sent)
        if hit is not None:
            self.stopped, end = True, hit[0]
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


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the printable character each byte is spelled with → byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_bytes(tokenizer, token_id: int) -> bytes:
    """The bytes token ``token_id`` stands for: a byte-level BPE token's bytes (from its spelling in the
    vocabulary), an added token's UTF-8 text; for other tokenizers the UTF-8 of its decoded text."""
    import tokenizers

    tok = getattr(tokenizer, "tok", None)
    if isinstance(tok, tokenizers.Tokenizer):
        added = tok.get_added_tokens_decoder().get(token_id)
        if added is not None:
            return added.content.encode()
        piece = tok.id_to_token(token_id)
        table = _byte_decoder()
        byte_level = isinstance(tok.decoder, tokenizers.decoders.ByteLevel)
        if byte_level and piece is not None and all(c in table for c in piece):
            return bytes(table[c] for c in piece)
    return tokenizer.decode([token_id]).encode()


def max_token_bytes(tokenizer) -> int | None:
    """The most bytes one token stands for, when the tokenizer is byte-level BPE without a normalizer
    (then a text of B bytes has at least B / max_token_bytes tokens); None otherwise."""
    import tokenizers

    tok = getattr(tokenizer, "tok", None)
    if not isinstance(tok, tokenizers.Tokenizer) or tok.normalizer is not None \
            or not isinstance(tok.decoder, tokenizers.decoders.ByteLevel):
        return None
    added = [len(t.content.encode()) for t in tok.get_added_tokens_decoder().values()]
    return max([len(p) for p in tok.get_vocab(with_added_tokens=False)] + added)

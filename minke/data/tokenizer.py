"""Byte-level BPE tokenizer with DeepSeek's chat special tokens, stored as Hugging Face files.

`train_tokenizer` trains one with the `tokenizers` library; `Tokenizer.load` reads any HF
tokenizer.json (+ tokenizer_config.json), including DeepSeek's own. Ids: bos 0, eos 1, pad 2 (as in
DeepSeek's tokenizers), then <｜User｜>, <｜Assistant｜>, <think>, </think>.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Iterable

import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
USER, ASSISTANT, THINK, END_THINK = "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"
SPECIAL_TOKENS = [BOS, EOS, PAD, USER, ASSISTANT, THINK, END_THINK]

# DeepSeek-R1's format: system text after bos; assistant history loses its <think>…</think> part;
# the generation prompt opens the reasoning block, as R1's responses start with "<think>\n".
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages | selectattr('role', 'equalto', 'system') %}"  # R1 joins several with a blank line
    "{% if not loop.first %}{{ '\\n\\n' }}{% endif %}{{ m['content'] }}{% endfor %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ '" + USER + "' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}"
    "{{ '" + ASSISTANT + "' + m['content'].split('" + END_THINK + "')[-1] + '" + EOS + "' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + ASSISTANT + THINK + "\\n' }}{% endif %}"
)


def _raise(message: str):
    raise ValueError(message)  # templates call raise_exception() on malformed conversations


def _content(token) -> str | None:
    return token.get("content") if isinstance(token, dict) else token  # AddedToken dicts or plain str


class Tokenizer:
    def __init__(self, tok: tokenizers.Tokenizer, config: dict | None = None):
        self.tok = tok
        self.config = dict(config or {})

    # ---- ids
    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.tok.token_to_id(token)

    def _special(self, key: str, default: str) -> int | None:
        token = _content(self.config.get(key))
        return self.token_to_id(token) if token is not None else self.token_to_id(default)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        return self._special("bos_token", BOS)

    @property
    def eos_id(self) -> int | None:
        return self._special("eos_token", EOS)

    @property
    def pad_id(self) -> int | None:
        return self._special("pad_token", PAD)

    @property
    def think_id(self) -> int | None:
        return self.token_to_id(THINK)

    @property
    def end_think_id(self) -> int | None:
        return self.token_to_id(END_THINK)

    # ---- text
    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        # add_special_tokens=False: a foreign post-processor must not add its own bos/eos. encode_batch
        # releases the GIL (encode holds it: a 4 MB prompt stalled every other thread of a server).
        ids = self.tok.encode_batch([text], add_special_tokens=False)[0].ids
        return [self.bos_id] + ids if add_bos else ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @cached_property
    def _template(self):
        # The environment transformers renders chat templates with, so both give the same string.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        return env.from_string(self.config.get("chat_template") or DEFAULT_CHAT_TEMPLATE)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        tokens = {k: _content(self.config.get(k)) for k in ("bos_token", "eos_token", "pad_token")}
        tokens = {k: v if v is not None else d for (k, v), d in zip(tokens.items(), (BOS, EOS, PAD))}
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **tokens)

    # ---- files
    def save(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(out / "tokenizer.json"))
        config = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "add_bos_token": False,
                  "add_eos_token": False, "model_max_length": 4096,
                  "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": DEFAULT_CHAT_TEMPLATE}
        config.update(self.config)
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
        return out

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """From a directory holding tokenizer.json (+ tokenizer_config.json, chat_template.jinja) or
        from a tokenizer.json file."""
        path = Path(path)
        folder, file = (path, path / "tokenizer.json") if path.is_dir() else (path.parent, path)
        config = {}
        if (folder / "tokenizer_config.json").exists():
            config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        if "chat_template" not in config and (folder / "chat_template.jinja").exists():
            config["chat_template"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        return cls(tokenizers.Tokenizer.from_file(str(file)), config)


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path | None = None) -> Tokenizer:
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        # One digit per token (with its leading space): small models learn arithmetic far better
        # on single digits than on BPE's arbitrary digit chunks (DeepSeek itself uses 1–3).
        pre_tokenizers.Split(Regex(r" ?\p{N}"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    # As in DeepSeek's tokenizer.json, <think> and </think> are not "special": decode keeps them.
    spec = json.loads(tok.to_str())
    for t in spec["added_tokens"]:
        t["special"] = t["content"] not in (THINK, END_THINK)
    out = Tokenizer(tokenizers.Tokenizer.from_str(json.dumps(spec)))
    if out_dir is not None:
        out.save(out_dir)
    return out

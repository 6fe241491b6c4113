"""Pretraining data: documents → one token stream → packed (seq_len + 1)-token windows.

Each document becomes ``bos ids eos`` (the bos opens it as chat prompts do, the eos separates it from
the next); the stream is cut into non-overlapping windows of seq_len + 1 tokens, a window giving
inputs ``w[:-1]`` and next-token targets ``w[1:]``. Documents run across window edges, attention is
not masked at document boundaries (the usual packing).

Determinism: epoch e visits the windows in a permutation drawn from a generator seeded with
(seed, e). The loader's whole state is its position (epoch, index), so a resumed run reads exactly
the batches an uninterrupted run would.

Shape legend: N windows, B batch, T seq_len.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch


class DataError(ValueError):
    """A data file is missing, unreadable, empty or malformed, or holds too few tokens."""


def read_text(path: str | Path) -> str:
    """A UTF-8 file's text; a missing, unreadable or non-UTF-8 file is a DataError naming it."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None


def jsonl_records(path: str | Path) -> list[tuple[str, dict]]:
    """("FILE:LINE", object) for each non-blank line of a JSONL file; an unreadable file, a line that is
    not JSON or not an object is a DataError naming the file (and line)."""
    text = read_text(path)
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        out.append((where, rec))
    return out


def read_documents(paths: list[str]) -> list[str]:
    """Documents from text files: a ``.jsonl`` file gives one document per line (its ``text`` field),
    any other file is one document. Every error names the file (and line)."""
    docs = []
    for path in paths:
        if path.endswith(".jsonl"):
            found = []
            for where, rec in jsonl_records(path):
                if not isinstance(rec.get("text"), str):
                    raise DataError(f"{where}: expected an object with a string field 'text'")
                if rec["text"].strip():
                    found.append(rec["text"])
        else:
            text = read_text(path)
            found = [text] if text.strip() else []
        if not found:
            raise DataError(f"{path}: no text in file (empty data file)")
        docs += found
    return docs


def tokenize(docs: list[str], tokenizer) -> torch.Tensor:
    """The token stream (n,) int64: bos doc eos bos doc eos …"""
    ids: list[int] = []
    for d in docs:
        ids.append(tokenizer.bos_id)
        ids += tokenizer.encode(d)
        ids.append(tokenizer.eos_id)
    return torch.tensor(ids, dtype=torch.long)


def fingerprint(tokens: torch.Tensor) -> str:
    """A short hash of a token stream: a resumed run checks it is reading the same data."""
    return hashlib.sha1(tokens.numpy().tobytes()).hexdigest()[:16]


def windows(tokens: torch.Tensor, seq_len: int, what: str = "data") -> torch.Tensor:
    """(N, T+1) non-overlapping windows (the tail shorter than a window is dropped)."""
    n = tokens.numel() // (seq_len + 1)
    if n == 0:
        raise DataError(f"{what} has {tokens.numel()} tokens, fewer than one window of seq_len + 1 = {seq_len + 1}")
    return tokens[: n * (seq_len + 1)].view(n, seq_len + 1)


class PackedLoader:
    """Batches (B, T+1) of shuffled windows, epoch after epoch, from a resumable position.

    ``tokens``: the 1-D stream, cut into windows of ``seq_len + 1``; or rows already made (N, …), e.g.
    sft.py's packed examples (N, 4, T), batched as they are (``seq_len`` unused)."""

    def __init__(self, tokens: torch.Tensor, seq_len: int | None, batch_size: int, seed: int = 0):
        self.windows = windows(tokens, seq_len, "training data") if tokens.dim() == 1 else tokens
        self.batch_size, self.seed = batch_size, seed
        self.epoch, self.index = 0, 0
        self._order: tuple[int, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.windows.shape[0]

    def order(self, epoch: int) -> torch.Tensor:
        if self._order is None or self._order[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = (epoch, torch.randperm(len(self), generator=g))
        return self._order[1]

    def next_batch(self) -> torch.Tensor:
        rows = []
        while len(rows) < self.batch_size:
            rows.append(self.order(self.epoch)[self.index])
            self.index += 1
            if self.index == len(self):
                self.epoch, self.index = self.epoch + 1, 0
        return self.windows[torch.stack(rows)]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = state["epoch"], state["index"]

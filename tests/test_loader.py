import json

import pytest
import torch

from minke.data.loader import DataError, PackedLoader, read_documents, tokenize, windows


class CharTok:
    """A stand-in tokenizer: one id per character, bos 0, eos 1."""
    bos_id, eos_id = 0, 1

    def encode(self, s):
        return [ord(c) for c in s]


def test_packing_layout():
    stream = tokenize(["ab", "c"], CharTok())
    assert stream.tolist() == [0, 97, 98, 1, 0, 99, 1]  # bos doc eos, documents back to back
    w = windows(stream, seq_len=2)
    assert w.tolist() == [[0, 97, 98], [1, 0, 99]]  # non-overlapping seq_len+1 windows, tail dropped
    with pytest.raises(DataError, match="fewer than one window"):
        windows(stream, seq_len=10)


def test_order_is_deterministic_covers_each_epoch_and_resumes_exactly():
    tokens = torch.arange(10 * 5)  # 10 windows of 5
    a = PackedLoader(tokens, seq_len=4, batch_size=3, seed=7)
    first = [a.next_batch() for _ in range(10)]  # 30 windows = 3 epochs
    firsts = torch.cat(first)[:, 0]
    for e in range(3):
        assert sorted(firsts[10 * e: 10 * (e + 1)].tolist()) == list(range(0, 50, 5))  # each window once per epoch
    again = PackedLoader(tokens, 4, 3, seed=7)
    assert torch.equal(torch.cat(first), torch.cat([again.next_batch() for _ in range(10)]))
    assert not torch.equal(first[0], PackedLoader(tokens, 4, 3, seed=8).next_batch())

    b = PackedLoader(tokens, 4, 3, seed=7)
    for _ in range(4):
        b.next_batch()
    state = b.state_dict()
    c = PackedLoader(tokens, 4, 3, seed=7)
    c.load_state_dict(state)
    assert all(torch.equal(c.next_batch(), first[i]) for i in range(4, 10))


def test_read_documents(tmp_path):
    (tmp_path / "a.txt").write_text("one document\n\nstill the same one")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "x"}) + "\n\n" + json.dumps({"text": "y", "id": 3}) + "\n")
    assert read_documents([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")]) == \
        ["one document\n\nstill the same one", "x", "y"]
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: expected an object with a string field 'text'"):
        read_documents([str(tmp_path / "bad.jsonl")])
    (tmp_path / "broken.jsonl").write_text('{"text": \n')
    with pytest.raises(DataError, match=r"broken\.jsonl:1: not valid JSON"):
        read_documents([str(tmp_path / "broken.jsonl")])

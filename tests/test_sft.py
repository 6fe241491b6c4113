"""minke sft: loss on the assistant target only, packed examples that never see each other, the stage
end to end with its JSONL errors."""

import json

import pytest
import torch
import torch.nn.functional as F

import minke
from minke.data.tokenizer import train_tokenizer
from minke.tasks import corpus
from minke.train import sft
from minke.train.pretrain import IGNORE, lm_loss


@pytest.fixture(scope="module")
def tiny():
    tok = train_tokenizer(corpus(200, seed=0), vocab_size=300)
    cfg = minke.preset("tiny", vocab_size=-(-tok.vocab_size // 64) * 64, max_position_embeddings=256,
                       bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    return minke.build(cfg, seed=0).eval(), tok


CONV = [
    [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "<think>\n2 + 3 = 5\n</think>\n\n\\boxed{5}"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 7 * 8?"},
     {"role": "assistant", "content": "<think>\n7 * 8 = 56\n</think>\n\n\\boxed{56}"}],
]


def test_loss_is_the_assistant_tokens_ce_of_each_example_alone(tiny):
    """Independent reference: each example run alone, CE over its target tokens only (after the
    generation prompt "<think>\\n"), token-weighted. Fails if pack() puts a target on a prompt position
    (tgt = toks[P-1:]), if examples attend to each other (mask dropped), or if positions don't restart."""
    model, tok = tiny
    enc = [sft.encode_example(tok, m) for m in CONV]
    row = sft.pack(enc, 96, tok.pad_id, seed=0)
    assert row.shape[0] == 1  # both examples in one row
    loss, parts = lm_loss(model, row, [], 0.0, 0.0)
    ce_sum, n = 0.0, 0
    for ids, P in enc:
        target = tok.decode(ids[P:])
        assert target.startswith("2 + 3") or target.startswith("7 * 8")  # the "<think>\n" is the prompt's
        logits = model(torch.tensor([ids[:-1]])).logits[0]
        ce_sum += F.cross_entropy(logits[P - 1:], torch.tensor(ids[P:]), reduction="sum").item()
        n += len(ids) - P
    assert parts["ce"].item() == pytest.approx(ce_sum / n, rel=1e-5)
    assert int((row[0, 1] != IGNORE).sum()) == n


def test_packed_examples_do_not_see_each_other(tiny):
    """Changing every token of one example leaves the other's logits unchanged (and equal to it alone).
    Fails with the plain causal mask."""
    model, tok = tiny
    enc = [sft.encode_example(tok, m) for m in CONV]
    row = sft.pack(enc, 96, tok.pad_id, seed=0)
    x, _, seg, pos = row.unbind(1)
    T = x.shape[1]
    mask = ((seg[:, :, None] == seg[:, None, :]) & torch.ones(T, T, dtype=torch.bool).tril())[:, None]
    first = seg[0, 0].item()
    other = (seg[0] != first) & (seg[0] != sft.PAD_SEGMENT)
    a = model(x, positions=pos, mask=mask).logits
    x2 = x.clone()
    x2[0, seg[0] == first] = (x2[0, seg[0] == first] + 7) % tok.vocab_size
    b = model(x2, positions=pos, mask=mask).logits
    # equal up to rounding: the MoE's grouped GEMMs see other row counts when the routing changes
    torch.testing.assert_close(a[0, other], b[0, other], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(a[0, ~other], b[0, ~other])
    ids, _ = enc[int(seg[0, other][0])]
    alone = model(torch.tensor([ids[:-1]])).logits[0]
    torch.testing.assert_close(a[0, other], alone, rtol=1e-5, atol=1e-5)


def test_target_without_think_gets_an_empty_reasoning_block(tiny):
    _, tok = tiny
    ids, P = sft.encode_example(tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello"}])
    assert tok.decode(ids[P:]) == "</think>\n\nHello" + tok.decode([tok.eos_id])


def _save(model, tok, path):
    minke.save(model, path)
    tok.save(path)
    return path


def test_sft_stage_trains_resumes_exactly_and_names_bad_lines(tiny, tmp_path):
    model, tok = tiny
    ckpt = _save(model, tok, tmp_path / "base")
    data = tmp_path / "train.jsonl"
    lines = [json.dumps({"messages": c}) for c in CONV] * 8 + [json.dumps({"prompt": "What is 1 + 1?",
                                                                        "response": "<think>\n1 + 1 = 2\n</think>\n\n\\boxed{2}"})] * 8
    data.write_text("\n".join(lines) + "\n")
    common = ["--model", str(ckpt), "--data", str(data), "--seq-len", "96", "--batch-size", "4", "--lr", "3e-3",
              "--eval-every", "2", "--save-every", "2", "--log-every", "1", "--eval-batches", "1", "--mtp-lambda", "0.1"]
    assert sft.main(common + ["--steps", "4", "--out", str(tmp_path / "a")]) == 0
    assert sft.main(common + ["--steps", "4", "--out", str(tmp_path / "b"), "--inject-nan", "3"]) == 1
    assert sft.main(common + ["--steps", "4", "--resume", str(tmp_path / "b")]) == 0
    read = lambda d: [json.loads(l) for l in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    la = [m["loss"] for m in read("a") if m["kind"] == "train"]
    lb = [m["loss"] for m in read("b") if m["kind"] == "train"]
    assert la == lb and len(la) == 4  # the resumed run is the uninterrupted one, bitwise
    assert la[-1] < la[0]
    # the trained checkpoint loads with its tokenizer and chat template
    assert (tmp_path / "a" / "final" / "tokenizer_config.json").exists()
    minke.load(tmp_path / "a" / "final")

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": CONV[0]}) + "\n" + json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(sft.DataError, match=r"bad.jsonl:2: expected a 'messages' list"):
        sft.read_examples([str(bad)])
    bad.write_text("{not json\n")
    with pytest.raises(sft.DataError, match=r"bad.jsonl:1: not valid JSON"):
        sft.read_examples([str(bad)])
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(sft.DataError, match=r"bad.jsonl:1: the last message must be the assistant's"):
        sft.read_examples([str(bad)])


def test_configs_the_loop_cannot_train_are_refused_up_front(tiny, tmp_path, capsys):
    """Issue 11 item 9: a greedy router at the default bias γ crashed after the first optimizer step;
    a model without MoE layers crashed on max() of no MaxVio. Now: a clear error before any step, and a
    dense student trains (distillation)."""
    model, tok = tiny
    ckpt = _save(model, tok, tmp_path / "base")
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"messages": c}) for c in CONV * 4) + "\n")
    common = ["--data", str(data), "--seq-len", "96", "--batch-size", "2", "--eval-batches", "1", "--log-every", "1"]
    assert sft.main(["--preset", "tiny", "--tokenizer", str(ckpt), "--set", "topk_method=\"greedy\"",
                     "--out", str(tmp_path / "g"), "--steps", "1", *common]) == 1
    err = capsys.readouterr().err
    assert "--bias-gamma" in err and "'greedy'" in err and not (tmp_path / "g" / "metrics.jsonl").exists()
    assert sft.main(["--preset", "tiny", "--tokenizer", str(ckpt), "--set", "first_k_dense_replace=3",
                     "--out", str(tmp_path / "dense"), "--steps", "2", *common]) == 0
    assert (tmp_path / "dense" / "final" / "config.json").exists()


def test_resume_skips_an_unreadable_newest_checkpoint_and_refuses_another_runs_out(tiny, tmp_path, capsys):
    """Issue 11 item 10, in the shared loop: a torn newest checkpoint falls back to the one before it
    (set aside as bad-step-N); --resume A --out B with B holding another run's checkpoints is refused."""
    model, tok = tiny
    ckpt = _save(model, tok, tmp_path / "base")
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"messages": c}) for c in CONV * 4) + "\n")
    common = ["--model", str(ckpt), "--data", str(data), "--seq-len", "96", "--batch-size", "2",
              "--eval-batches", "1", "--save-every", "1", "--keep", "3", "--log-every", "1"]
    assert sft.main(common + ["--steps", "3", "--out", str(tmp_path / "a"), "--inject-nan", "3"]) == 1  # saved 1, 2
    assert sft.main(common + ["--steps", "3", "--out", str(tmp_path / "b")]) == 0
    (tmp_path / "a" / "step-000002" / "model.safetensors").write_bytes(b"torn")
    assert sft.main(common + ["--steps", "3", "--resume", str(tmp_path / "a"), "--out", str(tmp_path / "b")]) == 1
    assert "already holds checkpoints" in capsys.readouterr().err
    assert sft.main(common + ["--steps", "3", "--resume", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "step-000001" in out
    assert (tmp_path / "a" / "bad-step-000002").exists() and (tmp_path / "a" / "step-000003").exists()


def test_builtin_cold_start_mixes_direct_answers_and_search_traces_as_asked():
    plain = sft.builtin_examples(["arithmetic", "countdown"], [1, 2], 80, "train")
    mixed = sft.builtin_examples(["arithmetic", "countdown"], [1, 2], 80, "train", direct=0.5, retries=2)
    again = sft.builtin_examples(["arithmetic", "countdown"], [1, 2], 80, "train", direct=0.5, retries=2)
    assert mixed == again  # seeded by the prompts
    direct = searched = 0
    for (m0, where), (m1, _) in zip(plain, mixed):
        assert m0[0] == m1[0]  # the same problems, the same user turns
        a0, a1 = m0[1]["content"], m1[1]["content"]
        assert a0.split("</think>")[1] == a1.split("</think>")[1]  # the same boxed answer
        if a1 != a0:
            if a1.startswith("<think>\nThe answer is "):
                direct += 1
            else:
                assert where.startswith("countdown") and " is the target.\n</think>" in a1
                searched += "Wait, try again." in a1
    assert 25 <= direct <= 55 and searched > 5
    assert all("The answer is" not in m[1]["content"] for m, _ in plain)

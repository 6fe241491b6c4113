"""minke sample: rejection sampling keeps only verified-correct, finished, R1-form traces, deduplicated.

The model is tiny and trained for a few seconds to answer the first two train-split arithmetic problems
in R1's form — the first correctly, the second with a wrong answer — so the rejection is real."""

import functools
import json

import pytest
import torch

import minke
from minke.data.prompts import prompt_ids, r1_response
from minke.data.tokenizer import train_tokenizer
from minke.rl.sample import main, rejection_sample
from minke.tasks import check, corpus, problems

pytestmark = pytest.mark.usefixtures("one_thread")


@functools.lru_cache
def taught():
    """(model, tok, [right problem, wrong problem]); greedy output reproduces the taught replies."""
    ps = problems("arithmetic", "train", 2, 1)
    right, wrong = r1_response(ps[0]), r1_response(ps[1]).replace(f"{{{ps[1].answer}}}", f"{{{ps[1].answer}7}}")
    assert not check(ps[1], wrong) and check(ps[0], right)
    tok = train_tokenizer(corpus(200, seed=0) + [right, wrong], vocab_size=300)
    model = minke.build(minke.preset("tiny", vocab_size=tok.vocab_size, max_position_embeddings=256),
                        seed=0, dtype=torch.float32)
    prompts = [prompt_ids(tok, p, "chat") for p in ps]
    seqs = [q + tok.encode(r) + [tok.eos_id] for q, r in zip(prompts, (right, wrong))]
    T = max(map(len, seqs))
    ids = torch.tensor([s + [tok.pad_id] * (T - len(s)) for s in seqs])
    mask = torch.tensor([[len(q) - 1 <= t < len(s) - 1 for t in range(T - 1)] for q, s in zip(prompts, seqs)])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        loss = torch.nn.functional.cross_entropy(model(ids[:, :-1]).logits[mask], ids[:, 1:][mask])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if loss.item() < 0.01:
            break
    return model.eval(), tok, ps


def test_keeps_only_correct_deduplicated_traces():
    model, tok, ps = taught()
    kept, counts = rejection_sample(model, tok, ps, k=4, max_tokens=32, seed=0)
    assert counts["total"] == 8 and counts["wrong"] >= 4  # every sample of the wrongly taught problem
    assert counts["kept"] == len(kept) == 1 and counts["duplicate"] == 3  # four copies of one correct trace
    (ex,) = kept
    user, assistant = ex["messages"]
    assert user == {"role": "user", "content": ps[0].message()["content"]}
    assert assistant["role"] == "assistant"
    assert assistant["content"] == "<think>\n" + r1_response(ps[0])  # R1's full form
    assert check(ps[0], assistant["content"])


def test_sample_stage_writes_sft_jsonl(tmp_path, capsys):
    model, tok, ps = taught()
    d = tmp_path / "ckpt"
    minke.save(model, d)
    tok.save(d)
    out = tmp_path / "traces.jsonl"
    # the stage's train problems are the first --problems of the train split: exactly the taught two
    assert main(["--model", str(d), "--out", str(out), "--tasks", "arithmetic", "--difficulties", "1",
                 "--problems", "2", "--k", "3", "--temperature", "1.0", "--max-tokens", "32"]) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert lines, "nothing kept"
    for ex in lines:
        content = ex["messages"][1]["content"]
        assert content.startswith("<think>\n") and "</think>" in content
        assert ex["messages"][0]["content"] == ps[0].message()["content"] and check(ps[0], content)
    assert len({ex["messages"][1]["content"] for ex in lines}) == len(lines)  # deduplicated
    assert f"kept {len(lines)}/6 completions of 2 problems" in capsys.readouterr().out


def test_rejection_filters_each_reason():
    from minke.eval.sampling import Response

    (p,) = problems("arithmetic", "train", 1, 2)
    good = f"steps\n</think>\n\n\\boxed{{{p.answer}}}"

    class Scripted:
        def complete(self, probs, fmt, n, params):
            return [[Response(good, "length"),  # right but cut off
                     Response(f"steps \\boxed{{{p.answer}}}", "stop"),  # right but no </think>
                     Response(f"\\boxed{{{p.answer}}}\n</think>\n\nno box after", "stop"),  # box before </think>
                     Response(good.replace(p.answer, p.answer + "1"), "stop"),  # wrong
                     Response(good, "stop"), Response(good, "stop")]]  # kept once, then a duplicate

    kept, counts = rejection_sample(Scripted(), None, [p], k=6)
    assert counts == dict(total=6, kept=1, unfinished=1, bad_format=2, wrong=1, duplicate=1)
    assert kept[0]["messages"][1]["content"] == "<think>\n" + good
    # the base format opens no <think>: the answer box alone is the form
    kept, counts = rejection_sample(Scripted(), None, [p], k=6, fmt="base")
    assert counts == dict(total=6, kept=3, unfinished=1, bad_format=0, wrong=1, duplicate=1)
    assert [ex["messages"][1]["content"] for ex in kept][-1] == good  # no "<think>\n" prepended

"""A pretraining checkpoint resumes on another number of ranks (README: "A checkpoint resumes on any
number of ranks"): one process → two torchrun ranks → one process, against one uninterrupted process.

Each leg stops itself with --inject-nan (a resumable flag: the step is refused, the checkpoint before it
kept), so where each leg ends does not depend on timing. Two ranks sum in another order than one, so
records are compared to 1e-4 relative (as in tests/test_parallel.py), the routing biases (integer
loads, sign updates) exactly.
"""

import json

import pytest
import torch

import minke
from minke.train import checkpoint, pretrain
from test_parallel import one_thread, torchrun


def records(out):
    return [{k: v for k, v in json.loads(line).items() if k != "tok_s"}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_resume_on_a_different_number_of_ranks(tmp_path):
    from minke.data.tokenizer import train_tokenizer
    from minke.tasks import corpus

    tok = tmp_path / "tok"
    train_tokenizer(corpus(300, seed=0), vocab_size=320, out_dir=tok)
    flags = ["--tokenizer", str(tok), "--docs", "300", "--eval-docs", "30", "--seq-len", "32", "--batch-size", "4",
             "--steps", "6", "--warmup", "2", "--lr", "1e-2", "--eval-every", "2", "--save-every", "2",
             "--eval-batches", "2", "--eval-problems", "0", "--log-every", "100"]
    ref, out = tmp_path / "ref", tmp_path / "hop"
    with one_thread():
        assert pretrain.main([*flags, "--out", str(ref)]) == 0
        assert pretrain.main([*flags, "--out", str(out), "--inject-nan", "3"]) == 1  # steps 1-2 on one process
    assert checkpoint.latest(out).name == "step-000002"
    # steps 3-4 on two ranks, from the one-process checkpoint; refuses step 5
    with pytest.raises(AssertionError, match="step 5: loss nan"):
        torchrun("-m", "minke.cli", "pretrain", *flags, "--out", str(out), "--resume", str(out), "--inject-nan", "5")
    assert checkpoint.latest(out).name == "step-000004"
    with one_thread():  # steps 5-6 on one process, from the two-rank checkpoint
        assert pretrain.main([*flags, "--out", str(out), "--resume", str(out)]) == 0

    a, b = records(ref), records(out)
    assert [(r["kind"], r["step"]) for r in a] == [(r["kind"], r["step"]) for r in b]
    for ra, rb in zip(a, b):
        for k in ("loss", "ce", "mtp", "balance", "grad_norm", "lr", "eval_ce"):
            if k in ra:
                assert rb[k] == pytest.approx(ra[k], rel=1e-4), (ra["kind"], ra["step"], k)
        assert rb.get("load") == ra.get("load"), ra["step"]
    w1 = minke.load(ref / "final", dtype=torch.float32).state_dict()
    w2 = minke.load(out / "final", dtype=torch.float32).state_dict()
    assert w1.keys() == w2.keys()
    for k in w1:
        if k.endswith("e_score_correction_bias"):
            assert torch.equal(w1[k], w2[k]), k
        else:
            torch.testing.assert_close(w2[k], w1[k], rtol=1e-3, atol=1e-5, msg=k)

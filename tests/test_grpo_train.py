"""minke grpo end to end on a tiny model: the reward rises, resume is exact, bad input stops cleanly."""

import json
from pathlib import Path

import pytest

import minke
from minke.data.tokenizer import train_tokenizer
from minke.rl import train as grpo_train
from minke.tasks import corpus


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    tok = train_tokenizer(corpus(200, seed=0), vocab_size=300)
    cfg = minke.preset("tiny", vocab_size=-(-tok.vocab_size // 64) * 64, max_position_embeddings=256,
                       bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    path = tmp_path_factory.mktemp("grpo") / "base"
    minke.save(minke.build(cfg, seed=0), path)
    tok.save(path)
    return path


def _args(ckpt, out, steps, *extra):
    return ["--model", str(ckpt), "--out", str(out), "--steps", str(steps), "--prompts", "8", "--group-size", "4",
            "--max-tokens", "8", "--lr", "1e-2", "--warmup", "1", "--accuracy-weight", "0", "--format-weight", "0",
            "--reward", "grpo_toy:digits", "--eval-problems", "0", "--save-every", "2", "--log-every", "5",
            "--micro-batch", "16", *extra]


def _train(out):
    return [m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if m["kind"] == "train"]


def test_reward_rises_and_resume_is_exact(ckpt, tmp_path):
    """A seeded toy run (reward: the share of digit characters, which a random tiny policy rarely writes)
    must raise the reward. Fails with the advantage's sign flipped or the loss not backpropagated."""
    assert grpo_train.main(_args(ckpt, tmp_path / "a", 12)) == 0
    r = [m["reward"] for m in _train(tmp_path / "a")]
    assert sum(r[-3:]) / 3 > sum(r[:3]) / 3 + 0.15, r
    # interrupted at step 3 (NaN stop keeps step 2's checkpoint), resumed: the same run, bitwise
    assert grpo_train.main(_args(ckpt, tmp_path / "b", 12, "--inject-nan", "3")) == 1
    assert grpo_train.main(_args(ckpt, tmp_path / "b", 12, "--resume", str(tmp_path / "b"))) == 0
    ta, tb = _train(tmp_path / "a"), _train(tmp_path / "b")
    assert [m["reward"] for m in ta] == [m["reward"] for m in tb]
    assert [m["loss"] for m in ta] == [m["loss"] for m in tb]
    minke.load(tmp_path / "b" / "final")


def test_bad_input_is_named(ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit):
        grpo_train.parse_args(["--model", str(ckpt), "--group-size", "1"])
    assert "--group-size must be at least 2" in capsys.readouterr().err
    assert grpo_train.main(_args(ckpt, tmp_path / "c", 2)[:-2] + ["--reward", "no_such_module:f"]) == 1
    assert "no_such_module:f" in capsys.readouterr().err
    assert grpo_train.main(_args(ckpt, tmp_path / "d", 4, "--reward", "grpo_toy:broken")) == 1
    err = capsys.readouterr().err
    assert "grpo_toy:broken" in err and "ZeroDivisionError" in err and "no checkpoint was written yet" in err
    (tmp_path / "e").mkdir()
    assert grpo_train.main(["--model", str(tmp_path / "e"), "--out", str(tmp_path / "f")]) == 1
    assert "no tokenizer.json" in capsys.readouterr().err


def test_torchrun_two_ranks_match_one_process(ckpt, tmp_path, monkeypatch):
    """Data parallel GRPO: 2 gloo ranks, each rolling out half of the step's prompts (with the seeds one
    process gives them), the loss normalisers summed over ranks and the gradients all-reduced, follow the
    one-process run. Fails when the ranks' gradients are not summed (each rank steps on its half)."""
    from test_parallel import one_thread, torchrun

    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))  # the workers import grpo_toy
    # lr 1e-4: Adam's first step moves every weight by ~±lr whatever its gradient's size, so gradients that
    # are rounding noise (summed in another order over two ranks) make ±lr differences; small here.
    with one_thread():
        assert grpo_train.main(_args(ckpt, tmp_path / "one", 3, "--lr", "1e-4")) == 0
    torchrun("-m", "minke.cli", "grpo", *_args(ckpt, tmp_path / "two", 3, "--lr", "1e-4"), "--device", "cpu")
    one, two = _train(tmp_path / "one"), _train(tmp_path / "two")
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        for k in ("reward", "length_mean", "entropy"):
            assert b[k] == pytest.approx(a[k], rel=1e-3), (a["step"], k)
        # the norm comes back in the parameters' bf16: two summation orders may round it one ulp (2^-8
        # relative) apart; unsummed gradients would be off by ~30%
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=2**-7), (a["step"], "grad_norm")


def test_mu_steps_report_the_last_pass_clip_and_ratio(ckpt, tmp_path):
    """With μ = 2 the logged ratio and clip fraction are the second pass's (the first has ρ = 1 exactly;
    fails when the first pass's figures are logged: ratio 1.0, clip 0)."""
    assert grpo_train.main(_args(ckpt, tmp_path / "m", 2, "--mu", "2", "--eps-low", "0.01", "--eps-high", "0.01")) == 0
    rows = _train(tmp_path / "m")
    assert all(m["ratio"] != 1.0 and 0 < m["clip"] <= 1 for m in rows), rows

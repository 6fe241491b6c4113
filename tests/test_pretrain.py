"""`minke pretrain`: learning, exact resume, crash safety, balancing, MTP loss, bad inputs.
Runs of a few steps of the tiny preset at seq-len 64 on a pre-trained tokenizer."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import minke
from minke.data import loader
from minke.data.tokenizer import Tokenizer, train_tokenizer
from minke.tasks import corpus
from minke.train import checkpoint, pretrain


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    train_tokenizer(corpus(300, seed=0), vocab_size=320, out_dir=d)
    return d


def flags(out, tok_dir, *extra, steps=8):
    return ["--out", str(out), "--tokenizer", str(tok_dir), "--docs", "300", "--eval-docs", "30", "--seq-len", "64",
            "--batch-size", "4", "--steps", str(steps), "--warmup", "2", "--lr", "1e-2", "--eval-every", "4",
            "--save-every", "4", "--eval-batches", "2", "--eval-problems", "0", "--log-every", "100", *extra]


def history(out):
    """Every train and eval record but the timing: losses, lr, grad norm, expert loads, held-out loss."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "tok_s"} for line in lines]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tok_dir):
    out = tmp_path_factory.mktemp("run") / "a"
    assert pretrain.main(flags(out, tok_dir)) == 0
    return out


def same_weights(a, b):
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_short_run_learns_and_leaves_a_loadable_checkpoint(tmp_path, tok_dir):
    out = tmp_path / "run"
    assert pretrain.main(flags(out, tok_dir, "--eval-every", "10", "--save-every", "10", "--eval-problems", "2",
                               steps=30)) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_ce"] for r in records if r["kind"] == "eval"]
    assert len(evals) == 4 and evals[-1] < evals[0] - 1.0, evals  # held-out loss falls
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 31))
    assert len(train[-1]["maxvio"]) == 3 and all(v >= 0 for v in train[-1]["maxvio"])  # 2 MoE layers + MTP
    assert sorted(p.name for p in out.glob("step-*")) == ["step-000020", "step-000030"]  # --keep 2
    model = minke.load(out / "final", dtype=torch.float32)
    tok = Tokenizer.load(out / "final")
    assert model.config.vocab_size % 64 == 0 and model.config.vocab_size >= tok.vocab_size
    assert {p.name for p in (out / "plots").iterdir()} == {"loss.png", "maxvio.png", "expert_load.png"}
    assert "exact-answer accuracy" in (out / "report.md").read_text()


def killed_in_step(monkeypatch, argv: list[str], step: int = 6) -> None:
    """`minke pretrain argv`, killed (KeyboardInterrupt) while fetching step ``step``'s batch: mid-step,
    after the checkpoints before it."""
    calls = {"n": 0}
    next_batch = loader.PackedLoader.next_batch

    def dies(self):
        calls["n"] += 1
        if calls["n"] == step:
            raise KeyboardInterrupt
        return next_batch(self)

    monkeypatch.setattr(loader.PackedLoader, "next_batch", dies)
    with pytest.raises(KeyboardInterrupt):
        pretrain.main(argv)
    monkeypatch.undo()


def test_resume_after_interruption_is_bitwise_identical(tmp_path, tok_dir, uninterrupted, monkeypatch):
    out = tmp_path / "b"
    killed_in_step(monkeypatch, flags(out, tok_dir))  # after the step-4 checkpoint
    assert [m["step"] for m in history(out) if m["kind"] == "train"] == [1, 2, 3, 4, 5]
    assert checkpoint.latest(out).name == "step-000004"
    assert pretrain.main(flags(out, tok_dir, "--resume", str(out))) == 0
    assert history(out) == history(uninterrupted)  # bitwise: floats compared exactly
    assert same_weights(out / "final", uninterrupted / "final")


def test_logged_lr_follows_the_schedule(uninterrupted):
    """8 steps, --warmup 2, --lr 1e-2, cosine from step 4 (--decay-from 0.5) to 10% at step 8."""
    lr = [r["lr"] for r in history(uninterrupted) if r["kind"] == "train"]
    assert lr == pytest.approx([5e-3, 1e-2, 1e-2, 1e-2, 1e-2, 7.75e-3, 3.25e-3, 1e-3], rel=1e-9)


def test_grad_accum_equals_one_big_batch(tmp_path, tok_dir):
    """--batch-size 2 --grad-accum 2 sees the rows of --batch-size 4 in the same order: the same losses,
    gradient norms, expert loads and weights, up to summation order (5 steps: at --lr 1e-2 AdamW turns
    that ~1e-7 noise into ~1e-3 of the gradient norm by step 8). Catches: the micro-batch loss not
    divided by --grad-accum (2x the gradient norm; AdamW's update alone would hide it)."""
    def run(name, batch, accum):
        args = flags(tmp_path / name, tok_dir, "--grad-accum", str(accum), "--eval-batches", str(8 // batch),
                     "--eval-every", "5", "--save-every", "5", steps=5)  # the same 8 held-out windows
        args[args.index("--batch-size") + 1] = str(batch)
        assert pretrain.main(args) == 0
        return history(tmp_path / name), load_file(tmp_path / name / "final" / "model.safetensors")

    (a, wa), (b, wb) = run("big", 4, 1), run("accum", 2, 2)
    assert [(r["kind"], r["step"]) for r in a] == [(r["kind"], r["step"]) for r in b]
    for ra, rb in zip(a, b):
        for k in ("loss", "ce", "mtp", "balance", "grad_norm", "lr", "eval_ce"):
            if k in ra:
                assert rb[k] == pytest.approx(ra[k], rel=1e-4), (ra["kind"], ra["step"], k, ra[k], rb[k])
        assert rb.get("load") == ra.get("load"), ra["step"]
    for k in wa:  # AdamW divides by √v: an element whose gradient is near 0 moves by summation-order noise
        off = (wb[k] - wa[k]).abs() > 1e-5 + 1e-3 * wa[k].abs()  # (seen: 1 of 2048, 2.9e-5 off, on an AVX2 CPU)
        assert int(off.sum()) <= max(1, wa[k].numel() // 1000), (k, int(off.sum()))
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-3, msg=k)  # a tenth of one step's lr


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, tok_dir, uninterrupted, monkeypatch):
    out = tmp_path / "c"
    saves = {"n": 0}
    save = Tokenizer.save

    def crashes_on_second_checkpoint(self, d):
        if str(d).split(os.sep)[-1].startswith("ckpt.tmp"):
            saves["n"] += 1
            if saves["n"] == 2:
                raise OSError("disk gone")  # the model file of step 8 is already written
        return save(self, d)

    monkeypatch.setattr(Tokenizer, "save", crashes_on_second_checkpoint)
    with pytest.raises(OSError):
        pretrain.main(flags(out, tok_dir))
    monkeypatch.undo()
    tmp = list(out.glob("ckpt.tmp-*"))
    assert len(tmp) == 1 and (tmp[0] / "model.safetensors").exists()
    assert checkpoint.latest(out).name == "step-000004"
    minke.load(out / "step-000004")
    assert pretrain.main(flags(out, tok_dir, "--resume", str(out))) == 0
    assert not list(out.glob("ckpt.tmp-*"))
    assert history(out) == history(uninterrupted) and same_weights(out / "final", uninterrupted / "final")


# A child `minke pretrain` that SIGKILLs itself at a chosen point: a real kill (no finally blocks, no
# atexit, nothing flushed), at a place the test knows, whatever the machine's speed.
KILLER = """
import os, signal, sys
from minke.data.loader import PackedLoader
from minke.data.tokenizer import Tokenizer
from minke.train import pretrain
where, n = sys.argv[1], int(sys.argv[2])
calls = {"n": 0}
def kill_on_nth(f, match=lambda *a: True):
    def wrapped(*args):
        if match(*args):
            calls["n"] += 1
            if calls["n"] == n:
                os.kill(os.getpid(), signal.SIGKILL)
        return f(*args)
    return wrapped
if where == "mid-step":  # step n asks for its batch: after step n-1's checkpoint, before step n's update
    PackedLoader.next_batch = kill_on_nth(PackedLoader.next_batch)
else:  # the n-th checkpoint: its model file written into ckpt.tmp-*, its tokenizer and state not yet
    Tokenizer.save = kill_on_nth(Tokenizer.save, lambda self, d: os.path.basename(str(d)).startswith("ckpt.tmp"))
sys.exit(pretrain.main(sys.argv[3:]))
"""


@pytest.mark.parametrize("where,n,newest", [("mid-step", 6, 5), ("mid-save", 3, 2)])
def test_sigkill_resumes_bitwise(tmp_path, tok_dir, uninterrupted, where, n, newest):
    """A real SIGKILL of a running `minke pretrain` (checkpoint every step), then --resume: the same
    records and weights as the uninterrupted run. Asserts where the kill landed: the exit status, the
    newest complete checkpoint, the half-written save (mid-save), the last step logged."""
    out = tmp_path / "k"
    args = flags(out, tok_dir, "--save-every", "1", "--keep", "3")
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # bitwise needs equal thread counts
    p = subprocess.run([sys.executable, "-c", KILLER, where, str(n), *args], env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.stderr[-3000:])
    assert checkpoint.latest(out).name == f"step-{newest:06d}"
    assert not (out / "final").exists()
    half = list(out.glob("ckpt.tmp-*"))
    if where == "mid-save":
        assert len(half) == 1 and (half[0] / "model.safetensors").exists() and not (half[0] / checkpoint.STATE).exists()
        logged = n  # the step is logged before its checkpoint is written
    else:
        assert not half
        logged = n - 1
    assert [m["step"] for m in history(out) if m["kind"] == "train"] == list(range(1, logged + 1))
    assert pretrain.main(flags(out, tok_dir, "--resume", str(out))) == 0
    assert not list(out.glob("ckpt.tmp-*"))
    assert history(out) == history(uninterrupted) and same_weights(out / "final", uninterrupted / "final")


def test_bias_update_balances_a_skewed_router():
    model = minke.build(minke.preset("tiny"), seed=0)
    moe = model.layers[1].mlp
    x = torch.randn(512, 64, generator=torch.Generator().manual_seed(0))
    moe.gate.e_score_correction_bias[0] = 0.5  # expert 0 wins every token's routing

    def vio():
        _, idx, _ = moe.gate(x)
        return torch.bincount(idx.flatten(), minlength=moe.n_experts)

    start = pretrain.max_vio(vio())
    assert start > 2.5  # 512 of the 1024 (token, expert) slots on expert 0: 4× the mean
    pretrain.balance_step([("l", moe)], [vio()], gamma=0)
    assert pretrain.max_vio(vio()) == start  # γ = 0: the bias stays
    for _ in range(200):
        pretrain.balance_step([("l", moe)], [vio()], gamma=0.01)
    assert pretrain.max_vio(vio()) < 0.5 < start


def test_mtp_loss_is_part_of_the_loss_and_trains_the_mtp_module():
    model = minke.build(minke.preset("tiny", vocab_size=256), seed=0).train()
    batch = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0))
    moes = model.named_moe_layers(mtp=True)
    loss, parts = pretrain.lm_loss(model, batch, moes, mtp_lambda=0.3, balance_alpha=1e-4)
    assert parts["mtp"] is not None and parts["balance"] is not None
    assert torch.allclose(loss, parts["ce"] + 0.3 * parts["mtp"] + 1e-4 * parts["balance"])
    # the MTP target, spelled out: module 1's logits at input position i predict token i + 2
    with torch.no_grad():
        logits = model(batch[:, :-1], mtp=True).mtp_logits[0]  # (B, T-1, V)
        nll = [-logits[:, i].log_softmax(-1)[torch.arange(2), batch[:, i + 2]] for i in range(logits.shape[1])]
    assert torch.allclose(parts["mtp"], torch.stack(nll).mean(), atol=1e-5)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.mtp.parameters())

    model.zero_grad(set_to_none=True)
    loss, parts = pretrain.lm_loss(model, batch, model.named_moe_layers(mtp=False), 0.0, 1e-4)
    loss.backward()
    assert parts["mtp"] is None and all(p.grad is None for p in model.mtp.parameters())
    assert torch.allclose(loss, parts["ce"] + 1e-4 * parts["balance"])


# ---- bad input: a clear error, nothing lost ---------------------------------------------------------
def test_bad_data_files(tmp_path, tok_dir, capsys):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    for name, why in [("empty.txt", "empty data file"), ("missing.txt", "cannot read"), ("latin1.txt", "not UTF-8")]:
        assert pretrain.main(flags(tmp_path / "out", tok_dir, "--data", str(tmp_path / name))) == 1
        err = capsys.readouterr().err
        assert name in err and why in err, err


def test_seq_len_beyond_max_position_embeddings(tmp_path, tok_dir, capsys):
    assert pretrain.main(flags(tmp_path / "out", tok_dir, "--seq-len", "2048")) == 1
    err = capsys.readouterr().err
    assert "--seq-len 2048" in err and "max_position_embeddings 1024" in err


def test_set_overrides_preset_fields(tmp_path, tok_dir, capsys):
    """--set KEY=VALUE changes the preset's config (JSON values); a field that does not exist or a pair
    without '=' is an error naming it, before anything is written."""
    out = tmp_path / "deeper"
    assert pretrain.main(flags(out, tok_dir, "--set", "num_hidden_layers=4", "rms_norm_eps=1e-5", steps=2)) == 0
    cfg = minke.load(out / "final").config
    assert cfg.num_hidden_layers == 4 and cfg.rms_norm_eps == 1e-5
    for bad, why in (("num_hiden_layers=4", "'num_hiden_layers' is not a model config field"),
                     ("num_hidden_layers", "expected KEY=VALUE")):
        assert pretrain.main(flags(tmp_path / "bad", tok_dir, "--set", bad)) == 1
        assert why in capsys.readouterr().err
        assert not (tmp_path / "bad").exists()


def test_resume_with_a_different_config_names_the_fields(tmp_path, tok_dir, uninterrupted, capsys):
    before = sorted(p.name for p in uninterrupted.iterdir())
    args = flags(tmp_path / "new", tok_dir, "--resume", str(uninterrupted), "--lr", "2e-2", "--seq-len", "32")
    assert pretrain.main(args) == 1
    err = capsys.readouterr().err
    assert "lr: 0.01 in the checkpoint, 0.02 now" in err and "seq_len: 64 in the checkpoint, 32 now" in err
    assert sorted(p.name for p in uninterrupted.iterdir()) == before
    # a fresh run into a directory holding checkpoints is refused too
    assert pretrain.main(flags(uninterrupted, tok_dir)) == 1
    assert "--resume" in capsys.readouterr().err


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, tok_dir, capsys):
    out = tmp_path / "nan"
    assert pretrain.main(flags(out, tok_dir, "--inject-nan", "6")) == 1
    err = capsys.readouterr().err
    assert "step 6: loss nan is not finite" in err and "step-000004" in err, err
    assert [p.name for p in checkpoint.step_dirs(out)] == ["step-000004"] and not (out / "final").exists()
    minke.load(out / "step-000004")


def test_compiled_training_matches_eager(tmp_path, tok_dir, uninterrupted):
    """--compile (torch.compile of forward + backward, the MoE in one graph) follows the eager run's losses."""
    out = tmp_path / "compiled"
    assert pretrain.main(flags(out, tok_dir, "--compile")) == 0
    eager = [r["loss"] for r in history(uninterrupted) if r["kind"] == "train"]
    compiled = [r["loss"] for r in history(out) if r["kind"] == "train"]
    assert len(compiled) == len(eager) == 8
    assert compiled == pytest.approx(eager, rel=1e-3), (compiled, eager)


def test_resume_accepts_options_added_after_the_checkpoint_only_when_off():
    from minke.train.pretrain import config_diff

    old = {"lr": 1e-3, "model": {"hidden_size": 64}}
    assert config_diff(old, {**old, "bf16_moments": False, "dsa": None}) == []
    assert config_diff(old, {**old, "bf16_moments": True}) == ["bf16_moments: None in the checkpoint, True now"]
    assert config_diff({**old, "fp8": True}, {**old, "fp8": False}) == ["fp8: True in the checkpoint, False now"]
    assert config_diff(old, {**old, "lr": 2e-3}) == ["lr: 0.001 in the checkpoint, 0.002 now"]

"""Scale-out (minke/train/parallel.py): expert parallelism + FSDP2 on 2 CPU processes (gloo) against
one process on the full batch.

tests/dist_worker.py runs under torchrun; the single-process reference is the same ``train`` here.
Both compute in fp32 on identical weights and data; they differ only in summation order (each rank
sums its half of the batch, then the halves are summed across ranks), which moves results by ~1e-7
relative per step. Five AdamW steps keep that well under the 1e-4 relative tolerance used below,
while a wrong gradient scale (experts not divided by W: 2× their gradient) moves the clipped global
norm by tens of percent.
"""

import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch

import dist_worker
import minke
from minke.train import parallel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REL = 1e-4


def torchrun(*args: str) -> None:
    """2 CPU processes; --standalone: a local rendezvous on a free port, so concurrent runs do not collide."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", *args]
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-6000:]


@pytest.fixture(scope="module")
def dist_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    torchrun(os.path.join(ROOT, "tests", "dist_worker.py"), "--out", str(out))
    with open(out / "result.json") as f:
        return out, json.load(f)


@contextlib.contextmanager
def one_thread():
    """Toy-sized work in this process: a second OpenMP thread only waits on a busy CI core (17× slower
    measured under load); the torchrun workers run one thread each as well."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def reference():
    cfg = minke.preset("tiny")
    model = minke.build(cfg, seed=0)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    with one_thread():
        return model, dist_worker.train(model, dist_worker.batches(cfg.vocab_size), parallel.Dist()), init


@pytest.mark.parametrize("mode", ["ep", "fsdp"])
def test_forward_and_first_gradients_match_one_process(dist_run, mode):
    r = dist_run[1][mode]
    assert r["forward_diff"] < 1e-5  # EP (all-to-all) MoE vs the plain grouped MoE, same weights
    assert r["grad_rel_diff"] < 1e-5  # gathered grads of 2 half batches vs grads of the full batch


@pytest.mark.parametrize("mode", ["ep", "fsdp"])
def test_training_matches_one_process(dist_run, reference, mode):
    r, ref = dist_run[1][mode], reference[1]
    assert len(r["loss"]) == dist_worker.STEPS
    torch.testing.assert_close(torch.tensor(r["loss"]), torch.tensor(ref["loss"]), rtol=REL, atol=0)
    torch.testing.assert_close(torch.tensor(r["grad_norm"]), torch.tensor(ref["grad_norm"]), rtol=REL, atol=0)
    assert ref["grad_norm"][0] > dist_worker.CLIP  # clipping is active, so the gradient scale matters


@pytest.mark.parametrize("mode", ["ep", "fsdp"])
def test_gathered_checkpoint_matches_one_process(dist_run, reference, mode):
    """The rank-0 checkpoint (experts gathered from both ranks) holds the single-process weights and the
    same routing biases, moved by the aux-loss-free update on globally reduced loads.

    Weights are compared by how far they moved: AdamW divides by √v, so an element whose gradient is
    ~0 turns fp32 summation noise into a visible step; per tensor, the difference of the two updates
    stays below REL of the update (measured ≤ 2.5e-5)."""
    out, _ = dist_run
    model = minke.load(out / f"ckpt_ep{int(mode == 'ep')}", dtype=torch.float32)
    ref, init = reference[0].state_dict(), reference[2]
    got = model.state_dict()
    assert got.keys() == ref.keys()
    for k in ref:
        if k.endswith("e_score_correction_bias"):
            assert ref[k].abs().max() > 0, k  # the bias did move
            torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-7)
        else:
            assert (got[k] - ref[k]).norm() <= REL * (ref[k] - init[k]).norm(), k


@pytest.mark.parametrize("mode", ["ep", "fsdp"])
def test_checkpoint_loads_into_a_parallelized_model(dist_run, mode):
    assert dist_run[1][mode]["reload_diff"] == 0.0  # fp32 saved, fp32 loaded: exact


def test_rank_without_tokens_still_steps(dist_run):
    # Rank 1's experts got no rows: backward and the gradient norm completed, its expert grads are 0.
    assert dist_run[1]["ep"]["starved_grad_abs"] == 0.0


def test_single_process_is_identity(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    d = parallel.init_distributed("cpu")
    assert (d.rank, d.world, d.is_main, d.mesh) == (0, 1, True, None)
    model = minke.build(minke.preset("tiny"), seed=0)
    assert parallel.parallelize(model, d) is model and parallel.full_state_model(model, d) is model
    loads = [torch.arange(8), torch.ones(8, dtype=torch.long)]
    assert all(a is b for a, b in zip(parallel.reduce_loads(loads), loads))
    x = torch.arange(6).view(6, 1)
    assert torch.equal(parallel.shard_batch(x, d), x)
    assert parallel.all_reduce_sum(x) is x and parallel.is_main()


def train_records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def pretrain_one_vs_torchrun(tmp_path, extra: list[str], rel: float) -> tuple[dict, dict]:
    """`minke pretrain` for 4 steps in one process and under `torchrun --nproc_per_node 2` on the same
    tokenizer, data and flags (+ ``extra``): the same records in order, losses and held-out loss within
    ``rel``; returns both final checkpoints' fp32 state dicts (same keys)."""
    from minke.data.tokenizer import train_tokenizer
    from minke.tasks import corpus
    from minke.train import pretrain

    tok = tmp_path / "tok"
    train_tokenizer(corpus(300, seed=0), vocab_size=320, out_dir=tok)
    flags = ["--tokenizer", str(tok), "--docs", "300", "--eval-docs", "30", "--batch-size", "4",
             "--steps", "4", "--warmup", "2", "--lr", "1e-2", "--eval-every", "4", "--save-every", "4",
             "--eval-batches", "2", "--log-every", "100", *extra]
    with one_thread():
        assert pretrain.main([*flags, "--out", str(tmp_path / "one")]) == 0
    torchrun("-m", "minke.cli", "pretrain", *flags, "--out", str(tmp_path / "two"))
    one, two = train_records(tmp_path / "one"), train_records(tmp_path / "two")
    assert [r["kind"] for r in one] == [r["kind"] for r in two]
    for a, b in zip(one, two):
        for k in ("loss", "ce", "mtp", "eval_ce"):
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=rel), (a["step"], k)
    w1 = minke.load(tmp_path / "one" / "final", dtype=torch.float32).state_dict()
    w2 = minke.load(tmp_path / "two" / "final", dtype=torch.float32).state_dict()
    assert w1.keys() == w2.keys()
    return w1, w2


PRETRAIN = os.path.join(ROOT, "minke", "train", "pretrain.py")


@pytest.mark.skipif(not os.path.exists(PRETRAIN) or "parallel.init_distributed" not in open(PRETRAIN).read(),
                    reason="minke/train/pretrain.py does not run under torchrun yet")
def test_pretrain_under_torchrun_matches_one_process(tmp_path):
    """`torchrun --nproc_per_node 2 -m minke.cli pretrain` (global batch split over the ranks) against
    `minke pretrain` in one process: same losses, held-out loss and routing biases."""
    w1, w2 = pretrain_one_vs_torchrun(tmp_path, ["--seq-len", "32", "--eval-problems", "2"], REL)
    for k in w1:
        if k.endswith("e_score_correction_bias"):
            assert torch.equal(w1[k], w2[k]), k

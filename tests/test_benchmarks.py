"""The benchmarks run end to end at toy size (their figures are checked by people, not here)."""

import argparse
import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def load(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_train_step_benchmark_runs(tmp_path):
    out = tmp_path / "train_step.json"
    report = load("train_step").main(["--preset", "tiny", "--batch", "1", "--seq", "16", "--warmup", "1",
                                      "--steps", "1", "--repeats", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == report
    assert report["minke_tok_s"] > 0 and report["minke_mtp_tok_s"] > 0 and report["ratio"] > 0
    assert report["transformers_impl"] == {"attn_implementation": "sdpa", "experts_implementation": "grouped_mm"}


def test_fp8_loss_benchmark_runs_and_reads_finished_runs(tmp_path, monkeypatch):
    bench = load("fp8_loss")
    args = ["--preset", "tiny", "--layers", "2", "--steps", "2", "--batch-size", "2", "--seq-len", "32", "--lr", "1e-3",
            "--warmup", "1", "--eval-every", "2", "--eval-batches", "1", "--seeds", "0", "--control", "--jobs", "2",
            "--out", str(tmp_path)]
    report = bench.main(args)
    finals = {}
    for kind in ("base", "fp8", "control"):
        rows = [json.loads(line) for line in (tmp_path / f"{kind}-s0" / "metrics.jsonl").read_text().splitlines()]
        finals[kind] = [r["eval_ce"] for r in rows if r["kind"] == "eval" and r["step"] == 2][0]
    (seed,) = report["seeds"]
    assert (seed["base"], seed["fp8"]) == (finals["base"], finals["fp8"]) and seed["base"] != seed["fp8"]
    assert seed["gap"] == report["mean_gap"] == finals["fp8"] / finals["base"] - 1
    # the control is the baseline with only its learning rate nudged by 1e-4, and a different run for it
    stamps = {k: json.loads((tmp_path / f"{k}-s0" / "fp8_loss_args.json").read_text()) for k in ("base", "control")}
    assert stamps["control"][stamps["control"].index("--lr") + 1] == "0.0010001"
    renamed = {"0.0010001": "0.001", str(tmp_path / "control-s0"): str(tmp_path / "base-s0")}
    assert [renamed.get(x, x) for x in stamps["control"]] == stamps["base"]
    assert seed["control"] == finals["control"] != finals["base"] and "--fp8" not in stamps["control"]
    assert seed["control_gap"] == finals["control"] / finals["base"] - 1
    assert report["control_rms_gap"] == pytest.approx(abs(seed["control_gap"]))
    assert "FP8 GEMMs on cpu" in (tmp_path / "fp8-s0.log").read_text()  # the FP8 run really took --fp8
    assert "FP8 GEMMs" not in (tmp_path / "base-s0.log").read_text()

    def no_run(*a, **k):
        raise AssertionError("a finished run was run again")
    monkeypatch.setattr(bench.subprocess, "run", no_run)
    assert bench.main(args) == report
    with pytest.raises(SystemExit, match="other settings"):  # the same --out with another lr: not reused
        bench.main(args + ["--lr", "2e-3"])


def test_fp8_loss_stdlib_corpus_is_fixed_source_text_the_runs_train_on(tmp_path):
    """--corpus stdlib: the same documents in the same order every time (both arms and every seed read one
    file), whole standard-library sources, about the size asked, and the runs get it as --data."""
    from minke.data.loader import read_documents

    bench = load("fp8_loss")
    first = bench.stdlib_corpus(tmp_path / "a.jsonl", 0.2)
    docs = read_documents([str(first)])
    assert docs == read_documents([str(bench.stdlib_corpus(tmp_path / "b.jsonl", 0.2))])
    assert len(docs) > 3 and 0.2e6 <= sum(map(len, docs)) < 0.2e6 + max(map(len, docs))
    a = argparse.Namespace(
        corpus="stdlib", corpus_mb=0.2, out=str(tmp_path), preset="tiny", layers=2, steps=2, batch_size=2, seq_len=32, lr=1e-3,
        warmup=1, dtype="float32", device="cpu", eval_every=2, eval_batches=1)
    cmd = bench.pretrain_args(a, 0, True, tmp_path / "fp8-s0")
    assert cmd[cmd.index("--data") + 1] == str(tmp_path / "stdlib-0.2mb.jsonl") and cmd[-1] == "--fp8"


def test_fp8_gemm_benchmark_runs_fp8_against_the_baseline():
    """Both arms of each pair run and are timed; the FP8 arm's output carries E4M3's error (so it really
    is FP8: random operands give ~4% relative to fp32, the fp32 baseline 0), edge blocks included."""
    bench = load("fp8_gemm")
    report = bench.main(["--tokens", "64", "--shapes", "256x128", "130x200", "--warmup", "0", "--repeats", "1",
                         "--calls", "1"])
    assert report["native"] is False and report["dtype"] == "float32"
    assert list(report["shapes"]) == ["256x128", "130x200"]
    for shape in report["shapes"].values():
        for pair in ("gemm", "linear", "train"):
            r = shape[pair]
            assert r["base_ms"] > 0 and r["fp8_ms"] > 0 and r["speedup"] == r["base_ms"] / r["fp8_ms"]
            assert 0.01 < r["fp8_rel_err"] < 0.08 and r["base_rel_err"] == 0.0
        train = shape["train"]
        assert 0.01 < train["fp8_rel_err_dx"] < 0.08 and 0.01 < train["fp8_rel_err_dw"] < 0.08
        assert train["base_rel_err_dx"] < 1e-6 and train["base_rel_err_dw"] < 1e-6
    with pytest.raises(SystemExit):
        bench.main(["--shapes", "256by128"])


def test_fp8_grad_benchmark_compares_one_steps_gradients(tmp_path):
    """Same weights, same batch: the FP8 gradient differs from the baseline's (it really went through
    E4M3) but points the same way, far closer than the baseline's own gradient on another batch; the
    two forwards' held-out losses agree to well under 1%."""
    from minke.train.pretrain import main as pretrain

    assert pretrain(["--preset", "tiny", "--steps", "1", "--batch-size", "2", "--seq-len", "32", "--docs", "200",
                     "--eval-every", "1", "--eval-batches", "1", "--eval-problems", "0", "--out", str(tmp_path / "run")]) == 0
    report = load("fp8_grad").main(["--model", str(tmp_path / "run" / "final"), "--batch-size", "2",
                                    "--seq-len", "32", "--eval-batches", "2", "--dtype", "float32"])
    groups = report["groups"]
    assert set(groups) == {"routed experts", "MoE gate", "shared experts and dense MLPs", "attention projections",
                           "embedding, head, norms"}
    for name, g in groups.items():
        assert 0.9 < g["fp8_vs_base"] < 1 - 1e-6, name
        assert g["base_batch_vs_batch"] < g["fp8_vs_base"], name
        assert -1 <= g["error_batch_vs_batch"] < 0.9, name  # two batches' FP8 errors: not the same vector
    rel = report["held_out_ce"]["relative"]
    assert rel != 0 and abs(rel) < 0.01

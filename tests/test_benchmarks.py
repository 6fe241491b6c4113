"""The benchmarks run end to end at toy size (their figures are checked by people, not here)."""

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
    args = ["--preset", "tiny", "--layers", "2", "--steps", "2", "--batch-size", "2", "--seq-len", "32",
            "--eval-every", "2", "--eval-batches", "1", "--seeds", "0", "--jobs", "2", "--out", str(tmp_path)]
    report = bench.main(args)
    finals = {}
    for kind in ("base", "fp8"):
        rows = [json.loads(line) for line in (tmp_path / f"{kind}-s0" / "metrics.jsonl").read_text().splitlines()]
        finals[kind] = [r["eval_ce"] for r in rows if r["kind"] == "eval" and r["step"] == 2][0]
    (seed,) = report["seeds"]
    assert (seed["base"], seed["fp8"]) == (finals["base"], finals["fp8"]) and seed["base"] != seed["fp8"]
    assert seed["gap"] == report["mean_gap"] == finals["fp8"] / finals["base"] - 1
    assert "FP8 GEMMs on cpu" in (tmp_path / "fp8-s0.log").read_text()  # the FP8 run really took --fp8
    assert "FP8 GEMMs" not in (tmp_path / "base-s0.log").read_text()

    def no_run(*a, **k):
        raise AssertionError("a finished run was run again")
    monkeypatch.setattr(bench.subprocess, "run", no_run)
    assert bench.main(args) == report
    with pytest.raises(SystemExit, match="other settings"):  # the same --out with another lr: not reused
        bench.main(args + ["--lr", "2e-3"])

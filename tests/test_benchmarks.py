"""The benchmarks run end to end at toy size (their figures are checked by people, not here)."""

import importlib.util
import json
from pathlib import Path

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

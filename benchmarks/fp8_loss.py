"""Held-out loss of FP8 training (``minke pretrain --fp8``) against a higher-precision baseline, over seeds.

Issue 14's bar is DeepSeek-V3's (§3.3): FP8 training within 0.25% relative loss of BF16. At a small
model and a few hundred steps one pair of runs hardly shows that: any perturbation (FP8's rounding, or
a 1e-4 nudge of the learning rate) sends a run down another trajectory, whose final held-out loss lands
elsewhere — by ~0.3% at the default lr 4e-4 with 100 warmup steps, by 3–6% at lr 1e-3 with 50, where
the small model's loss spikes after warmup. So this runs the same ``minke pretrain`` for each seed
twice — baseline and ``--fp8``, same data, init and steps — and reports each seed's relative gap (FP8 /
baseline − 1 of the final held-out cross-entropy) and their mean and standard error; ``--control``
adds a third run per seed, the baseline with its learning rate × (1 + 1e-4), whose gap is what chance
alone makes.

``--corpus stdlib`` trains on this Python's standard-library sources (``--data``, written to
``--out``/stdlib-4mb.jsonl) instead of minke's task corpus, whose arithmetic skills appear at steps that any
perturbation moves.

Runs go to ``--out``/{base,fp8}-s{seed}; one whose final evaluation is already in its metrics.jsonl
is read, not rerun, so an interrupted sweep continues where it stopped (a run directory keeps the
settings it was started with: a sweep with other settings into the same ``--out`` is refused). ``--jobs`` runs that many at
once, the cores split between them (``OMP_NUM_THREADS``).

    .venv/bin/python benchmarks/fp8_loss.py --seeds 0 1 2 --jobs 2          # CPU, fp32 baseline, ~40 min a pair
    .venv/bin/python benchmarks/fp8_loss.py --corpus stdlib --dtype bfloat16 --eval-batches 16 --seeds 0 --control --jobs 2
    .venv/bin/python benchmarks/fp8_loss.py --device cuda --dtype bfloat16 --seeds 0 1 2 3 --steps 2000

Prints one JSON object: the settings, per seed the two final losses and the gap, the held-out curves,
and ``mean_gap`` / ``stderr_gap`` (relative, not %).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from minke.train.report import read_metrics


def curve(out: Path) -> dict[int, float]:
    """Held-out cross-entropy by step from a run's metrics.jsonl (empty if it has none yet)."""
    return {r["step"]: r["eval_ce"] for r in read_metrics(out / "metrics.jsonl") if r.get("kind") == "eval"}


def stdlib_corpus(path: Path, megabytes: float) -> Path:
    """A .jsonl corpus of the running Python's standard-library sources (one file a document, tests left
    out, shuffled with a fixed seed, the first ``megabytes`` of them): text never repeated within a few
    hundred steps, in place of the task corpus, whose arithmetic skills appear at steps that any
    perturbation moves."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if not {"site-packages", "test", "tests", "idle_test"} & set(p.relative_to(root).parts))
    random.Random(0).shuffle(files)
    docs, size = [], 0
    for f in files:
        if size >= megabytes * 1e6:
            break
        text = f.read_text(encoding="utf-8", errors="replace")
        docs.append(json.dumps({"text": text}))
        size += len(text)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(docs) + "\n")
    tmp.replace(path)
    return path


def corpus_path(a) -> Path:
    """--corpus stdlib's file; its size is in the name, so a run trained on another size is not reused."""
    return Path(a.out) / f"stdlib-{a.corpus_mb:g}mb.jsonl"


CONTROL = 1e-4  # --control's relative nudge of the baseline's learning rate


def pretrain_args(a, seed: int, fp8: bool, out: Path, lr: float | None = None) -> list[str]:
    data = ["--data", str(corpus_path(a))] if a.corpus == "stdlib" else []
    return [sys.executable, "-m", "minke.cli", "pretrain", "--preset", a.preset, *data,
            "--set", f"num_hidden_layers={a.layers}", "--steps", str(a.steps), "--batch-size", str(a.batch_size),
            "--seq-len", str(a.seq_len), "--lr", str(a.lr if lr is None else lr), "--warmup", str(a.warmup),
            "--dtype", a.dtype, "--device", a.device,
            "--eval-every", str(a.eval_every), "--eval-batches", str(a.eval_batches), "--eval-problems", "0",
            "--seed", str(seed), "--log-every", str(a.eval_every), "--out", str(out)] + (["--fp8"] if fp8 else [])


def run(a, seed: int, arm: str) -> dict[int, float]:
    """One run of ``arm``: 'base', 'fp8', or 'control' (the baseline with its learning rate nudged)."""
    out = Path(a.out) / f"{arm}-s{seed}"
    cmd = pretrain_args(a, seed, arm == "fp8", out, a.lr * (1 + CONTROL) if arm == "control" else None)
    args, stamp = cmd[3:], out / "fp8_loss_args.json"  # what the run in ``out`` was started with
    if stamp.exists() and json.loads(stamp.read_text()) != args:
        raise SystemExit(f"fp8_loss: {out} holds a run with other settings ({stamp}); choose another --out")
    done = curve(out)
    if a.steps in done:
        return done
    if any(out.glob("step-*")):  # an interrupted run: continue from its last checkpoint
        cmd += ["--resume", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // a.jobs)))
    out.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(args))
    with open(out.with_suffix(".log"), "a") as log:
        rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    done = curve(out)
    if rc != 0 or a.steps not in done:
        raise SystemExit(f"fp8_loss: {' '.join(cmd)} failed (exit {rc}); see {out.with_suffix('.log')}")
    return done


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--preset", default="small")
    p.add_argument("--layers", type=int, default=3, help="num_hidden_layers (small has 12; 3 fits a CPU)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--warmup", type=int, default=100, help="linear warmup steps")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="the baseline's compute dtype, and what the FP8 run keeps outside its GEMMs (float32: "
                        "CPUs without AVX-512 run bf16 GEMMs ~100x slower than fp32)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--jobs", type=int, default=1, help="runs at once")
    p.add_argument("--control", action="store_true",
                   help=f"also run each seed's baseline with its learning rate x (1 + {CONTROL:g}): the gap that "
                        "nudge makes (control_gap) is how far apart two runs land by chance alone")
    p.add_argument("--corpus", default="task", choices=["task", "stdlib"],
                   help="task: minke's task corpus (the default of minke pretrain); stdlib: this Python's "
                        "standard-library sources (--corpus-mb of them), never repeated in a few hundred steps")
    p.add_argument("--corpus-mb", type=float, default=4.0, help="--corpus stdlib: megabytes of source text")
    p.add_argument("--out", default="out/fp8_loss")
    a = p.parse_args(argv)
    if a.corpus == "stdlib":
        stdlib_corpus(corpus_path(a), a.corpus_mb)
    arms = ("base", "fp8") + (("control",) if a.control else ())
    jobs = [(s, arm) for s in a.seeds for arm in arms]
    with ThreadPoolExecutor(a.jobs) as pool:
        curves = dict(zip(jobs, pool.map(lambda j: run(a, *j), jobs)))
    seeds = []
    for s in a.seeds:
        base, fp8 = curves[(s, "base")], curves[(s, "fp8")]
        row = {"seed": s, "base": base[a.steps], "fp8": fp8[a.steps], "gap": fp8[a.steps] / base[a.steps] - 1,
               "curve": {k: [base[k], fp8[k]] for k in sorted(base) if k in fp8}}
        if a.control:
            control = curves[(s, "control")]
            row |= {"control": control[a.steps], "control_gap": control[a.steps] / base[a.steps] - 1,
                    "control_curve": {k: control[k] for k in sorted(control)}}
        seeds.append(row)
    gaps = [r["gap"] for r in seeds]
    report = {"settings": {k: v for k, v in vars(a).items() if k not in ("out", "jobs")}, "seeds": seeds,
              "mean_gap": statistics.mean(gaps),
              "stderr_gap": statistics.stdev(gaps) / len(gaps) ** 0.5 if len(gaps) > 1 else None, "bar": 0.0025}
    if a.control:  # the root mean square of the nudges' gaps: the size of a gap chance alone makes
        report["control_rms_gap"] = statistics.mean(r["control_gap"] ** 2 for r in seeds) ** 0.5
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()

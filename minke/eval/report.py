"""`minke report`: one page for a pipeline run — each stage's held-out evaluation side by side, the
RL curves, and ``summary.json``.

    minke report --out out/speedrun --stage pretrain out/speedrun/eval/pretrain.json \\
                 --stage sft out/speedrun/eval/sft.json --stage grpo out/speedrun/eval/grpo.json \\
                 --grpo out/speedrun/grpo

Every stage must have been evaluated on the same problems with the same k, temperature and top-p (the
report refuses to compare otherwise). Output: ``report.md``, ``accuracy_per_stage.png`` (pass@1 per task
and difficulty, one bar per stage), the GRPO run's reward / accuracy / length plots copied beside it, and
``summary.json`` ({stage: {overall and per-row figures}}, the improvement of the last stage over the
one before in pass@1 points).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

SAME = ("k", "temperature", "top_p", "problems", "max_tokens", "seed")


def save_json(obj, path: str | Path) -> Path:
    """Write an evaluation result (or summary) as indented JSON, making the directory; the one writer
    behind `minke eval --out`, the passkey evaluation's and the report's summary.json."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))
    return path


def load_stage(path: str | Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"minke report: {path}: cannot read an evaluation JSON ({e})") from None


def bar_plot(stages: dict[str, dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..train.report import _save

    names = list(stages)
    rows = [f"{r['task']}/{r['difficulty']}" for r in stages[names[0]]["rows"]] + ["overall"]
    fig, ax = plt.subplots(figsize=(max(7, 1.2 * len(rows)), 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        vals = [100 * r["pass@1"] for r in stages[name]["rows"]] + [100 * stages[name]["overall"]["pass@1"]]
        ax.bar([j + i * width for j in range(len(rows))], vals, width, label=name)
    c = stages[names[0]]["config"]
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(rows))], rows, rotation=30, ha="right")
    ax.set(ylabel="pass@1 (%)", title=f"Held-out pass@1 over k={c['k']} (T={c['temperature']}, top-p {c['top_p']})")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    return _save(fig, path)


def write(out: Path, stages: dict[str, dict], grpo_dir: Path | None, seconds: dict[str, float]) -> Path:
    names = list(stages)
    first = stages[names[0]]["config"]
    for n in names[1:]:
        c = stages[n]["config"]
        diff = [f"{k}: {first.get(k)} vs {c.get(k)}" for k in SAME if first.get(k) != c.get(k)]
        cells = lambda s: [(r["task"], r["difficulty"], r["n"]) for r in s["rows"]]  # noqa: E731
        if cells(stages[n]) != cells(stages[names[0]]):
            diff.append(f"problems per task/difficulty {cells(stages[names[0]])} vs {cells(stages[n])}")
        if diff:
            raise SystemExit(f"minke report: stage {n} was evaluated differently from {names[0]}: {'; '.join(diff)}")
    out.mkdir(parents=True, exist_ok=True)
    plots = [bar_plot(stages, out / "accuracy_per_stage.png")]
    if grpo_dir is not None:
        for name in ("reward", "accuracy", "length"):
            src = grpo_dir / "plots" / f"{name}.png"
            if src.exists():
                plots.append(Path(shutil.copy(src, out / f"grpo_{name}.png")))
    k = first["k"]
    summary = {"config": {key: first[key] for key in ("k", "temperature", "top_p", "max_tokens", "problems")},
               "stages": {n: {"format": s["config"]["format"], "overall": _fig(s["overall"]),
                              "rows": {f"{r['task']}/{r['difficulty']}": _fig(r) for r in s["rows"]}}
                          for n, s in stages.items()},
               "seconds": seconds}
    if len(names) >= 2:
        a, b = stages[names[-2]]["overall"]["pass@1"], stages[names[-1]]["overall"]["pass@1"]
        summary["improvement"] = {"from": names[-2], "to": names[-1], "pass@1_points": round(100 * (b - a), 2)}
    save_json(summary, out / "summary.json")

    lines = ["# minke speedrun: pretrain → cold-start SFT → GRPO", "",
             f"Held-out problems: {first['problems']} (test split; every task at every difficulty), k = {k} samples "
             f"each at temperature {first['temperature']}, top-p {first['top_p']}, at most {first['max_tokens']} new "
             f"tokens. pass@1 = mean correctness over the k samples; pass@{k} unbiased; cons@{k} = majority vote; "
             "greedy = one temperature-0 answer.", "",
             "| stage | format | pass@1 | pass@%d | cons@%d | greedy | mean tokens |" % (k, k), "|---|---|---|---|---|---|---|"]
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
    for n, s in stages.items():
        o = s["overall"]
        lines.append(f"| {n} | {s['config']['format']} | {pct(o['pass@1'])} | {pct(o['pass@k'])} | "
                     f"{pct(o['cons@k'])} | {pct(o.get('greedy'))} | {o['mean_tokens'] or 0:.0f} |")
    if "improvement" in summary:
        imp = summary["improvement"]
        lines += ["", f"**{imp['to']} vs {imp['from']}: {imp['pass@1_points']:+.1f} points of pass@1.**"]
    lines += ["", "## pass@1 per task and difficulty (%)", "",
              "| task/difficulty | n | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for i, r in enumerate(stages[names[0]]["rows"]):
        lines.append(f"| {r['task']}/{r['difficulty']} | {r['n']} | "
                     + " | ".join(pct(stages[n]["rows"][i]["pass@1"]) for n in names) + " |")
    if seconds:
        lines += ["", "## Time", "", "| stage | seconds |", "|---|---|"]
        lines += [f"| {n} | {s:.0f} |" for n, s in seconds.items()]
    lines += [""] + [f"![{p.stem}]({p.name})" for p in plots]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _fig(r: dict) -> dict:
    return {k: r.get(k) for k in ("n", "pass@1", "pass@k", "cons@k", "greedy", "mean_tokens")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="minke report", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for report.md, summary.json and the PNGs")
    p.add_argument("--stage", nargs=2, action="append", required=True, metavar=("NAME", "EVAL.json"),
                   help="a stage and its `minke eval --out` JSON, in pipeline order")
    p.add_argument("--grpo", metavar="DIR", help="the GRPO run directory (its plots join the report)")
    p.add_argument("--seconds", nargs=2, action="append", default=[], metavar=("STAGE", "SECONDS"),
                   help="wall time of a stage, for the table")
    a = p.parse_args(argv)
    stages = {name: load_stage(path) for name, path in a.stage}
    path = write(Path(a.out), stages, Path(a.grpo) if a.grpo else None, {n: float(s) for n, s in a.seconds})
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Training metrics (``metrics.jsonl``) → PNG plots and a markdown report.

Records, one JSON object a line: ``{"kind": "train", "step", "loss", "ce", "mtp", "balance", "lr",
"grad_norm", "tok_s", "maxvio": [per MoE layer], "load": [[tokens per expert] per MoE layer]}`` and
``{"kind": "eval", "step", "eval_ce", "eval_mtp"}`` and ``{"kind": "accuracy", "step", "task", "difficulty",
"n", "accuracy", "samples": [[question, completion], …]}``.

``python -m minke.train.report OUT`` redraws the plots and report of an output directory.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def _save(fig, path, line_ax=None):
    """Write a figure as PNG and close it; a line plot's axes get a grid and a legend."""
    import matplotlib.pyplot as plt

    if line_ax is not None:
        line_ax.grid(alpha=0.3)
        line_ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics file; a torn last line (the writer was killed mid-write) is dropped."""
    path = Path(path)
    lines = path.read_text().splitlines() if path.exists() else []
    out = []
    for i, line in enumerate(lines):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise ValueError(f"{path}:{i + 1}: not a JSON record") from None
    return out


def metrics_log(path: str | Path, metrics: list[dict], write: bool):
    """Rewrite ``path`` with ``metrics`` (the records up to the checkpoint a run resumes from: later ones
    are dropped; atomic, as a kill may come now) and return ``record(m)``, which appends a record to
    the list and, when ``write`` (rank 0), to the file."""
    path = Path(path)
    if write:
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(m) + "\n" for m in metrics))
        os.replace(tmp, path)

    def record(m: dict) -> None:
        metrics.append(m)
        if write:
            with path.open("a") as f:
                f.write(json.dumps(m) + "\n")

    return record


def _smooth(ys: list[float], w: int) -> list[float]:
    """Centred moving average over 2w+1 points (no lag; shorter windows at the ends)."""
    acc = [0.0]
    for y in ys:
        acc.append(acc[-1] + y)
    return [(acc[min(len(ys), i + w + 1)] - acc[max(0, i - w)]) / (min(len(ys), i + w + 1) - max(0, i - w))
            for i in range(len(ys))]


def plot(metrics: list[dict], out_dir: str | Path, layer_names: list[str], last: int = 100) -> list[Path]:
    """loss.png (train / held-out / MTP), maxvio.png (per MoE layer), expert_load.png (layers × experts,
    each expert's routed tokens over the last ``last`` steps relative to the layer's mean)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train = [m for m in metrics if m["kind"] == "train"]
    evals = [m for m in metrics if m["kind"] == "eval"]
    if not train:
        return []
    steps = [m["step"] for m in train]
    w = len(train) // 200  # half-width of the smoothing window
    paths = []

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [m["ce"] for m in train], color="tab:blue", alpha=0.25, lw=0.8)
    ax.plot(steps, _smooth([m["ce"] for m in train], w), color="tab:blue", label="train next-token CE")
    if any(m.get("mtp") is not None for m in train):
        mt = [(m["step"], m["mtp"]) for m in train if m.get("mtp") is not None]
        ax.plot([s for s, _ in mt], _smooth([v for _, v in mt], w), color="tab:orange", label="train MTP CE")
    if evals:
        ax.plot([m["step"] for m in evals], [m["eval_ce"] for m in evals], "o-", color="tab:green",
                label="held-out next-token CE")
        if any(m.get("eval_mtp") is not None for m in evals):
            ax.plot([m["step"] for m in evals if m.get("eval_mtp") is not None],
                    [m["eval_mtp"] for m in evals if m.get("eval_mtp") is not None], "s--", color="tab:red",
                    label="held-out MTP CE")
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="Loss")
    paths.append(_save(fig, out_dir / "loss.png", ax))

    if not layer_names:  # a dense model: no expert loads to draw
        return paths
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, name in enumerate(layer_names):
        ax.plot(steps, _smooth([m["maxvio"][i] for m in train], w), label=name)
    ax.set(xlabel="step", ylabel="MaxVio = max load / mean load − 1", title="Expert load imbalance per MoE layer")
    ax.set_ylim(bottom=0)
    paths.append(_save(fig, out_dir / "maxvio.png", ax))

    recent = train[-last:]
    n_layers, n_exp = len(layer_names), len(recent[0]["load"][0])
    totals = [[sum(m["load"][i][e] for m in recent) for e in range(n_exp)] for i in range(n_layers)]
    rel = [[v * n_exp / max(1, sum(row)) for v in row] for row in totals]  # load / mean load: 1 = balanced
    span = max(0.25, max(abs(v - 1) for row in rel for v in row))
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * n_exp + 2), 0.5 * n_layers + 2))
    im = ax.imshow(rel, cmap="coolwarm", aspect="auto", vmin=1 - span, vmax=1 + span)
    if n_exp <= 32:
        for i, row in enumerate(rel):
            for e, v in enumerate(row):
                ax.text(e, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
    ax.set(xlabel="expert", yticks=range(n_layers), yticklabels=layer_names, xticks=range(n_exp),
           title=f"Expert load / mean load, steps {recent[0]['step']}–{recent[-1]['step']} (1 = balanced)")
    fig.colorbar(im, ax=ax)
    paths.append(_save(fig, out_dir / "expert_load.png"))
    return paths


def write_report(out: str | Path, run: dict, params: dict, metrics: list[dict], plots: list[Path],
                 layer_names: list[str]) -> Path:
    """report.md: the config, parameter counts, final losses, balance and accuracy, and the plots."""
    out = Path(out)
    train = [m for m in metrics if m["kind"] == "train"]
    evals = [m for m in metrics if m["kind"] == "eval"]
    acc = [m for m in metrics if m["kind"] == "accuracy"]
    lines = ["# Pretraining report", ""]
    if (out / "final").exists():
        lines += [f"Final checkpoint: `{out / 'final'}` → `{(out / 'final').resolve().name}` (loads with "
                  f"`minke.load`, its tokenizer with `Tokenizer.load`).", ""]
    if acc:
        a = acc[-1]
        lines += [f"Greedy exact-answer accuracy on {a['n']} held-out {a['task']} problems (difficulty "
                  f"{a['difficulty']}) at step {a['step']}: **{a['accuracy']:.0%}**. Samples:", ""]
        lines += [f"- `{q}` → `{r!r}`" for q, r in a["samples"]] + [""]
    lines += ["## Results", "", "| | value |", "|---|---|"]
    if evals:
        first, final = evals[0], evals[-1]
        lines.append(f"| held-out next-token CE, step {first['step']} → {final['step']} | "
                     f"{first['eval_ce']:.4f} → {final['eval_ce']:.4f} |")
        if final.get("eval_mtp") is not None:
            lines.append(f"| held-out MTP CE (final) | {final['eval_mtp']:.4f} |")
    if train:
        tail = train[-max(1, len(train) // 10):]  # last 10% of steps: less noisy than one step
        mean = lambda k: sum(m[k] for m in tail) / len(tail)  # noqa: E731
        lines.append(f"| train next-token CE (mean of last {len(tail)} steps) | {mean('ce'):.4f} |")
        if all(m.get("mtp") is not None for m in tail):
            lines.append(f"| train MTP CE (mean of last {len(tail)} steps) | {mean('mtp'):.4f} |")
        for i, name in enumerate(layer_names):
            v = sum(m["maxvio"][i] for m in tail) / len(tail)
            lines.append(f"| MaxVio {name} (mean of last {len(tail)} steps) | {v:.3f} |")
        lines.append(f"| throughput (median) | {sorted(m['tok_s'] for m in train)[len(train) // 2]:,.0f} tok/s |")
    lines += ["", "## Model", "", "| parameters | count |", "|---|---|"]
    lines += [f"| {k} | {v:,} |" for k, v in params.items()]
    lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.relative_to(out).as_posix()})" for p in plots]
    lines += ["", "## Run configuration", "", "```json", json.dumps(run, indent=2, default=str), "```", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> int:
    """Redraw plots and report.md of a finished output directory."""
    from ..config import ModelConfig
    from . import checkpoint

    out = Path((argv or sys.argv[1:])[0])
    ckpt = checkpoint.latest(out)
    if ckpt is None:
        print(f"{out}: no checkpoint", file=sys.stderr)
        return 1
    state = checkpoint.load_state(ckpt)
    names = state["layer_names"]
    metrics = read_metrics(out / "metrics.jsonl")
    plots = plot(metrics, out / "plots", names)
    path = write_report(out, state["run"], ModelConfig.load(ckpt).param_counts(), metrics, plots, names)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`minke grpo`: reinforcement learning with verifiable rewards (DeepSeekMath §4.1, DeepSeek-R1 §2.2).

One step:

    draw N train problems (a deterministic stream: the position is part of the checkpoint)
    rollout: G samples each through the engine (one prefill per prompt, forked), at --temperature
    rewards: accuracy (the task's checker / math-verify) + format (<think>…</think> then \\boxed{}),
             optional DAPO overlong penalty and module:function callables (rewards.py)
    advantages: group-normalised (grpo.py); --dynamic-sampling drops all-equal groups and draws more
    μ times: old log-probs (the training forward's own, so ρ = 1 on the first pass), then
             loss = policy_loss(clipped ratio ε_low/ε_high, β·k3 to the frozen reference, --loss-agg)
             over micro-batches with the whole batch's normalisers; clip; AdamW step

R1-Zero (``--format r1-zero``): straight from a pretrained base with R1-Zero's template; R1 (``chat``,
the default): from a cold-start SFT checkpoint, prompted through its chat template.

Under torchrun every rank holds the whole model (data parallel): rank r rolls out prompts r, r+W, … of
the step's N, the loss's normalisers (tokens, sequences) are summed over ranks first and gradients are
summed after the backward, so W ranks take the one-process step. Rank 0 writes logs and checkpoints.

Output directory: step-XXXXXX/ checkpoints (HF directory + tokenizer + trainer_state.pt: optimizer,
scheduler, RNG, prompt position, the reference model when β > 0), final -> the last, metrics.jsonl,
plots/*.png, report.md. ``--resume DIR`` continues exactly; a reward callable that raises or a
non-finite loss stops the run naming the cause, with the last checkpoint kept.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import sys
import time
from collections import deque
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from ..data.prompts import FORMATS, think_opened
from ..data.tokenizer import Tokenizer
from ..eval.data import builtin
from ..inference.engine import Engine
from ..inference.sampling import SamplingParams
from ..tasks import TASKS, Problem, get_task, split_seed
from ..train import checkpoint, parallel
from ..train.optim import build_optimizer, build_scheduler
from ..train.report import metrics_log, read_metrics
from ..train.pretrain import PretrainError, _Help, config_diff, find_resume, fmt_time, rng_state, say, set_rng_state
from . import grpo
from .rewards import RewardError, Rewards, reflection_rate
from .rollout import batch_tensors, rollout

RESUMABLE = {"out", "resume", "device", "eval_every", "eval_problems", "eval_k", "save_every", "keep", "log_every",
             "inject_nan"}


CLIP_STATS = ("clip", "clip_low", "clip_high", "ratio")


class GRPOError(RuntimeError):
    """Bad input or a stopped run; the message says what, where, and what was kept."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="minke grpo", description=__doc__.split("\n\n")[0], formatter_class=_Help)
    # ---- model and prompts
    g = p.add_argument_group("model and prompts")
    g.add_argument("--model", required=True, metavar="DIR", help="start from this checkpoint (SFT, or a base for R1-Zero)")
    g.add_argument("--format", default="chat", choices=FORMATS[:2],
                   help="chat: the checkpoint's chat template (R1); r1-zero: R1-Zero's plain template over a base")
    g.add_argument("--tasks", nargs="+", default=sorted(TASKS), help="built-in tasks to train on (train split)")
    g.add_argument("--difficulties", nargs="+", type=int, default=[1, 2, 3], help="difficulty levels, drawn evenly")
    # ---- rollouts
    g = p.add_argument_group("rollouts")
    g.add_argument("--prompts", type=int, default=16, help="prompts per step (N)")
    g.add_argument("--group-size", type=int, default=8, help="samples per prompt (G)")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the rollouts")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus mass of the rollouts (1 keeps the policy exact)")
    g.add_argument("--max-tokens", type=int, default=160, help="new tokens per response at most")
    g.add_argument("--dynamic-sampling", action="store_true",
                   help="DAPO: drop groups whose rewards are all equal and draw more prompts (up to 4 draws)")
    # ---- rewards
    g = p.add_argument_group("rewards")
    g.add_argument("--accuracy-weight", type=float, default=1.0, help="weight of the accuracy reward")
    g.add_argument("--format-weight", type=float, default=1.0, help="weight of the format reward (R1: equal)")
    g.add_argument("--overlong", type=int, metavar="BUFFER",
                   help="DAPO soft overlong penalty over the last BUFFER tokens before --max-tokens")
    g.add_argument("--reward", nargs="+", default=[], metavar="MODULE:FUNCTION[=WEIGHT]",
                   help="extra rewards: fn(problem, response) -> float, weight 1 unless given")
    # ---- the objective
    g = p.add_argument_group("objective")
    g.add_argument("--loss-agg", default="grpo", choices=grpo.AGGREGATIONS,
                   help="grpo: per-sequence mean; dapo: token mean over the batch; dr_grpo: / (B · max tokens)")
    g.add_argument("--no-std", action="store_true", help="advantage r − mean without the std division (Dr. GRPO)")
    g.add_argument("--eps-low", type=float, default=0.2, help="ratio clip below 1 − ε_low")
    g.add_argument("--eps-high", type=float, default=0.2, help="ratio clip above 1 + ε_high (DAPO clip-higher: 0.28)")
    g.add_argument("--beta", type=float, default=0.0,
                   help="weight of the k3 KL to the frozen start model (R1-Zero: 0.001; 0 keeps no reference)")
    g.add_argument("--mu", type=int, default=1, help="optimizer steps per rollout batch (μ)")
    g.add_argument("--micro-batch", type=int, default=64, help="rows per forward/backward")
    # ---- optimisation
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=100, help="GRPO steps (rollout batches)")
    g.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate (constant after the warmup)")
    g.add_argument("--warmup", type=int, default=5, help="linear warmup optimizer steps")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay on matrices")
    g.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping threshold")
    # ---- run
    g = p.add_argument_group("run")
    g.add_argument("--out", help="output directory (default: the --resume directory, else out/grpo)")
    g.add_argument("--resume", metavar="DIR", help="continue the newest checkpoint of this output directory")
    g.add_argument("--seed", type=int, default=0, help="seed of the prompt stream and the sampling")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, …")
    g.add_argument("--eval-every", type=int, default=25, help="held-out pass@1 every N steps (and at the start/end)")
    g.add_argument("--eval-problems", type=int, default=8, help="held-out problems per task and difficulty")
    g.add_argument("--eval-k", type=int, default=2, help="samples per held-out problem (temperature 0.6, top-p 0.95)")
    g.add_argument("--save-every", type=int, default=25, help="checkpoint every N steps (and at the end)")
    g.add_argument("--keep", type=int, default=2, help="checkpoints kept")
    g.add_argument("--log-every", type=int, default=1, help="print a progress line every N steps")
    g = p.add_argument_group("testing")
    g.add_argument("--inject-nan", type=int, metavar="STEP", help="poison the loss of STEP (tests the NaN stop)")
    a = p.parse_args(argv)
    for k in ("prompts", "max_tokens", "mu", "micro_batch", "steps", "eval_every", "save_every", "keep", "log_every"):
        if getattr(a, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be at least 1, got {getattr(a, k)}")
    if a.group_size < 2:
        p.error(f"--group-size must be at least 2 (GRPO compares samples within a group), got {a.group_size}")
    unknown = sorted(set(a.tasks) - set(TASKS))
    if unknown:
        p.error(f"--tasks: unknown {', '.join(unknown)}; known: {', '.join(sorted(TASKS))}")
    if a.overlong is not None and not 0 < a.overlong <= a.max_tokens:
        p.error(f"--overlong {a.overlong}: the buffer must lie in (0, --max-tokens={a.max_tokens}]")
    return a


# ---- prompts ------------------------------------------------------------------------------------
def prompt_stream(tasks, difficulties, seed: int, indices) -> list[Problem]:
    """Problems ``indices`` of the run's endless train stream, cycling over (task, difficulty)."""
    cells = [(t, d) for t in tasks for d in difficulties]
    out = []
    for i in indices:
        t, d = cells[i % len(cells)]
        p = get_task(t).generate(split_seed("train", seed * 1_000_003 + i), d, "train")
        p.meta["difficulty"] = d
        out.append(p)
    return out


# ---- one step -----------------------------------------------------------------------------------
def sequence_logprobs(model, inputs, targets, temperature: float):
    """(B, T) log-probs of the targets under the policy at the rollout temperature, and the logits."""
    logits = model(inputs).logits  # (B, T, V)
    return grpo.token_logprobs(logits, targets, temperature), logits


def optimize(model, ref, opt, sched, inputs, targets, mask, adv, a, d: parallel.Dist, step: int) -> dict:
    """μ optimizer steps on one rollout batch; returns the first (on-policy) pass's stats, with the clip
    fractions and mean ratio of the last pass when μ > 1 (this rank's tokens)."""
    B = inputs.shape[0]
    # the whole batch's normalisers, over ranks (a row without completion tokens counts for nothing)
    totals = parallel.all_reduce_sum(torch.tensor([float(mask.sum()), float(mask.any(-1).sum())], device=d.device))
    total_tokens, total_seqs = totals[0], int(totals[1])
    chunks = [slice(s, min(B, s + a.micro_batch)) for s in range(0, B, a.micro_batch)]
    old = [None] * len(chunks)  # filled on the first pass: the training forward's own log-probs
    ref_lp = [None] * len(chunks)
    if ref is not None:
        with torch.no_grad():
            for j, c in enumerate(chunks):
                ref_lp[j] = sequence_logprobs(ref, inputs[c], targets[c], a.temperature)[0]
    first: dict = {}
    for inner in range(a.mu):
        opt.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        loss_total = 0.0
        for j, c in enumerate(chunks):
            logp, logits = sequence_logprobs(model, inputs[c], targets[c], a.temperature)
            ent = grpo.entropy(logits.detach(), a.temperature) if inner == 0 else None
            loss, st = grpo.policy_loss(logp, old[j], adv[c], mask[c], a.eps_low, a.eps_high, a.beta, ref_lp[j],
                                        a.loss_agg, a.max_tokens, total_tokens, total_seqs, ent)
            if a.inject_nan == step + 1:
                loss = loss * float("nan")
            loss.backward()
            if inner == 0:
                old[j] = logp.detach()
            loss_total += float(loss.detach())
            for k, v in st.items():
                if k != "tokens":
                    sums[k] = sums.get(k, 0.0) + v * st["tokens"]
            sums["tokens"] = sums.get("tokens", 0.0) + st["tokens"]
        if d.world > 1:  # sum the ranks' gradients in one collective (an expert no token reached has none yet)
            params = [p for p in model.parameters() if p.requires_grad]
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            flat = torch.cat([p.grad.flatten() for p in params])
            dist.all_reduce(flat)
            for p, g in zip(params, flat.split([p.numel() for p in params])):
                p.grad.copy_(g.view_as(p))
            loss_total = float(parallel.all_reduce_sum(torch.tensor(loss_total, device=d.device)))
        gnorm = parallel.clip_grad_norm_(model.parameters(), a.clip)
        if not (math.isfinite(loss_total) and math.isfinite(gnorm)):
            bad = f"loss {loss_total}" if not math.isfinite(loss_total) else f"gradient norm {gnorm}"
            raise GRPOError(f"step {step + 1}: {bad} is not finite; stopped without applying the step")
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        n = max(1.0, sums.pop("tokens"))
        if inner == 0:  # ρ = 1 exactly here: its clip and ratio figures say nothing
            first = {k: v / n for k, v in sums.items() if k not in CLIP_STATS}
            first.update(loss=loss_total, grad_norm=gnorm, lr=lr)
        elif inner == a.mu - 1:  # the last pass's ratios show how far the μ steps moved the policy
            first.update({k: v / n for k, v in sums.items() if k in CLIP_STATS})
    return first


def train_step(model, ref, engine, tok, rewards: Rewards, opt, sched, a, d: parallel.Dist, step: int,
               position: int) -> tuple[dict, int, list]:
    """One GRPO step from prompt ``position``; returns (metrics, next position, a few samples)."""
    params = SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p,
                            seed=(a.seed * 7_919 + step * 1_000_003) % 2**63)
    kept_inputs, rollout_tokens, rollout_s = [], 0, 0.0
    all_rewards, comps_all, texts_all, lengths_all, finishes = [], {}, [], [], []
    groups_drawn = groups_kept = 0
    draws = 4 if a.dynamic_sampling else 1
    samples = []
    kept_all = 0  # groups kept so far over every rank (each rank's draws must match: same positions)
    for draw in range(draws):
        need = a.prompts - kept_all if a.dynamic_sampling else a.prompts
        start, position = position, position + need
        mine = list(range(start, position))[d.rank::d.world]  # this rank's share of the draw
        probs = prompt_stream(a.tasks, a.difficulties, a.seed, mine)
        r = rollout(engine, tok, probs, a.group_size, replace(params, seed=(params.seed + draw * 104_729) % 2**63),
                    a.format, index=[i - start for i in mine])
        rollout_tokens += r.tokens
        rollout_s += r.seconds
        lengths = [len(c) for c in r.completions]
        error = None
        try:
            total, comps = rewards.score([p for p in r.problems for _ in range(a.group_size)], r.texts, lengths)
        except RewardError as e:
            error = str(e)
        errors = [e for e in parallel.all_gather_object(error) if e]  # every rank stops, naming the cause
        if errors:
            raise GRPOError(f"step {step + 1}: {errors[0]}")
        R = total.view(len(probs), a.group_size)
        keep = grpo.informative_groups(R) if a.dynamic_sampling else torch.ones(len(probs), dtype=torch.bool)
        groups_drawn += len(probs)
        # metrics see every sample drawn; training sees the kept groups
        all_rewards.append(total)
        for k, v in comps.items():
            comps_all.setdefault(k, []).extend(v)
        texts_all += r.texts
        lengths_all += lengths
        finishes += r.finish
        if not samples and r.texts:
            samples = [[r.problems[0].prompt, r.texts[0], float(total[0])]]
        if keep.any():
            kept_inputs.append((r, R, keep))
            groups_kept += int(keep.sum())
        kept_all = int(parallel.all_reduce_sum(torch.tensor(groups_kept, device=d.device)))
        if not a.dynamic_sampling or kept_all >= a.prompts:
            break

    if d.world > 1:  # the step's figures over every rank's samples (rank order = one process's order)
        parts = parallel.all_gather_object((torch.cat(all_rewards).tolist(), comps_all, texts_all, lengths_all,
                                            finishes, groups_drawn, groups_kept, rollout_tokens, rollout_s))
        all_rewards = [torch.tensor(sum((p[0] for p in parts), []))]
        comps_all = {k: sum((p[1][k] for p in parts), []) for k in comps_all}
        texts_all, lengths_all, finishes = (sum((p[i] for p in parts), []) for i in (2, 3, 4))
        groups_drawn, groups_kept = sum(p[5] for p in parts), sum(p[6] for p in parts)
        rollout_tokens, rollout_s = sum(p[7] for p in parts), max(p[8] for p in parts)
    t_train = time.perf_counter()
    stats: dict = {}
    learn = bool(kept_inputs)
    if d.world > 1:  # every rank steps, or none: a rank without a kept group joins with no tokens
        learn = float(parallel.all_reduce_sum(torch.tensor(float(learn), device=d.device))) > 0
    if learn:
        if kept_inputs:
            inputs, targets, mask, adv = _assemble(kept_inputs, a, tok.pad_id or 0)
        else:
            inputs = targets = torch.full((1, 1), tok.pad_id or 0, dtype=torch.long)
            mask, adv = torch.zeros(1, 1, dtype=torch.bool), torch.zeros(1)
        stats = optimize(model, ref, opt, sched, inputs.to(d.device), targets.to(d.device), mask.to(d.device),
                         adv.to(d.device), a, d, step)
        train_tokens = mask.numel()
    else:  # every group all-equal: nothing to learn from this step (dynamic sampling ran out of draws)
        train_tokens = 0
        for _ in range(a.mu):
            sched.step()
    train_s = time.perf_counter() - t_train
    total = torch.cat(all_rewards)
    m = {"reward": float(total.mean()), "reward_std": float(total.std()) if total.numel() > 1 else 0.0,
         **{f"reward_{k}": sum(v) / len(v) for k, v in comps_all.items()},
         "accuracy": sum(comps_all["accuracy"]) / len(comps_all["accuracy"]),
         "length_mean": sum(lengths_all) / len(lengths_all), "length_max": max(lengths_all),
         "truncated": sum(f == "length" for f in finishes) / len(finishes),
         "reflection": reflection_rate(texts_all),
         "groups": groups_drawn, "groups_kept": groups_kept,
         "rollout_tok_s": rollout_tokens / max(rollout_s, 1e-9), "train_tok_s": train_tokens / max(train_s, 1e-9),
         **stats}
    return m, position, samples


def _assemble(kept, a, pad_id: int):
    """The kept groups' rows, padded to one width: inputs, targets, mask (B, T) and advantages (B,)."""
    parts = []
    for r, R, keep in kept:
        adv = grpo.group_advantages(R, scale_by_std=not a.no_std)  # (N, G)
        x, y, mk = batch_tensors(r, pad_id)
        rows = keep.repeat_interleave(a.group_size)
        parts.append((x[rows], y[rows], mk[rows], adv[keep].flatten()))
    T = max(p[0].shape[1] for p in parts)
    pad = lambda t, v: torch.nn.functional.pad(t, (0, T - t.shape[1]), value=v)  # noqa: E731
    return (torch.cat([pad(p[0], pad_id) for p in parts]), torch.cat([pad(p[1], pad_id) for p in parts]),
            torch.cat([pad(p[2], False) for p in parts]), torch.cat([p[3] for p in parts]))


# ---- evaluation, report --------------------------------------------------------------------------
def held_out_pass1(engine, tok, probs, a) -> dict:
    from ..eval.run import evaluate

    res = evaluate(engine, tok, probs, k=a.eval_k, temperature=0.6, top_p=0.95, max_tokens=a.max_tokens,
                   fmt=a.format, seed=12_345)
    return {"pass1": res["overall"]["pass@1"],
            "per_task": {f"{r['task']}/{r['difficulty']}": r["pass@1"] for r in res["rows"]}}


def plot(metrics: list[dict], out_dir: Path) -> list[Path]:
    """reward.png (total and components), accuracy.png (train accuracy, held-out pass@1), length.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..train.report import _save, _smooth

    out_dir.mkdir(parents=True, exist_ok=True)
    train = [m for m in metrics if m["kind"] == "train"]
    evals = [m for m in metrics if m["kind"] == "eval"]
    if not train:
        return []
    steps = [m["step"] for m in train]
    w = max(1, len(train) // 30)
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ["reward"] + sorted(k for k in train[0] if k.startswith("reward_") and k != "reward_std"):
        ax.plot(steps, _smooth([m[key] for m in train], w), label=key)
    ax.set(xlabel="GRPO step", ylabel="mean reward", title="Reward (smoothed)")
    paths.append(_save(fig, out_dir / "reward.png", ax))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, _smooth([m["accuracy"] for m in train], w), label="rollout accuracy (T=%.1f)" % train[0].get("temperature", 1.0))
    if evals:
        ax.plot([m["step"] for m in evals], [m["pass1"] for m in evals], "o-", label="held-out pass@1 (T=0.6)")
    ax.set(xlabel="GRPO step", ylabel="accuracy", title="Accuracy", ylim=(0, 1))
    paths.append(_save(fig, out_dir / "accuracy.png", ax))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, _smooth([m["length_mean"] for m in train], w), label="mean")
    ax.plot(steps, [m["length_max"] for m in train], alpha=0.4, label="max")
    ax.set(xlabel="GRPO step", ylabel="response tokens", title="Response length")
    paths.append(_save(fig, out_dir / "length.png", ax))
    return paths


def write_report(out: Path, run_cfg: dict, metrics: list[dict], plots: list[Path]) -> Path:
    train = [m for m in metrics if m["kind"] == "train"]
    evals = [m for m in metrics if m["kind"] == "eval"]
    lines = [f"# GRPO run `{out}`", "", "## Configuration", "", "```json", json.dumps(run_cfg, indent=1), "```", ""]
    if train:
        head, tail = train[: max(1, len(train) // 10)], train[-max(1, len(train) // 10):]
        mean = lambda rows, k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
        lines += ["## Training", "", "| | first 10% of steps | last 10% |", "|---|---|---|"]
        for k in ("reward", "accuracy", "length_mean", "reflection", "clip", "entropy"):
            if k in train[0] and k in train[-1]:
                lines.append(f"| {k} | {mean(head, k):.3f} | {mean(tail, k):.3f} |")
        lines.append("")
    if evals:
        lines += ["## Held-out pass@1 (temperature 0.6, top-p 0.95)", "", "| step | pass@1 |", "|---|---|"]
        lines += [f"| {m['step']} | {m['pass1']:.3f} |" for m in evals] + [""]
    lines += [f"![{p.stem}](plots/{p.name})" for p in plots]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


# ---- the stage -----------------------------------------------------------------------------------
def parse_rewards(a) -> Rewards:
    custom = []
    for spec in a.reward:
        fn, eq, w = spec.rpartition("=") if "=" in spec.split(":")[-1] else (spec, "", "")
        try:
            custom.append((fn if eq else spec, float(w) if eq else 1.0))
        except ValueError:
            raise GRPOError(f"--reward {spec!r}: the weight after '=' must be a number") from None
    weights = {"accuracy": a.accuracy_weight, "format": a.format_weight}
    overlong = (a.max_tokens, a.overlong) if a.overlong else None
    try:
        return Rewards(weights, overlong, custom, think_opened(a.format))
    except (RewardError, ValueError) as e:
        raise GRPOError(f"--reward: {e}") from None


def run(a: argparse.Namespace) -> Path:
    import minke

    out = Path(a.out or a.resume or "out/grpo")
    d = parallel.init_distributed(None if a.device == "auto" else a.device)
    if not d.is_main:
        sys.stdout = open(os.devnull, "w")
    if a.prompts % d.world:
        raise GRPOError(f"--prompts {a.prompts} does not divide over {d.world} ranks")
    rewards = parse_rewards(a)
    try:
        resume = find_resume(a, out)  # pretraining's rules: another run's checkpoints are never taken or mixed
    except PretrainError as e:
        raise GRPOError(str(e)) from None
    src = Path(a.model)
    if not (src / "tokenizer.json").exists():
        raise GRPOError(f"--model {src}: no tokenizer.json (the rollouts render prompts with the checkpoint's tokenizer)")
    tok = Tokenizer.load(src)
    try:
        model = minke.load(src, device=d.device)
    except (OSError, ValueError, KeyError) as e:
        raise GRPOError(f"--model {src}: cannot load the checkpoint ({e})") from None
    ref = None
    if a.beta:
        ref = copy.deepcopy(model).eval().requires_grad_(False)
    model.train()
    out.mkdir(parents=True, exist_ok=True)
    checkpoint.clean(out)
    opt = build_optimizer(model, a.lr, a.weight_decay)
    sched = build_scheduler(opt, a.steps * a.mu, a.warmup, 1.0)
    engine = Engine(model, max_batch=max(1, a.prompts // d.world) * a.group_size, decode_fn=tok.decode)
    run_cfg = {k: v for k, v in sorted(vars(a).items()) if k not in RESUMABLE}
    random.seed(a.seed)
    torch.manual_seed(a.seed)

    step, position, metrics = 0, 0, []
    if resume is not None:
        state = checkpoint.load_state(resume)
        diff = config_diff(state["run"], run_cfg)
        if diff:
            raise GRPOError(f"--resume {a.resume}: {resume.name} comes from a different configuration: " + "; ".join(diff))
        parallel.load_model_state(model, str(resume))
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if ref is not None:
            ref.load_state_dict(state["reference"])
        set_rng_state(state["rng"])
        step, position = state["step"], state["position"]
        metrics = [m for m in read_metrics(resume.parent / "metrics.jsonl") if m["step"] <= step]
        print(f"resumed from {resume} at step {step}")
    record = metrics_log(out / "metrics.jsonl", metrics, d.is_main)
    held = builtin(a.tasks, a.difficulties, a.eval_problems, "test") if a.eval_problems > 0 else []

    def eval_now(s: int) -> None:
        if not held or not d.is_main:
            return
        e = held_out_pass1(engine, tok, held, a)
        record({"kind": "eval", "step": s, **e})
        say(f"eval {s:>{len(str(a.steps))}}/{a.steps} | held-out pass@1 {e['pass1']:.3f} "
            f"({len(held)} problems × {a.eval_k}, T=0.6)")

    params = model.config.param_counts()
    print(f"model: {src}, {params['total']:,} parameters; {a.prompts} prompts × {a.group_size} samples per step, "
          f"format {a.format}, loss {a.loss_agg}{', no std' if a.no_std else ''}, β {a.beta}, "
          f"ε ({a.eps_low}, {a.eps_high}), μ {a.mu}")
    if step == 0:
        eval_now(0)
    last = checkpoint.latest(out) or resume
    times: deque[float] = deque(maxlen=10)
    bar = tqdm(total=a.steps, initial=step, unit="step", disable=None, dynamic_ncols=True, leave=False)
    try:
        while step < a.steps:
            t0 = time.perf_counter()
            try:
                m, position, samples = train_step(model, ref, engine, tok, rewards, opt, sched, a, d, step, position)
            except GRPOError as e:
                kept = f"last good checkpoint: {last}" if last else "no checkpoint was written yet"
                raise GRPOError(f"{e}; {kept}") from None
            step += 1
            times.append(time.perf_counter() - t0)
            record({"kind": "train", "step": step, "temperature": a.temperature, **m, "samples": samples})
            bar.update(1)
            if step % a.log_every == 0 or step in (1, a.steps):
                eta = sum(times) / len(times) * (a.steps - step)
                say(f"step {step:>{len(str(a.steps))}}/{a.steps} | reward {m['reward']:.3f} "
                    f"(acc {m['reward_accuracy']:.2f} fmt {m['reward_format']:.2f}) | "
                    f"len {m['length_mean']:5.1f}/{m['length_max']} | kl {m.get('kl', 0.0):.4f} | "
                    f"clip {m.get('clip', 0.0):.3f} | ent {m.get('entropy', 0.0):.3f} | aha {m['reflection']:.2f} | "
                    f"roll {m['rollout_tok_s']:6,.0f} tok/s | train {m['train_tok_s']:6,.0f} tok/s | eta {fmt_time(eta)}")
            if step % a.eval_every == 0 or step == a.steps:
                eval_now(step)
            if (step % a.save_every == 0 or step == a.steps) and d.is_main:
                state = {"step": step, "position": position, "optimizer": opt.state_dict(),
                         "scheduler": sched.state_dict(), "rng": rng_state(), "run": run_cfg}
                if ref is not None:
                    state["reference"] = ref.state_dict()
                last = checkpoint.save(out, step, model, tok, state, a.keep)
            parallel.barrier()
    finally:
        bar.close()
    if not d.is_main:
        parallel.shutdown()
        return out / "final"
    final = checkpoint.link_final(out, last)
    plots = plot(metrics, out / "plots")
    path = write_report(out, run_cfg, metrics, plots)
    print(f"checkpoint: {final} -> {last.name}\nreport:     {path}")
    parallel.shutdown()
    return final


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        run(a)
    except GRPOError as e:
        print(f"minke grpo: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

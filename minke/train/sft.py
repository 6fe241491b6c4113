"""`minke sft`: supervised fine-tuning on chat examples — R1's cold start, and distillation.

An example is a conversation whose last turn is the assistant's. It is rendered with the tokenizer's chat
template: the prompt is everything before the last assistant turn, with the generation prompt (for
DeepSeek-R1's template "<｜Assistant｜><think>\\n"); the target is that turn's content after the part the
generation prompt already wrote, then eos. The loss is next-token CE on the target tokens only (and the
MTP loss on the same tokens, so speculative decoding keeps up with the chat format). Earlier assistant
turns are context, rendered as the template renders history.

Data (one of):
- built-in cold start (default): train-split task problems (``--tasks``, ``--difficulties``) with their
  worked solutions in R1's output form ``<think>\\n…steps…\\n</think>\\n\\n\\boxed{answer}``
  (data/prompts.py ``r1_response``); held out: the same number of test-split problems per batch.
  ``--direct F`` makes a share of them reason only "The answer is …." (a cold start that does not always
  work the steps out, so RL has that to learn); ``--retries N`` makes countdown's reasoning a search that
  first tries, checks and rejects up to N wrong combinations (``Countdown.search_solution``).
- ``--data FILE.jsonl …``: one example per line, OpenAI ``{"messages": [...]}`` or
  ``{"prompt": "...", "response": "..."}`` (``minke sample`` writes the former); held out: the last
  ``--eval-fraction`` of the examples.

Packing (V3 "with sample masking"): examples are packed whole into rows of ``--seq-len`` tokens (in a
seeded order, first fit over the 8 newest rows), each row a (4, T) tensor of inputs, targets (IGNORE off
the target), example index and position within its example; attention stays inside an example (lm_loss
builds the mask) and every example starts at position 0, as at inference.

Model: ``--model DIR`` continues a checkpoint (pretrained, or an earlier SFT/RL stage) with its
tokenizer; or ``--preset``/``--set`` with ``--tokenizer DIR`` trains a fresh student from scratch
(distillation: a smaller dense or MoE config on a teacher's traces). The loop is pretraining's
(``pretrain.fit``): AdamW + schedule, atomic checkpoints, exact resume, NaN stop, metrics, plots.
"""

from __future__ import annotations

import argparse
import random
import sys
import zlib
from pathlib import Path

import torch

from ..config import ConfigError, preset
from ..data.loader import DataError, PackedLoader, fingerprint, jsonl_records
from ..data.prompts import r1_response
from ..data.tokenizer import THINK, Tokenizer
from ..model.transformer import build
from ..tasks import TASKS, problems
from . import checkpoint
from .pretrain import (IGNORE, RESUMABLE, PretrainError, _Help, add_training_args, find_resume, fit,
                       greedy_accuracy, overrides, setup)

PAD_SEGMENT = -1  # the example index of padding (padding attends to padding only)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="minke sft", description=__doc__.split("\n\n")[0], formatter_class=_Help)
    # ---- data
    g = p.add_argument_group("data")
    g.add_argument("--data", nargs="+", metavar="FILE.jsonl",
                   help="examples: one JSON object a line, {'messages': [...]} or {'prompt', 'response'} "
                        "(default: the built-in cold-start traces)")
    g.add_argument("--examples", type=int, default=20000, help="built-in: training problems (with worked solutions)")
    g.add_argument("--tasks", nargs="+", default=sorted(TASKS), help="built-in: tasks")
    g.add_argument("--difficulties", nargs="+", type=int, default=[1, 2, 3], help="built-in: difficulty levels")
    g.add_argument("--direct", type=float, default=0.0, metavar="F",
                   help="built-in: share of examples whose reasoning states the answer without the steps")
    g.add_argument("--retries", type=int, default=0, metavar="N",
                   help="built-in: countdown's worked steps first try and reject up to N wrong combinations")
    g.add_argument("--eval-fraction", type=float, default=0.05, help="--data: share of examples held out (the tail)")
    # ---- model
    g = p.add_argument_group("model")
    g.add_argument("--model", metavar="DIR", help="start from this checkpoint (with its tokenizer)")
    g.add_argument("--preset", help="instead of --model: a fresh model of this preset (a distillation student)")
    g.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="with --preset: config fields over it")
    g.add_argument("--tokenizer", metavar="DIR", help="with --preset: the tokenizer (e.g. the teacher's checkpoint)")
    g.add_argument("--seq-len", type=int, default=256, help="tokens per packed row")
    add_training_args(p, default_out="out/sft", steps=300, batch_size=16, lr=1e-3, warmup=20, mtp_lambda=0.1,
                      eval_every=100, save_every=100, log_every=25, eval_problems=100)
    a = p.parse_args(argv)
    for k in ("examples", "seq_len", "steps", "batch_size", "grad_accum", "eval_every", "eval_batches",
              "save_every", "keep", "log_every"):
        if getattr(a, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be at least 1, got {getattr(a, k)}")
    if a.retries < 0:
        p.error(f"--retries must be >= 0, got {a.retries}")
    if not 0 <= a.direct <= 1:
        p.error(f"--direct must lie in [0, 1], got {a.direct}")
    if not 0 <= a.eval_fraction < 1:
        p.error(f"--eval-fraction must lie in [0, 1), got {a.eval_fraction}")
    if (a.model is None) == (a.preset is None):
        p.error("give --model DIR (continue a checkpoint) or --preset NAME with --tokenizer DIR (a fresh student)")
    if a.preset and not a.tokenizer:
        p.error("--preset needs --tokenizer DIR (the tokenizer the student shares with its data)")
    unknown = sorted(set(a.tasks) - set(TASKS))
    if unknown:
        p.error(f"--tasks: unknown {', '.join(unknown)}; known: {', '.join(sorted(TASKS))}")
    return a


# ---- examples ------------------------------------------------------------------------------------
def read_examples(paths: list[str]) -> list[tuple[list[dict], str]]:
    """(messages, where) per example; errors name the file and line."""
    out = []
    for path in paths:
        found = [(to_messages(rec, where), where) for where, rec in jsonl_records(path)]
        if not found:
            raise DataError(f"{path}: no examples")
        out += found
    return out


def to_messages(rec, where: str) -> list[dict]:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object")
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                    or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: messages[{i}] needs a role (system/user/assistant) and a string content")
        if msgs[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message must be the assistant's (it is the target)")
        return msgs
    if isinstance(rec.get("prompt"), str) and isinstance(rec.get("response"), str):
        return [{"role": "user", "content": rec["prompt"]}, {"role": "assistant", "content": rec["response"]}]
    raise DataError(f"{where}: expected a 'messages' list or string fields 'prompt' and 'response'")


def encode_example(tok: Tokenizer, messages: list[dict]) -> tuple[list[int], int]:
    """(token ids, prompt length): prompt = the template up to the generation prompt, target = the rest
    of the last assistant turn + eos."""
    prompt = tok.apply_chat_template(messages[:-1], add_generation_prompt=True)
    target = messages[-1]["content"]
    opened = prompt.rstrip("\n").endswith(THINK)  # R1's generation prompt opened the reasoning block
    if opened:
        head = prompt[prompt.rstrip("\n").rindex(THINK):]  # "<think>\n"
        if target.startswith(head):
            target = target[len(head):]
        elif target.startswith(THINK):
            target = target[len(THINK):].lstrip("\n")
        elif "</think>" not in target:
            target = "</think>\n\n" + target  # an answer without reasoning: an empty think block
    ids = tok.encode(prompt)
    return ids + tok.encode(target) + [tok.eos_id], len(ids)


def builtin_examples(tasks, difficulties, n: int, split: str, direct: float = 0.0,
                     retries: int = 0) -> list[tuple[list[dict], str]]:
    """n problems spread evenly over tasks × difficulties, as (messages, where) with R1-form targets.

    Seeded by each prompt: a ``direct`` share of the examples states the answer without the steps; the
    others show the worked steps, which for a task with a search (countdown) first try and reject up to
    ``retries`` wrong combinations, as many as a uniform draw from 0..retries."""
    cells = [(t, d) for t in tasks for d in difficulties]
    out = []
    for i, (t, d) in enumerate(cells):
        count = n // len(cells) + (i < n % len(cells))
        for p in problems(t, split, count, d) if count else []:
            rng = random.Random(zlib.crc32(p.prompt.encode()))
            task = TASKS[t]
            if rng.random() < direct:
                solution = p.solution.split("\n")[-1]
            elif retries and hasattr(task, "search_solution"):
                solution = task.search_solution(p, rng, rng.randint(0, retries))
            else:
                solution = p.solution
            out.append(([p.message(), {"role": "assistant", "content": "<think>\n" + r1_response(p, solution)}],
                        f"{t}/{d}/{split}"))
    return out


def pack(examples: list[tuple[list[int], int]], seq_len: int, pad_id: int, seed: int) -> torch.Tensor:
    """Whole examples (ids, prompt length) first-fit into rows → (N, 4, T): inputs, targets, example
    index, position. An example of L tokens takes L - 1 slots (inputs ids[:-1], targets ids[1:])."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    rows: list[list[int]] = []  # per row: the example indices it holds
    room: list[int] = []
    for i in order:
        need = len(examples[i][0]) - 1
        j = next((r for r, free in enumerate(room[-8:], max(0, len(room) - 8)) if free >= need), None)
        if j is None:
            rows.append([])
            room.append(seq_len)
            j = len(rows) - 1
        rows[j].append(i)
        room[j] -= need
    out = torch.empty(len(rows), 4, seq_len, dtype=torch.long)
    for r, members in enumerate(rows):
        ids, tgt, seg, pos = [], [], [], []
        for e in members:
            toks, P = examples[e]
            L = len(toks) - 1
            ids += toks[:-1]
            tgt += [IGNORE] * (P - 1) + toks[P:]
            seg += [e] * L
            pos += range(L)
        pad = seq_len - len(ids)
        out[r, 0] = torch.tensor(ids + [pad_id] * pad)
        out[r, 1] = torch.tensor(tgt + [IGNORE] * pad)
        out[r, 2] = torch.tensor(seg + [PAD_SEGMENT] * pad)
        out[r, 3] = torch.tensor(pos + list(range(pad)))
    return out


def encode_all(tok: Tokenizer, examples, seq_len: int) -> list[tuple[list[int], int]]:
    out = []
    for messages, where in examples:
        ids, P = encode_example(tok, messages)
        if len(ids) - 1 > seq_len:
            raise DataError(f"{where}: the example has {len(ids)} tokens, more than --seq-len {seq_len} + 1; "
                            f"raise --seq-len or shorten it")
        if len(ids) - P < 1:
            raise DataError(f"{where}: the assistant turn is empty")
        out.append((ids, P))
    return out


# ---- the stage -----------------------------------------------------------------------------------
def run(a: argparse.Namespace) -> Path:
    out = Path(a.out or a.resume or "out/sft")
    d, amp, bf16 = setup(a)
    resume = find_resume(a, out)
    source = Path(a.model or a.tokenizer)
    if not (source / "tokenizer.json").exists():
        raise PretrainError(f"{source}: no tokenizer.json (SFT renders examples with the checkpoint's chat template)")
    tok = Tokenizer.load(resume or source)
    if tok.bos_id is None or tok.eos_id is None:
        raise PretrainError(f"{source}: the tokenizer has no bos/eos token")
    if a.model:
        import minke

        try:
            model = minke.load(a.model, device=d.device)  # fp32 master weights
        except (OSError, ValueError, KeyError) as e:
            raise PretrainError(f"--model {a.model}: cannot load the checkpoint ({e})") from None
    else:
        try:
            cfg = preset(a.preset, **overrides(a.set))
        except ConfigError as e:
            raise PretrainError(str(e)) from None
        cfg = cfg.replace(vocab_size=-(-tok.vocab_size // 64) * 64, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
        torch.manual_seed(a.seed)
        model = build(cfg, device=d.device, seed=a.seed)
    cfg = model.config
    if a.seq_len > cfg.max_position_embeddings:
        raise PretrainError(f"--seq-len {a.seq_len} exceeds the model's max_position_embeddings {cfg.max_position_embeddings}")
    out.mkdir(parents=True, exist_ok=True)
    for p in checkpoint.clean(out):
        print(f"removed {p} (left by an interrupted save)")

    if a.data:
        examples = read_examples(a.data)
        n_held = max(1, int(a.eval_fraction * len(examples))) if len(examples) > 1 else 0
        train_ex, held_ex = examples[:len(examples) - n_held], examples[len(examples) - n_held:]
        held_ex = held_ex or train_ex[-1:]
    else:
        train_ex = builtin_examples(a.tasks, a.difficulties, a.examples, "train", a.direct, a.retries)
        held_ex = builtin_examples(a.tasks, a.difficulties, a.eval_batches * a.batch_size, "test", a.direct,
                                   a.retries)
    train = pack(encode_all(tok, train_ex, a.seq_len), a.seq_len, tok.pad_id or 0, a.seed)
    held = pack(encode_all(tok, held_ex, a.seq_len), a.seq_len, tok.pad_id or 0, a.seed)[: a.eval_batches * a.batch_size]
    target_tokens = int((train[:, 1] != IGNORE).sum())
    run_cfg = {k: v for k, v in sorted(vars(a).items()) if k not in RESUMABLE}
    run_cfg.update(model_config=cfg.to_dict(), data_sha=fingerprint(train))
    loader = PackedLoader(train, None, a.batch_size, a.seed)
    params = cfg.param_counts()
    print(f"model: {a.model or 'preset ' + a.preset}, {params['total']:,} parameters ({params['active']:,} active) "
          f"on {d.device}{' bf16' if bf16 else ''}\n"
          f"data: {len(train_ex):,} examples packed into {len(train):,} rows of {a.seq_len} "
          f"({train[:, 2].ne(PAD_SEGMENT).float().mean():.0%} filled), {target_tokens:,} target tokens; "
          f"{len(held_ex):,} held-out examples; {a.steps} steps × {a.batch_size * a.grad_accum} rows = "
          f"{a.steps * a.batch_size * a.grad_accum / len(train):.1f} epochs")

    def finish(model, record, step):
        if a.eval_problems <= 0 or a.data:
            return
        cells = [(t, dd) for t in a.tasks for dd in a.difficulties]
        for t, dd in cells:
            probs = problems(t, "test", max(1, a.eval_problems // len(cells)), dd)
            acc, texts = greedy_accuracy(model, tok, probs, max_new=a.seq_len, fmt="chat")
            record({"kind": "accuracy", "step": step, "task": t, "difficulty": dd, "n": len(probs),
                    "accuracy": acc, "samples": [[p.prompt, x] for p, x in zip(probs[:3], texts[:3])]})
            print(f"greedy accuracy (chat format), {t} difficulty {dd}: {acc:.0%} of {len(probs)} held-out problems")

    return fit(a, out, d, amp, model, tok, loader, held, run_cfg, resume, finish)


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        run(a)
    except (PretrainError, DataError) as e:
        print(f"minke sft: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

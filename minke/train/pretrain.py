"""`minke pretrain`: train a DeepSeek-V3-style model (MLA, DeepSeekMoE, MTP) from scratch (V3 §4.2).

One optimizer step:

    for each of --grad-accum micro-batches of packed windows (B, T+1):
        loss = CE(next token) + λ·(1/D)·Σ_k CE_k + α·Σ_layers balance_loss
               (MTP module k's logits at position i predict token i+k+1, V3 §2.2;
                the sequence-wise balance loss of V3 eq. 17–20)
        (loss / grad_accum).backward(); each MoE layer's expert loads summed
    clip the gradient norm (1.0); AdamW; LR warmup → constant → cosine to 10% (optim.py)
    aux-loss-free balancing (V3 §2.1.2): per MoE layer b_i += γ·sign(mean load − load_i) from the step's
    loads, summed over ranks first; MaxVio = max load / mean load − 1 is logged per layer.

Data: the built-in task corpus (arithmetic + countdown, held-out loss on the tasks' test split) or
--data files (held-out: the tail of their token stream); packed by minke.data.loader. The tokenizer is
trained on the training documents unless --tokenizer is given; the model is --preset with its vocab set
to the tokenizer's, rounded up to a multiple of 64.

Continued pretraining and context extension (V3 §4.3, 4K → 32K → 128K): ``--model CKPT`` starts from a
checkpoint's weights, config and tokenizer instead of a fresh model; ``--extend-to N`` also extends its
context with YaRN (minke.config.extend_context: rope_scaling yarn, factor N / the original length — the
checkpoint's max_position_embeddings, or its YaRN's original_max_position_embeddings — beta 32/1, mscale 1;
max_position_embeddings N) and trains on windows of N tokens unless --seq-len says otherwise. The saved
config.json loads in minke and transformers alike. Pretrain with ``--set max_position_embeddings=SEQ_LEN``
so that the original length is the one the model was trained at.

Output directory: tokenizer/ (when trained here), step-XXXXXX/ checkpoints (HF directory + tokenizer +
trainer_state.pt, see checkpoint.py), final -> the last one (what `minke chat/serve --model` takes),
metrics.jsonl, plots/*.png, report.md. `--resume DIR` continues DIR's newest checkpoint exactly: on CPU
in fp32 the losses are bitwise those of an uninterrupted run. Every flag that changes the training
trajectory must match the checkpoint's; those in RESUMABLE may change.

Testing hook: `--inject-nan STEP` multiplies the loss of STEP by NaN, to exercise the divergence stop
(the run stops before applying that step; the checkpoints already written stay).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from collections import deque
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..config import ConfigError, ModelConfig, extend_context, preset
from ..data.loader import DataError, PackedLoader, fingerprint, read_documents, tokenize, windows
from ..data.prompts import completion_text, prompt_ids
from ..data.prompts import R1_ZERO_TEMPLATE
from ..data.tokenizer import Tokenizer, train_tokenizer
from ..inference.engine import Engine
from ..inference.sampling import SamplingParams
from ..model import dsa
from ..model.transformer import build
from ..model.weights import load as load_model
from ..quant.modules import to_fp8_training
from ..tasks import INSTRUCTION, check, corpus, problems
from . import checkpoint, parallel, report
from .optim import build_optimizer, build_scheduler

IGNORE = -100  # target id that takes no loss (F.cross_entropy's ignore_index)

# Flags that may differ between a run and its resumption: none of them changes the training trajectory
# (device and dtype change its rounding, which moving a run to other hardware has to accept).
RESUMABLE = {"out", "resume", "device", "dtype", "compile", "eval_every", "eval_batches", "eval_problems", "save_every", "keep",
             "log_every", "inject_nan"}


class PretrainError(RuntimeError):
    """Bad input or a diverged run; the message says what, where, and what was kept."""


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # no "(default: None)"
        return action.help if action.default is None else super()._get_help_string(action)


def add_training_args(p: argparse.ArgumentParser, default_out: str, steps: int = 1500, batch_size: int = 32,
                      lr: float = 3e-3, warmup: int = 50, mtp_lambda: float = 0.3, eval_every: int = 150,
                      save_every: int = 500, log_every: int = 50, eval_problems: int = 50) -> None:
    """The flags of the shared training loop (``fit``): optimisation, losses, run; each stage its defaults."""
    # ---- optimisation (V3 §4.2)
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=steps, help="optimizer steps")
    g.add_argument("--batch-size", type=int, default=batch_size, help="sequences per micro-batch")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=lr, help="peak learning rate")
    g.add_argument("--warmup", type=int, default=warmup, help="linear warmup steps")
    g.add_argument("--decay-from", type=float, default=0.5,
                   help="fraction of the steps after which the cosine decay starts (V3: ~0.68)")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="final LR as a fraction of the peak")
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay on matrices")
    g.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping threshold")
    # ---- DeepSeek-V3 losses and load balancing
    g = p.add_argument_group("losses and load balancing")
    g.add_argument("--mtp-lambda", type=float, default=mtp_lambda, help="weight λ of the MTP loss (0: MTP off)")
    g.add_argument("--balance-alpha", type=float, default=1e-4, help="weight α of the sequence-wise balance loss")
    g.add_argument("--bias-gamma", type=float, default=1e-3,
                   help="aux-loss-free bias update speed γ (0: balancing by bias off)")
    # ---- run
    g = p.add_argument_group("run")
    g.add_argument("--out", help=f"output directory (default: the --resume directory, else {default_out})")
    g.add_argument("--resume", metavar="DIR", help="continue the newest checkpoint of this output directory")
    g.add_argument("--seed", type=int, default=0, help="seed of the corpus, the initial weights and the data order")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 …")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="compute dtype (autocast; master weights stay fp32). auto: bfloat16 on CUDA, float32 on CPU")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the training forward and backward (fuses the elementwise work; "
                        "the first step compiles, ~1 min)")
    g.add_argument("--fp8", action="store_true",
                   help="FP8 GEMMs as DeepSeek-V3 trains (§3.3): attention/FFN linears and experts in E4M3 with "
                        "1x128 activation and 128x128 weight scales; embedding, head, gate, norms, attention core "
                        "stay BF16/FP32")
    g.add_argument("--bf16-moments", action="store_true",
                   help="keep AdamW's exp_avg and exp_avg_sq in BF16 as DeepSeek-V3 does (§3.3): half the optimizer "
                        "state; master weights and gradients stay FP32")
    g.add_argument("--eval-every", type=int, default=eval_every, help="held-out loss every N steps (and at the start/end)")
    g.add_argument("--eval-batches", type=int, default=8, help="held-out batches per evaluation")
    g.add_argument("--eval-problems", type=int, default=eval_problems,
                   help="at the end: greedy exact-answer accuracy on this many held-out problems")
    g.add_argument("--save-every", type=int, default=save_every, help="checkpoint every N steps (and at the end)")
    g.add_argument("--keep", type=int, default=2, help="checkpoints kept")
    g.add_argument("--log-every", type=int, default=log_every, help="print a progress line every N steps")
    # ---- testing
    g = p.add_argument_group("testing")
    g.add_argument("--inject-nan", type=int, metavar="STEP", help="poison the loss of STEP (tests the NaN stop)")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="minke pretrain", description=__doc__.split("\n\n")[0], formatter_class=_Help)
    # ---- data
    g = p.add_argument_group("data")
    g.add_argument("--data", nargs="+", metavar="FILE",
                   help="train on these files instead of the task corpus (.jsonl: one document per line in field "
                        "'text'; any other file: one document)")
    g.add_argument("--docs", type=int, default=40000, help="task corpus: number of training documents")
    g.add_argument("--eval-docs", type=int, default=400, help="task corpus: held-out documents (tasks' test split)")
    g.add_argument("--eval-fraction", type=float, default=0.05, help="--data: share of tokens held out (the tail)")
    g.add_argument("--tokenizer", metavar="DIR", help="use this tokenizer instead of training one on the data")
    g.add_argument("--vocab-size", type=int, default=512, help="vocabulary of the tokenizer trained here")
    # ---- model
    g = p.add_argument_group("model")
    g.add_argument("--preset", help="model preset (minke.config.PRESETS; default tiny)")
    g.add_argument("--model", dest="init_from", metavar="CKPT",
                   help="continue pretraining this checkpoint (its weights, config.json and tokenizer) instead "
                        "of a fresh --preset model")
    g.add_argument("--extend-to", type=int, metavar="N",
                   help="with --model: extend the context to N tokens with YaRN and train on windows of N")
    g.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="config.json fields over the preset, values in JSON (e.g. num_hidden_layers=6)")
    g.add_argument("--seq-len", type=int, help="tokens per training sequence (default: --extend-to, else 128)")
    g.add_argument("--dsa", choices=["warmup", "sparse"],
                   help="DeepSeek Sparse Attention models (index_topk): 'warmup' trains only the indexers, by KL "
                        "to the dense attention (pair with --bias-gamma 0 to leave the routing untouched); "
                        "'sparse' trains everything over the selected tokens, the indexers by KL (V3.2 §2.1.1)")
    add_training_args(p, default_out="out/pretrain")
    a = p.parse_args(argv)
    if a.init_from:
        for flag, given in (("--preset", a.preset), ("--set", a.set), ("--tokenizer", a.tokenizer)):
            if given:
                p.error(f"{flag} applies to a fresh model; with --model the checkpoint's config.json and tokenizer "
                        f"set the model")
    elif a.extend_to is not None:
        p.error("--extend-to needs --model CKPT (the checkpoint to extend)")
    else:
        a.preset = a.preset or "tiny"
    if a.extend_to is not None and a.extend_to < 1:
        p.error(f"--extend-to must be at least 1, got {a.extend_to}")
    if a.seq_len is None:
        a.seq_len = a.extend_to or 128
    for k in ("docs", "eval_docs", "vocab_size", "seq_len", "steps", "batch_size", "grad_accum", "eval_every",
              "eval_batches", "save_every", "keep", "log_every"):
        if getattr(a, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be at least 1, got {getattr(a, k)}")
    return a


# ---- the loss ------------------------------------------------------------------------------------
def lm_loss(model, batch: torch.Tensor, moes, mtp_lambda: float, balance_alpha: float):
    """batch → (loss, parts): loss = ce + λ·mtp + α·balance; parts detached (mtp None when off).

    A batch is either windows of the token stream (B, T+1) — inputs ``w[:-1]``, targets ``w[1:]`` — or
    packed examples (B, 4, T) (sft.py): inputs, targets (IGNORE where no loss: prompts, padding),
    example index and position within the example per token; attention then stays inside each example."""
    mask = positions = None
    if batch.dim() == 3:
        x, y, seg, positions = batch.unbind(1)  # (B, T) each
        T = x.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        mask = ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]  # (B, 1, T, T)
    else:
        x, y = batch[:, :-1], batch[:, 1:]  # (B, T) inputs and next-token targets
        seg = None
    for _, m in moes:
        m.load = m.balance_loss = None
    out = model(x, positions=positions, mtp=mtp_lambda > 0, mask=mask)
    ce = F.cross_entropy(out.logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE)
    # Module k's logits (B, T-k, V) at position i predict token i+k+1, which is y[:, i+k] (within one example).
    mtp = []
    for k, lg in enumerate(out.mtp_logits, 1):
        yk = y[:, k:] if seg is None else y[:, k:].masked_fill(seg[:, k:] != seg[:, :-k], IGNORE)
        mtp.append(F.cross_entropy(lg.flatten(0, 1).float(), yk.flatten(), ignore_index=IGNORE))
    mtp = torch.stack(mtp).mean() if mtp else None
    bal = [m.balance_loss for _, m in moes if m.balance_loss is not None]
    bal = torch.stack(bal).sum() if bal else None
    loss = ce
    if mtp is not None:
        loss = loss + mtp_lambda * mtp
    if bal is not None:
        loss = loss + balance_alpha * bal
    kl = dsa.indexer_loss(model)  # --dsa: the indexers' KL terms (None otherwise)
    if kl is not None:
        loss = loss + kl
    parts = {"loss": loss.detach(), "ce": ce.detach(), "mtp": None if mtp is None else mtp.detach(),
             "balance": None if bal is None else bal.detach(), "indexer_kl": None if kl is None else kl.detach()}
    return loss, parts


def loss_function(model, moes, mtp_lambda: float, balance_alpha: float, compile: bool = False):
    """batch -> lm_loss(model, batch, ...). ``compile``: torch.compile forward and loss together, so the
    head's (N, V) logits go through cross-entropy in fused kernels instead of being converted, written
    and read back by separate ops (their fp32 copies and gradients are the largest tensors of a small
    model's step). Evaluation and generation stay eager."""
    def loss_fn(batch):
        return lm_loss(model, batch, moes, mtp_lambda, balance_alpha)
    return torch.compile(loss_fn) if compile else loss_fn


def max_vio(load: torch.Tensor) -> float:
    """MaxVio = max_i load_i / mean load − 1 (0 = perfectly balanced)."""
    load = load.float()
    return float(load.max() / load.mean() - 1)


def balance_step(moes, loads: list[torch.Tensor], gamma: float) -> list[torch.Tensor]:
    """Aux-loss-free balancing after an optimizer step, from each layer's loads (E,) summed over the
    step's micro-batches. Returns the loads summed over ranks."""
    loads = parallel.reduce_loads(loads)  # ← the one point where expert loads are summed over ranks
    if gamma > 0:
        for (_, m), load in zip(moes, loads):
            m.update_bias(load, gamma)
    return loads


def train_step(model, loss_fn, moes, loader, opt, sched, a, amp, step: int, d: parallel.Dist) -> dict:
    """One optimizer step (step is 0-based); raises PretrainError before applying a non-finite one.
    ``loss_fn(batch) -> (loss, parts)`` is ``lm_loss`` on the model (``loss_function``)."""
    opt.zero_grad(set_to_none=True)
    sums: dict[str, torch.Tensor] = {}
    loads = [torch.zeros(m.n_experts, dtype=torch.long, device=d.device) for _, m in moes]
    for _ in range(a.grad_accum):
        batch = parallel.shard_batch(loader.next_batch(), d).to(d.device)  # this rank's rows of the global batch
        with amp:
            loss, parts = loss_fn(batch)
        if a.inject_nan == step + 1:
            loss = loss * float("nan")
            parts["loss"] = loss.detach()
        (loss / a.grad_accum).backward()
        for k, v in parts.items():
            if v is not None:
                sums[k] = sums.get(k, 0.0) + v.float() / a.grad_accum
        for acc, (_, m) in zip(loads, moes):
            acc += m.load
    gnorm = parallel.clip_grad_norm_(model.parameters(), a.clip)
    parts = parallel.all_reduce_sum(torch.stack(list(sums.values()))) / d.world  # means over ranks
    r = dict(zip(sums, parts.tolist()))  # one device sync for all parts
    if not (math.isfinite(r["loss"]) and math.isfinite(gnorm)):
        bad = f"loss {r['loss']}" if not math.isfinite(r["loss"]) else f"gradient norm {gnorm}"
        raise PretrainError(f"step {step + 1}: {bad} is not finite; stopped without applying the step")
    lr = opt.param_groups[0]["lr"]
    opt.step()
    sched.step()
    loads = balance_step(moes, loads, a.bias_gamma)
    return {"loss": r["loss"], "ce": r["ce"], "mtp": r.get("mtp"), "balance": r.get("balance"),
            "indexer_kl": r.get("indexer_kl"), "lr": lr,
            "grad_norm": gnorm, "maxvio": [max_vio(l) for l in loads], "load": [l.tolist() for l in loads]}


@torch.no_grad()
def evaluate(model, eval_windows: torch.Tensor, a, amp, device) -> dict:
    """Mean held-out next-token CE (and MTP CE) over fixed batches (windows or packed examples)."""
    model.eval()
    moes = model.named_moe_layers(a.mtp_lambda > 0)
    ce, mtp, n = 0.0, 0.0, 0
    for batch in eval_windows.split(a.batch_size):
        with amp:
            _, parts = lm_loss(model, batch.to(device), moes, a.mtp_lambda, 0.0)
        ce += parts["ce"].item() * len(batch)
        mtp += (parts["mtp"].item() if parts["mtp"] is not None else 0.0) * len(batch)
        n += len(batch)
    model.train()
    return {"eval_ce": ce / n, "eval_mtp": mtp / n if a.mtp_lambda > 0 else None}


def greedy_accuracy(model, tok: Tokenizer, probs, max_new: int = 48, fmt: str = "base") -> tuple[float, list[str]]:
    """Share of problems whose greedy completion (prompt format ``fmt`` of data/prompts.py; "base" is the
    pretraining format "Question: …\nAnswer:") has the right \\boxed{} answer, and the completions
    (generated by the inference engine)."""
    model.eval()
    done = Engine(model, max_batch=min(64, len(probs))).generate(
        [prompt_ids(tok, p, fmt) for p in probs], SamplingParams(max_tokens=max_new, temperature=0.0))
    model.train()
    texts = [completion_text(tok, c.token_ids, c.finish_reason) for c in done]
    return sum(check(p, t) for p, t in zip(probs, texts)) / max(1, len(probs)), texts


# ---- setup -----------------------------------------------------------------------------------------
def load_data(a, tok_dir: Path | None, out: Path) -> tuple[Tokenizer, torch.Tensor, torch.Tensor]:
    """(tokenizer, training token stream, held-out token stream)."""
    if a.data:
        train_docs, eval_docs = read_documents(a.data), None
    else:
        train_docs = corpus(a.docs, seed=a.seed, split="train")
        eval_docs = corpus(a.eval_docs, seed=a.seed, split="test")
    if tok_dir is not None:
        try:
            tok = Tokenizer.load(tok_dir)
        except Exception as e:  # tokenizers raises its own exception types
            raise PretrainError(f"--tokenizer {tok_dir}: cannot load a tokenizer ({e})") from None
    else:  # rank 0 trains (and writes) it; the other ranks receive it
        # The task corpus's tokenizer also learns R1's instruction, which SFT, RL and evaluation prompt with
        # (~10 tokens instead of ~60 when trained on the corpus alone), and R1-Zero's template, so that an
        # R1-Zero prompt fits the pretraining context.
        prompts = [INSTRUCTION, R1_ZERO_TEMPLATE.format(prompt="")]
        texts = train_docs if a.data else train_docs + prompts * (len(train_docs) // 20)
        tok = train_tokenizer(texts, a.vocab_size, out / "tokenizer") if parallel.is_main() else None
        tok = parallel.broadcast_object(tok)
    if tok.bos_id is None or tok.eos_id is None:
        raise PretrainError(f"tokenizer {tok_dir}: no bos/eos token, needed to separate packed documents")
    train = tokenize(train_docs, tok)
    if eval_docs is not None:
        held = tokenize(eval_docs, tok)
    else:  # the tail of the user's stream, at least one window
        n = max(a.seq_len + 1, int(a.eval_fraction * train.numel()))
        if train.numel() < n + a.seq_len + 1:
            raise DataError(f"--data has {train.numel()} tokens: too few for a training and a held-out window of "
                            f"seq_len + 1 = {a.seq_len + 1}")
        train, held = train[:-n], train[-n:]
    return tok, train, held


def config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """What differs between a checkpoint's run configuration and this run's. An option the checkpoint
    does not know (added to minke after it was written) that is off now (False, None, 0) is no
    difference: off is how the older run trained."""
    diff = []
    for k in sorted(set(old) | set(new)):
        o, n = old.get(k), new.get(k)
        if k not in old and not n and not isinstance(n, dict):
            continue
        if isinstance(o, dict) and isinstance(n, dict):
            diff += config_diff(o, n, f"{prefix}{k}.")
        elif o != n:
            diff.append(f"{prefix}{k}: {o!r} in the checkpoint, {n!r} now")
    return diff


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def restore(ckpt: Path, run_cfg: dict, model, opt, sched, loader) -> tuple[int, list[dict]]:
    """Load a checkpoint into the freshly built run; returns its step and the metrics up to it."""
    state = checkpoint.load_state(ckpt)
    diff = config_diff(state["run"], run_cfg)
    if diff:
        raise PretrainError(f"--resume {ckpt.parent}: {ckpt.name} comes from a different configuration: "
                            + "; ".join(diff))
    parallel.load_model_state(model, str(ckpt))  # full checkpoint in, this rank's shards kept
    parallel.load_optimizer_state(model, opt, state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    loader.load_state_dict(state["loader"])
    set_rng_state(state["rng"])
    step = state["step"]
    print(f"resumed from {ckpt} at step {step}")
    return step, [m for m in report.read_metrics(ckpt.parent / "metrics.jsonl") if m["step"] <= step]


def say(line: str) -> None:
    """A progress line above the bar, flushed: logs of a piped run show it at once."""
    tqdm.write(line)
    sys.stdout.flush()


def overrides(pairs: list[str]) -> dict:
    """--set KEY=VALUE ... → {KEY: VALUE}, each value parsed as JSON (a bare word stays a string);
    ``preset`` refuses keys that are not config fields."""
    out = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise PretrainError(f"--set {pair!r}: expected KEY=VALUE, e.g. num_hidden_layers=6")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# ---- the loop (pretraining and SFT share it) -------------------------------------------------------
def setup(a) -> tuple[parallel.Dist, object, bool]:
    """torchrun / device set-up: (dist, autocast context, bf16?)."""
    d = parallel.init_distributed(None if a.device == "auto" else a.device)  # torchrun: one process per rank
    if not d.is_main:
        sys.stdout = open(os.devnull, "w")  # one voice: rank 0's (errors still reach stderr)
    if a.batch_size % d.world:
        raise PretrainError(f"--batch-size {a.batch_size} (the global micro-batch) does not divide over {d.world} ranks")
    bf16 = a.dtype == "bfloat16" or (a.dtype == "auto" and d.device.type == "cuda")
    amp = torch.autocast(d.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    return d, amp, bf16


def find_resume(a, out: Path) -> Path | None:
    """The checkpoint --resume continues (None for a fresh run, which must not overwrite another run).
    An unreadable newest checkpoint is skipped for the one before it (and set aside as bad-step-N when
    this run writes into the same directory); --out must be the --resume directory or hold no checkpoint."""
    if a.resume:
        try:
            checkpoint.check_resume_out(a.resume, out)
        except checkpoint.CheckpointError as e:
            raise PretrainError(str(e)) from None
        same = Path(a.resume).resolve() == out.resolve()
        found = checkpoint.newest_loadable(a.resume, quarantine=same and parallel.is_main())
        if found is None:
            raise PretrainError(f"--resume {a.resume}: no complete, readable checkpoint (step-XXXXXX with "
                                f"{checkpoint.STATE}) in that directory")
        return found[0]
    if checkpoint.latest(out) is not None:
        raise PretrainError(f"{out} already holds checkpoints ({checkpoint.latest(out).name}): pass --resume {out} "
                            f"to continue that run, or choose another --out")
    return None


def check_config(cfg, a) -> None:
    """Refuse, before any step, flag combinations the model cannot train with."""
    moes = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    if a.bias_gamma > 0 and moes and cfg.topk_method != "noaux_tc":
        raise PretrainError(f"--bias-gamma {a.bias_gamma}: aux-loss-free balancing moves the routing bias of "
                            f"topk_method 'noaux_tc', but this model routes with {cfg.topk_method!r} (no bias); "
                            f"pass --bias-gamma 0 (and balance with --balance-alpha)")


def fit(a, out: Path, d: parallel.Dist, amp, model, tok: Tokenizer, loader, held: torch.Tensor, run_cfg: dict,
        resume: Path | None, finish=None) -> Path:
    """The training loop: optimizer and schedule, exact resume, held-out evaluation, progress lines,
    atomic checkpoints, the NaN stop, plots and report. ``model`` is built (random or loaded) on every
    rank; ``loader`` yields the global batches, ``held`` the fixed held-out batches (N, …).
    ``finish(model, record)`` runs on rank 0 after the last step (e.g. an accuracy check that records
    its metrics). Returns ``out/final``."""
    cfg = model.config
    check_config(cfg, a)
    model.train()
    if a.fp8:  # before parallelize, which wraps these modules (EPExperts keeps FP8TrainExperts' FP8 GEMMs)
        to_fp8_training(model)
    model = parallel.parallelize(model, d)  # expert parallel + FSDP2; the model itself with one process
    opt = build_optimizer(model, a.lr, a.weight_decay, bf16_moments=a.bf16_moments)  # after parallelize: sharded
    sched = build_scheduler(opt, a.steps, a.warmup, a.decay_from, a.min_lr_ratio)
    moes = model.named_moe_layers(a.mtp_lambda > 0)
    names = [n for n, _ in moes]
    loss_fn = loss_function(model, moes, a.mtp_lambda, a.balance_alpha, a.compile)

    step, metrics = restore(resume, run_cfg, model, opt, sched, loader) if resume else (0, [])
    record = report.metrics_log(out / "metrics.jsonl", metrics, d.is_main)

    def eval_now(s: int) -> None:
        e = evaluate(model, held, a, amp, d.device)
        record({"kind": "eval", "step": s, **e})
        mtp = f" | held-out mtp {e['eval_mtp']:.4f}" if e["eval_mtp"] is not None else ""
        say(f"eval {s:>{len(str(a.steps))}}/{a.steps} | held-out ce {e['eval_ce']:.4f}{mtp}")

    params = cfg.param_counts()
    tok_per_step = a.batch_size * a.grad_accum * (held.shape[-1] - (held.dim() == 2))
    if step == 0:
        eval_now(0)
    last = checkpoint.latest(out) or resume
    times: deque[float] = deque(maxlen=20)
    bar = tqdm(total=a.steps, initial=step, unit="step", disable=None, dynamic_ncols=True, leave=False)
    try:
        while step < a.steps:
            t0 = time.perf_counter()
            try:
                r = train_step(model, loss_fn, moes, loader, opt, sched, a, amp, step, d)
            except PretrainError as e:
                kept = f"last good checkpoint: {last}" if last else "no checkpoint was written yet"
                raise PretrainError(f"{e}; {kept}") from None
            step += 1
            times.append(time.perf_counter() - t0)
            r["tok_s"] = tok_per_step / times[-1]
            record({"kind": "train", "step": step, **r})
            bar.update(1)
            bar.set_postfix(loss=f"{r['loss']:.3f}", refresh=False)
            if step % a.log_every == 0 or step in (1, a.steps):
                mtp = f"{r['mtp']:.4f}" if r["mtp"] is not None else "   -  "
                eta = sum(times) / len(times) * (a.steps - step)
                say(f"step {step:>{len(str(a.steps))}}/{a.steps} | loss {r['loss']:.4f} | ce {r['ce']:.4f} | "
                    f"mtp {mtp} | lr {r['lr']:.2e} | {r['tok_s']:7,.0f} tok/s | "
                    f"maxvio {max(r['maxvio'], default=0.0):.3f} | eta {fmt_time(eta)}")
            if step % a.eval_every == 0 or step == a.steps:
                eval_now(step)
            if step % a.save_every == 0 or step == a.steps:
                full = parallel.full_state_model(model, d)  # gathers: every rank calls it; None off rank 0
                state = {"step": step, "optimizer": parallel.optimizer_state(model, opt),
                         "scheduler": sched.state_dict(), "loader": loader.state_dict(), "rng": rng_state(),
                         "run": run_cfg, "layer_names": names}
                last = checkpoint.save(out, step, full, tok, state, a.keep) if d.is_main else out / f"step-{step:06d}"
                parallel.barrier()
    finally:
        bar.close()

    model = parallel.full_state_model(model, d)  # from here on rank 0 alone, on the whole model
    if not d.is_main:
        parallel.shutdown()
        return out / "final"
    model.to(d.device)
    final = checkpoint.link_final(out, last)
    if finish is not None:
        finish(model, record, step)
    plots = report.plot(metrics, out / "plots", names)
    path = report.write_report(out, run_cfg, params, metrics, plots, names)
    print(f"checkpoint: {final} -> {last.name}\nreport:     {path}")
    parallel.shutdown()
    return final


# ---- the stage ---------------------------------------------------------------------------------------
def initial_config(a) -> ModelConfig:
    """--model's config.json, extended with YaRN to --extend-to N (raises ConfigError naming the field)."""
    cfg = ModelConfig.load(a.init_from)
    if a.extend_to is None:
        return cfg
    orig = cfg.yarn["original_max_position_embeddings"] if cfg.yarn else cfg.max_position_embeddings
    state = Path(a.init_from) / checkpoint.STATE
    trained = checkpoint.load_state(a.init_from)["run"].get("seq_len") if state.exists() else None
    if trained and trained < orig and not cfg.yarn:
        print(f"note: {a.init_from} was trained on {trained}-token windows but says max_position_embeddings "
              f"{orig}; YaRN extends from {orig} (pretrain with --set max_position_embeddings={trained})")
    try:
        return extend_context(cfg, a.extend_to)
    except ConfigError as e:
        raise ConfigError(f"--extend-to {a.extend_to} (--model {a.init_from}): {e}") from None


def run(a: argparse.Namespace) -> Path:
    """Train; returns the final checkpoint directory."""
    out = Path(a.out or a.resume or "out/pretrain")
    d, amp, bf16 = setup(a)
    device = d.device
    resume = find_resume(a, out)
    try:
        cfg = initial_config(a) if a.init_from else preset(a.preset, **overrides(a.set))
    except ConfigError as e:
        raise PretrainError(str(e)) from None
    source = f"--model {a.init_from}" if a.init_from else f"preset {a.preset}"
    if a.seq_len > cfg.max_position_embeddings:
        hint = "; --extend-to N raises it with YaRN" if a.init_from and not a.extend_to else ""
        raise PretrainError(f"--seq-len {a.seq_len} exceeds the model's max_position_embeddings "
                            f"{cfg.max_position_embeddings} ({source}{hint})")
    out.mkdir(parents=True, exist_ok=True)
    for p in checkpoint.clean(out):
        print(f"removed {p} (left by an interrupted save)")
    tok_dir = Path(a.init_from) if a.init_from else Path(a.tokenizer) if a.tokenizer else None
    tok, train_tokens, held_tokens = load_data(a, resume or tok_dir, out)
    if not a.init_from:
        cfg = cfg.replace(vocab_size=-(-tok.vocab_size // 64) * 64, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    elif tok.vocab_size > cfg.vocab_size:
        raise PretrainError(f"--model {a.init_from}: its tokenizer has {tok.vocab_size} tokens, more than the "
                            f"config's vocab_size {cfg.vocab_size}")
    run_cfg = {k: v for k, v in sorted(vars(a).items()) if k not in RESUMABLE}
    run_cfg.update(model=cfg.to_dict(), data_sha=fingerprint(train_tokens))

    random.seed(a.seed)
    torch.manual_seed(a.seed)
    if a.init_from:
        try:  # fp32 master weights, the config (extended or not) decided above
            model = load_model(a.init_from, dtype=torch.float32, device=device, config=cfg)
        except (OSError, ValueError, KeyError) as e:
            raise PretrainError(f"--model {a.init_from}: cannot load the checkpoint ({e})") from None
        model.train()
    else:
        model = build(cfg, device=device, seed=a.seed)  # fp32 master weights, the same on every rank
    if a.dsa:
        try:  # before fit builds the optimizer: warm-up leaves only the indexers trainable
            dsa.set_training(model, a.dsa)
        except ValueError as e:
            raise PretrainError(f"--dsa {a.dsa} ({source}): {e}") from None
    loader = PackedLoader(train_tokens, a.seq_len, a.batch_size, a.seed)
    held = windows(held_tokens, a.seq_len, "held-out data")[: a.eval_batches * a.batch_size]
    params = cfg.param_counts()
    tok_per_step = a.batch_size * a.grad_accum * a.seq_len
    if cfg.yarn:
        source += (f", YaRN {cfg.yarn['original_max_position_embeddings']} → {cfg.max_position_embeddings} "
                   f"(factor {cfg.yarn['factor']:g})")
    print(f"model: {source}, vocab {cfg.vocab_size}, {params['total']:,} parameters "
          f"({params['active']:,} active, +{params['mtp_unique']:,} MTP) on {device}{' bf16' if bf16 else ''}\n"
          f"data: {train_tokens.numel():,} training tokens ({len(loader)} windows of {a.seq_len + 1}), "
          f"{held.numel():,} held-out; {tok_per_step:,} tokens/step × {a.steps} steps = "
          f"{tok_per_step * a.steps / train_tokens.numel():.1f} epochs")

    def finish(model, record, step):
        if a.eval_problems > 0:
            probs = problems("arithmetic", "test", a.eval_problems, difficulty=1)
            acc, texts = greedy_accuracy(model, tok, probs)
            record({"kind": "accuracy", "step": step, "task": "arithmetic", "difficulty": 1, "n": len(probs),
                    "accuracy": acc, "samples": [[p.prompt, t] for p, t in zip(probs[:5], texts[:5])]})
            print(f"greedy exact-answer accuracy on {len(probs)} held-out arithmetic problems (difficulty 1): {acc:.0%}")

    return fit(a, out, d, amp, model, tok, loader, held, run_cfg, resume, finish)


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        run(a)
    except (PretrainError, DataError) as e:
        print(f"minke pretrain: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

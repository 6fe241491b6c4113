"""FP8 training's error in one step, where a whole run's loss cannot show it: the gradient of the same
weights on the same batch through FP8 GEMMs (``minke pretrain --fp8``) against the baseline's, beside
how much the baseline's own gradient differs between two batches (the noise SGD lives with anyway).

fp8_loss.py compares whole runs; at small scale their final losses differ by percents of either sign
between seeds or a 1e-4 nudge of the learning rate, which hides any cost of FP8 itself. Here nothing
is chaotic: one set of weights (a checkpoint, or ``--init``: fresh ones of its config, as a run starts),
two fixed batches, and per parameter group the mean cosine of

- ``fp8_vs_base``: the FP8 gradient against the baseline's on batch 1 (FP8's error per step);
- ``base_batch_vs_batch``: the baseline's on batch 1 against batch 2 (minibatch noise);
- ``error_batch_vs_batch``: FP8's error (its gradient minus the baseline's) on batch 1 against that
  on batch 2: how persistent the error is, i.e. whether it would add up over steps as a bias does;

with the groups' least-agreeing parameter, and the held-out cross-entropy of both forwards on the same
weights (FP8's forward error). Losses and gradients are pretrain's (``lm_loss``: CE, MTP, no balance term).

    .venv/bin/python benchmarks/fp8_grad.py --model out/fp8_stdlib/base-s0/final --data out/fp8_stdlib/stdlib-4mb.jsonl --init
"""

from __future__ import annotations

import argparse
import copy
import json
from contextlib import nullcontext
from pathlib import Path

import torch

import minke
from minke.quant.modules import is_fp8_linear, to_fp8_training
from minke.train.pretrain import lm_loss, load_data


def group(model: torch.nn.Module, name: str) -> str:
    """The parameter's group; which linears are FP8 is minke.quant's own rule (is_fp8_linear)."""
    owner = name.rsplit(".", 1)[0]
    if ".mlp.experts." in name:
        return "routed experts"
    if name.endswith("mlp.gate.weight"):
        return "MoE gate"
    if is_fp8_linear(owner, model.get_submodule(owner)):
        return "attention projections" if ".self_attn." in name else "shared experts and dense MLPs"
    return "embedding, head, norms"


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a.flatten().double() @ b.flatten().double() / (a.norm() * b.norm()).double().clamp(min=1e-300))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a checkpoint directory (config.json, weights, tokenizer)")
    p.add_argument("--init", action="store_true", help="fresh weights of --model's config (seed --seed)")
    p.add_argument("--data", nargs="+", help="pretrain's --data files (default: the task corpus of --seed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--mtp-lambda", type=float, default=0.3)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="the baseline's compute dtype")
    a = p.parse_args(argv)
    cfg = minke.ModelConfig.load(a.model)
    model = minke.build(cfg, seed=a.seed) if a.init else minke.load(a.model, dtype=torch.float32)
    data = argparse.Namespace(data=a.data, docs=2000, eval_docs=400, seed=a.seed, seq_len=a.seq_len,
                              eval_fraction=0.05)
    _, train, held = load_data(data, Path(a.model), Path(a.model))  # the checkpoint's tokenizer: nothing written
    W, B = a.seq_len + 1, a.batch_size
    if train.numel() < 2 * B * W or held.numel() < W:
        raise SystemExit(f"fp8_grad: too little data for two batches of {B}x{W} tokens and a held-out window")
    batches = train[: 2 * B * W].view(2, B, W)
    held = held[: min(a.eval_batches * B, held.numel() // W) * W].view(-1, W)
    fp8 = copy.deepcopy(model)
    to_fp8_training(fp8)
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if a.dtype == "bfloat16" else nullcontext()

    def loss(m, batch):
        with amp:
            return lm_loss(m, batch, m.named_moe_layers(a.mtp_lambda > 0), a.mtp_lambda, 0.0)

    def grads(m, batch):
        m.train()
        m.zero_grad()
        loss(m, batch)[0].backward()
        return {n: q.grad.detach().clone() for n, q in m.named_parameters() if q.grad is not None}

    @torch.no_grad()
    def held_ce(m):
        m.eval()
        return sum(float(loss(m, b)[1]["ce"]) for b in held.split(B)) / -(-len(held) // B)

    base1, base2 = grads(model, batches[0]), grads(model, batches[1])
    f1, f2 = grads(fp8, batches[0]), grads(fp8, batches[1])
    groups: dict[str, dict] = {}
    for n, g in base1.items():
        r = groups.setdefault(group(model, n), {"fp8": [], "noise": [], "error": [], "norm_ratio": []})
        r["fp8"].append((cos(f1[n], g), n))
        r["noise"].append(cos(base2[n], g))
        r["error"].append(cos(f1[n] - g, f2[n] - base2[n]))
        r["norm_ratio"].append(float(f1[n].norm() / g.norm().clamp(min=1e-30)))
    ce_base, ce_fp8 = held_ce(model), held_ce(fp8)
    report = {
        "model": a.model, "init": a.init, "dtype": a.dtype, "tokens_per_batch": B * a.seq_len,
        "held_out_ce": {"base": ce_base, "fp8": ce_fp8, "relative": ce_fp8 / ce_base - 1},
        "groups": {k: {"params": len(r["fp8"]),
                       "fp8_vs_base": sum(c for c, _ in r["fp8"]) / len(r["fp8"]),
                       "least": dict(zip(("cos", "param"), min(r["fp8"]))),
                       "base_batch_vs_batch": sum(r["noise"]) / len(r["noise"]),
                       "error_batch_vs_batch": sum(r["error"]) / len(r["error"]),
                       "fp8_norm_over_base": sum(r["norm_ratio"]) / len(r["norm_ratio"])}
                   for k, r in sorted(groups.items())}}
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()

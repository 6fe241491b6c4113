"""Training tokens/s of minke vs transformers' DeepseekV3ForCausalLM: same config, weights, batch, optimizer.

One training step = forward, next-token cross-entropy, backward, gradient clipping (1.0), AdamW step
(minke's ``build_optimizer`` for both: β (0.9, 0.95), weight decay 0.1 on matrices). minke is built,
written with ``minke.save`` and read back by both libraries, so the two start from the same weights.
minke's step is pretrain.py's own (``lm_loss``, ``balance_step``), so it also pays for what
transformers has no counterpart for: the sequence-wise balance loss and the routing-bias update.
transformers has no MTP module, so the head-to-head figure runs minke without MTP; ``minke_mtp_tok_s``
adds MTP (λ = 0.3), the step minke's pretraining really runs.

transformers runs its best available paths, recorded in the JSON: ``attn_implementation="sdpa"`` and
``experts_implementation="grouped_mm"`` (its default, torch's grouped GEMM).

Timing: ``--warmup`` untimed steps per model, then ``--repeats`` rounds; each round times ``--steps``
steps of every model in turn (interleaved, so drift of the machine hits all equally). The figure is
the median over rounds of tokens / second, tokens = batch × seq per step.

    .venv/bin/python benchmarks/train_step.py                     # default config below, CPU, ~1 min
    .venv/bin/python benchmarks/train_step.py --batch 1 --seq 1024  # same tokens, longer sequences
    .venv/bin/python benchmarks/train_step.py --preset small --batch 2 --seq 512
    .venv/bin/python benchmarks/train_step.py --device cuda --dtype bfloat16 --preset small --batch 8 --seq 1024
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
import sys
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F

import minke
from minke.train.optim import build_optimizer
from minke.train.pretrain import balance_step, loss_function

# A V3-shaped model small enough for two CPU cores, big enough that the matmuls (not Python) dominate:
# q LoRA, noaux_tc routing over 4 groups, YaRN, 1 dense + 3 MoE layers of 16 routed experts (top-4)
# plus 1 shared, one MTP module. 8.5M parameters (5.0M active per token) + 2.0M in the MTP module.
DEFAULT = dict(vocab_size=4096, hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
               num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8, q_lora_rank=128,
               kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
               n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
               first_k_dense_replace=1, routed_scaling_factor=2.5, num_nextn_predict_layers=1,
               max_position_embeddings=4096, initializer_range=0.02,
               rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
                             "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})

MTP_LAMBDA = 0.3  # λ of V3 §2.2 (early training)
BALANCE_ALPHA = 1e-4  # α of the sequence-wise balance loss (V3 §2.1.2)
BIAS_GAMMA = 1e-3  # γ of the routing-bias update
CLIP = 1.0


def minke_step(model, loss_fn, moes, opt, batch):
    """pretrain.py's step: lm_loss (CE + λ·MTP + α·balance), backward, clip, AdamW, bias update.
    ``loss_fn`` is pretrain.py's ``loss_function`` (compiled or not)."""
    loss, _ = loss_fn(batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    opt.step()
    opt.zero_grad(set_to_none=True)
    balance_step(moes, [m.load for _, m in moes], BIAS_GAMMA)
    return loss


def hf_loss(model, batch):
    """next-token CE exactly as lm_loss computes it."""
    x, y = batch[:, :-1], batch[:, 1:]
    return F.cross_entropy(model(input_ids=x).logits.flatten(0, 1).float(), y.flatten())


def hf_step(model, loss_fn, opt, batch):
    """The same step for transformers: ``loss_fn`` (``hf_loss``, compiled or not), clip, AdamW."""
    loss = loss_fn(batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # ---- model and batch ----
    p.add_argument("--preset", help="a minke preset (tiny, small, ...) instead of the default config")
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="parameter dtype")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    # ---- timing ----
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model before timing")
    p.add_argument("--steps", type=int, default=3, help="timed steps per model per round")
    p.add_argument("--repeats", type=int, default=5, help="rounds; the median round is reported")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    # ---- what to run ----
    p.add_argument("--no-transformers", action="store_true", help="time minke only")
    p.add_argument("--amp", default="none", choices=["none", "bfloat16"],
                   help="autocast both models to this dtype (master weights stay --dtype), as `minke pretrain "
                        "--dtype bfloat16` and transformers' Trainer(bf16=True) do")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile minke's forward + loss (`minke pretrain --compile`)")
    p.add_argument("--compile-transformers", action="store_true",
                   help="torch.compile transformers' forward + loss too (its Trainer does not by default)")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    device = args.device
    if args.preset:
        cfg = minke.preset(args.preset)
        if not cfg.num_nextn_predict_layers:
            cfg = cfg.replace(num_nextn_predict_layers=1)
    else:
        cfg = minke.ModelConfig(**DEFAULT)
    B, T = args.batch, args.seq
    batch = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(0)).to(device)

    with tempfile.TemporaryDirectory() as d:
        minke.save(minke.build(cfg, seed=0), d)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = minke.load(d, dtype=dtype, device=device).train()
            hf = None
            if not args.no_transformers:
                import transformers
                from transformers import DeepseekV3ForCausalLM
                transformers.logging.set_verbosity_error()  # its load report lists the MTP layer it drops
                hf = DeepseekV3ForCausalLM.from_pretrained(d, dtype=dtype, attn_implementation="sdpa",
                                                           experts_implementation="grouped_mm").to(device).train()

    amp = (torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if args.amp == "bfloat16"
           else contextlib.nullcontext())
    runners = {}  # name -> one training step
    opt = build_optimizer(model, lr=1e-4)  # minke's: AdamW β (0.9, 0.95), decay 0.1 on matrices
    for name, mtp in (("minke", False), ("minke_mtp", True)):
        moes = model.named_moe_layers(mtp)
        loss_fn = loss_function(model, moes, MTP_LAMBDA if mtp else 0.0, BALANCE_ALPHA, args.compile)
        runners[name] = lambda loss_fn=loss_fn, moes=moes: minke_step(model, loss_fn, moes, opt, batch)
    if hf is not None:
        hf_opt = build_optimizer(hf, lr=1e-4)  # the same AdamW, same groups
        hf_fn = functools.partial(hf_loss, hf)
        hf_fn = torch.compile(hf_fn) if args.compile_transformers else hf_fn
        runners["transformers"] = lambda: hf_step(hf, hf_fn, hf_opt, batch)

    with amp:  # the same precision for every model
        for run in runners.values():
            for _ in range(args.warmup):
                run()
        sync(device)
        rates = {name: [] for name in runners}
        cpu_rates = {name: [] for name in runners}  # tokens per CPU-second of this process (all its threads)
        for r in range(args.repeats):
            for name, run in runners.items():
                sync(device)
                t0, c0 = time.perf_counter(), time.process_time()
                for _ in range(args.steps):
                    run()
                sync(device)
                rates[name].append(B * T * args.steps / (time.perf_counter() - t0))
                cpu_rates[name].append(B * T * args.steps / (time.process_time() - c0))
            print(f"round {r + 1}/{args.repeats}: " + ", ".join(f"{n} {v[-1]:,.0f} tok/s" for n, v in rates.items()),
                  file=sys.stderr)

    med = {name: statistics.median(v) for name, v in rates.items()}
    report = {
        "config": "preset:" + args.preset if args.preset else dict(DEFAULT),
        "params": {k: cfg.param_counts()[k] for k in ("total", "active", "mtp_unique")},
        "batch": {"batch": B, "seq": T, "tokens_per_step": B * T},
        "dtype": args.dtype, "amp": args.amp, "device": device, "threads": torch.get_num_threads(),
        "timing": {"warmup": args.warmup, "steps": args.steps, "repeats": args.repeats, "stat": "median"},
        "minke_tok_s": round(med["minke"], 1),
        "transformers_tok_s": round(med["transformers"], 1) if hf is not None else None,
        "ratio": round(med["minke"] / med["transformers"], 3) if hf is not None else None,
        "minke_mtp_tok_s": round(med["minke_mtp"], 1),
        # Less sensitive than wall time to other jobs on a shared machine (exact with --threads 1).
        "cpu_tok_s": {name: round(statistics.median(v), 1) for name, v in cpu_rates.items()},
        "minke_compile": args.compile, "transformers_compile": args.compile_transformers,
        "transformers_impl": ({"attn_implementation": hf.config._attn_implementation,
                               "experts_implementation": hf.config._experts_implementation}
                              if hf is not None else None),
        "versions": {"torch": torch.__version__,
                     "transformers": __import__("transformers").__version__ if hf is not None else None},
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return report


if __name__ == "__main__":
    main()

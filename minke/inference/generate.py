"""`minke generate`: complete one prompt with a checkpoint through the engine, streaming the text.

    minke generate --model out/ckpt --prompt "What is 17 + 25?" --chat --temperature 0
    minke generate --model out/ckpt --prompt "Once upon a time" --max-tokens 64 --seed 0 --speculative

The checkpoint directory holds config.json, the safetensors weights and the tokenizer files. Text goes
to stdout as it is generated; a summary line (tokens, tokens/s, finish reason, MTP acceptance) to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch


def add_model_args(p: argparse.ArgumentParser) -> None:
    # ---- model
    p.add_argument("--model", required=True, help="checkpoint directory (config.json, weights, tokenizer.json)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weights and cache dtype (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--speculative", action="store_true", help="draft with the MTP module and verify")


def open_model(a: argparse.Namespace, max_batch: int, **engine_kw):
    """(Engine, Tokenizer, model name) for a checkpoint directory holding its tokenizer files;
    ``engine_kw`` go to the Engine (e.g. max_prefill_tokens)."""
    import minke
    from minke.data.tokenizer import Tokenizer
    from .engine import Engine

    path = Path(a.model)
    if not (path / "tokenizer.json").exists():
        raise SystemExit(f"minke: {path}/tokenizer.json not found (the checkpoint directory needs its tokenizer)")
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, a.dtype) if a.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    tokenizer = Tokenizer.load(path)
    model = minke.load(path, dtype=dtype, device=device)
    engine = Engine(model, max_batch=max_batch, decode_fn=tokenizer.decode, speculative=a.speculative,
                    num_draft=getattr(a, "num_draft", 1), **engine_kw)
    return engine, tokenizer, path.resolve().name


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minke generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    # ---- prompt
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--chat", action="store_true",
                   help="send the prompt as a user message through the chat template (opens <think>)")
    # ---- sampling
    p.add_argument("--max-tokens", type=int, default=256, help="new tokens at most")
    p.add_argument("--temperature", type=float, default=0.6, help="0 = greedy (DeepSeek recommends 0.6)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus mass, 1 = off")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens, 0 = off")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    # ---- engine
    p.add_argument("--num-draft", type=int, default=1, help="draft tokens per step with --speculative")
    return p


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    from ..text import TextStream
    from .sampling import SamplingParams

    engine, tok, _ = open_model(a, max_batch=1)
    params = SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                            seed=a.seed, stop=a.stop,
                            stop_token_ids=None if tok.eos_id is None else [tok.eos_id])
    if a.chat:
        ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": a.prompt}]))
    else:
        ids = tok.encode(a.prompt, add_bos=tok.bos_id is not None)

    text = TextStream(tok.decode, stop=a.stop or (), split=False)  # incremental: O(new tokens) per step
    t0 = time.perf_counter()
    last = None
    for ev in engine.stream(ids, params):
        last = ev
        new = [ev.token_id] if ev.token_id is not None and ev.token_id not in params.stop_token_ids else []
        _, content = text.add(new, final=ev.finished)
        sys.stdout.write(content)
        sys.stdout.flush()
    dt = time.perf_counter() - t0
    sys.stdout.write("\n")
    n = engine.stats.generated_tokens
    acc = engine.stats.acceptance_rate
    print(f"[{n} tokens in {dt:.2f}s, {n / max(dt, 1e-9):.1f} tok/s, finish_reason={last.finish_reason}"
          + (f", MTP acceptance {acc:.2f}" if acc is not None else "") + "]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`minke chat`: talk to a checkpoint in the terminal.

    minke chat --model out/ckpt [--system "Be brief."] [--temperature 0.6]

Each turn goes through the chat template (the checkpoint's, else DeepSeek-R1's), tokens stream as
they are generated, and the ``<think>`` reasoning is shown apart from the answer: dimmed after
``[think]``, the answer after ``[answer]``. As in R1's template, earlier answers are kept in the
conversation without their reasoning. Commands: /reset (forget the conversation), /exit (or Ctrl-D).
Ctrl-C stops the answer being generated.
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import closing

from ..data.tokenizer import THINK
from ..inference.generate import add_model_args, open_model
from ..text import TextStream

DIM, RESET = "\x1b[2m", "\x1b[0m"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minke chat", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    # ---- conversation
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--max-tokens", type=int, default=1024, help="new tokens per answer at most")
    p.add_argument("--temperature", type=float, default=0.6, help="0 = greedy (DeepSeek recommends 0.6)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus mass, 1 = off")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    return p


def main(argv: list[str] | None = None) -> int:
    from minke.inference.sampling import SamplingParams

    a = _parser().parse_args(argv)
    engine, tok, name = open_model(a, max_batch=1)
    params = SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, seed=a.seed,
                            stop_token_ids=sorted({*engine.eos_ids, tok.eos_id} - {None})).validate()
    tty = sys.stdout.isatty()
    dim, reset = (DIM, RESET) if tty else ("", "")
    start = [{"role": "system", "content": a.system}] if a.system else []
    messages = list(start)
    print(f"minke chat: {name} ({engine.device}). /reset forgets the conversation, /exit quits.")
    while True:
        try:
            line = input("> " if tty else "")
        except EOFError:
            break
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            messages = list(start)
            print("(conversation reset)")
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        prompt = tok.apply_chat_template(messages)
        ids = tok.encode(prompt)
        if len(ids) >= engine.context:
            print(f"(the conversation has {len(ids)} tokens, the model's context is {engine.context}: /reset)")
            messages.pop()
            continue
        text = TextStream(tok.decode, think=prompt.rstrip().endswith(THINK))
        shown = {"reasoning": False, "content": False}
        t0, n, reason = time.perf_counter(), 0, "abort"

        def show(reasoning: str, content: str) -> None:
            if reasoning and not shown["content"]:
                if not shown["reasoning"]:
                    reasoning = "[think] " + reasoning.lstrip()
                shown["reasoning"] = True
                sys.stdout.write(dim + reasoning + reset)
            if content and (shown["content"] or content.strip()):
                if not shown["content"]:
                    content = ("\n" if shown["reasoning"] else "") + "[answer] " + content.lstrip()
                shown["content"] = True
                sys.stdout.write(content)
            sys.stdout.flush()

        try:
            with closing(engine.stream(ids, params)) as events:  # closing aborts the request
                for ev in events:
                    n += ev.token_id is not None
                    show(*text.add([] if ev.token_id is None else [ev.token_id]))
                    reason = ev.finish_reason or reason
        except KeyboardInterrupt:
            reason = "interrupted"
        show(*text.finish())
        dt = time.perf_counter() - t0
        print(f"\n{dim}[{n} tokens, {n / max(dt, 1e-9):.1f} tok/s, {reason}]{reset}")
        messages.append({"role": "assistant", "content": text.content})
    return 0


if __name__ == "__main__":
    sys.exit(main())

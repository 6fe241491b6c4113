"""`minke <stage> [flags]`: each stage is ``main(argv)`` in its own module, imported only when used."""

from __future__ import annotations

import importlib
import sys

STAGES = {
    "info": ("minke.info", "parameter counts and KV-cache bytes of a preset or checkpoint"),
    "convert": ("minke.convert", "a checkpoint between BF16 and DeepSeek's FP8 block format (E4M3 + 128x128 scales)"),
    "cost": ("minke.cost", "$ per 1M tokens, measured or a roofline projection, beside DeepSeek's"),
    "pretrain": ("minke.train.pretrain", "pretrain a model (tokenizer, MTP loss, aux-loss-free balancing)"),
    "sft": ("minke.train.sft", "supervised fine-tuning on chat examples (R1 cold start, distillation)"),
    "grpo": ("minke.rl.train", "GRPO with verifiable rewards (R1 / R1-Zero reinforcement learning)"),
    "report": ("minke.eval.report", "one report of a pipeline run: every stage's evaluation, the RL curves, summary.json"),
    "generate": ("minke.inference.generate", "generate text from a prompt"),
    "chat": ("minke.serve.chat", "interactive chat with a checkpoint"),
    "serve": ("minke.serve.server", "OpenAI-compatible HTTP server"),
    "eval": ("minke.eval.run", "pass@1 over k, pass@k, cons@k, greedy on held-out tasks or JSONL sets"),
    "sample": ("minke.rl.sample", "rejection sampling: keep verified-correct completions as SFT JSONL"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in STAGES:
        width = max(map(len, STAGES))
        lines = [f"  {name:<{width}}  {help}" for name, (_, help) in STAGES.items()]
        print("usage: minke <stage> [flags]   (minke <stage> --help for its flags)\n\nstages:\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nminke: unknown stage {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    module = importlib.import_module(STAGES[argv[0]][0])
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())

"""A tiny chat checkpoint for the serving tests: a BPE tokenizer trained on the task corpus and a tiny
MLA+MoE model (float64, so batched and single runs cannot differ at an argmax tie) trained for a few
seconds to answer SCRIPT's conversations in R1's format, so its greedy output holds a real
``<think>…</think>`` block."""

from __future__ import annotations

import functools

import torch

import minke
from minke.data.tokenizer import Tokenizer, train_tokenizer
from minke.tasks import corpus

SYSTEM = "Be brief."
# (reasoning, answer); the template's generation prompt opens the block with "<think>\n", so the
# model's reply is reasoning + "</think>" + answer.
HI = ("The user says hi.\n", "\n\nHello! Ask me a sum.")
SUM = ("2 + 3 = 5\n", "\n\n\\boxed{5}")
reply = "</think>".join
# (conversation so far, the assistant's reply): the second turn follows the first one.
SCRIPT = [
    ([{"role": "user", "content": "hi"}], reply(HI)),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<think>\n" + reply(HI)},
      {"role": "user", "content": "What is 2 + 3?"}], reply(SUM)),
    ([{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"}], reply(HI)),
]




@functools.lru_cache
def make(steps: int = 300, seed: int = 0) -> tuple[minke.Transformer, Tokenizer]:
    tok = train_tokenizer(corpus(300, seed=0) + [r for _, r in SCRIPT], vocab_size=320)
    cfg = minke.preset("tiny", vocab_size=tok.vocab_size, max_position_embeddings=256)
    model = minke.build(cfg, seed=seed, dtype=torch.float64)
    prompts = [tok.encode(tok.apply_chat_template(m)) for m, _ in SCRIPT]
    seqs = [p + tok.encode(r) + [tok.eos_id] for p, (_, r) in zip(prompts, SCRIPT)]
    T = max(map(len, seqs))
    ids = torch.tensor([s + [tok.pad_id] * (T - len(s)) for s in seqs])
    # loss on the replies only: (B, T-1), True where the next token is part of the reply
    mask = torch.tensor([[len(p) - 1 <= t < len(s) - 1 for t in range(T - 1)] for p, s in zip(prompts, seqs)])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        logits = model(ids[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits[mask], ids[:, 1:][mask])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.01:
            break
    return model.eval(), tok

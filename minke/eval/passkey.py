"""Passkey retrieval: can the model find one number hidden at a chosen depth of N tokens of filler?

The test of Mohtashami & Jaggi (2023, "Landmark Attention"), used by the YaRN paper and for
DeepSeek-V3's context extension (V3 §4.3, "Needle In A Haystack"). A prompt of exactly the
context's length but for the answer's few tokens:

    bos  INTRO  filler …  " The pass key is 12345. Remember it."  filler …  " What is the pass key? The pass key is"

The key sits after a fraction ``depth`` of the filler tokens (0: right after the intro, 1: right
before the question). The model answers greedily through the engine; it is right when the first
number of its answer is the key (exact retrieval; keys have five distinct digits, see ``new_key``). Filler is five sentences repeated in order from a
random one, as in the original test, reworded so that no " is" but the key's and the question's
precedes a word: a model as small as the tiny preset then finds the key by what precedes it (one
token back: an induction head) rather than having to learn a two-token match.

    minke eval --task passkey --model ckpt --context 2048 --depths 0 25 50 75 100 --trials 20 --out pk.json
    minke eval --task passkey --write-corpus passkey.jsonl --docs 20000 --sentences 4 40   # pretraining text

A tiny model learns retrieval only from text that asks for it: ``corpus`` writes documents of the same
form with the answer after the question (``minke pretrain --data passkey.jsonl``); nothing uses it by
default. ``--extrapolate`` evaluates beyond max_position_embeddings with the checkpoint's RoPE as it is
(an unextended model past its context), ``--yarn`` extends the checkpoint to --context with YaRN at
load time, without training (see minke.config.extend_context; ``minke pretrain --extend-to`` trains it).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path
from typing import Sequence

from .report import save_json

FILLER = (" The grass grows green.", " The sky looks blue.", " The sun shines yellow.", " Here we go.",
          " There and back again.")
INTRO = "An important pass key hides inside a lot of irrelevant text. Find it and remember it."
QUESTION = " What is the pass key? The pass key is"
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
ANSWER_TOKENS = 8  # room left for the answer: a space, five digits, a full stop, eos (one digit per token)


def key_sentence(key: int) -> str:
    return f" The pass key is {key}. Remember it."


def new_key(rng: random.Random) -> int:
    """Five distinct digits, the first not 0. minke's tokenizers give every digit its own token, so a
    key with a repeated digit could only be copied by matching two tokens back, not one."""
    first = rng.choice("123456789")
    return int(first + "".join(rng.sample([d for d in "0123456789" if d != first], 4)))


def filler_sentences(rng: random.Random):
    """The filler sentences, in order from a random one, forever."""
    i = rng.randrange(len(FILLER))
    while True:
        yield FILLER[i % len(FILLER)]
        i += 1


def document(rng: random.Random, sentences: int, depth: float | None = None, key: int | None = None) -> str:
    """One training document: intro, ``sentences`` filler sentences with the key after a fraction
    ``depth`` of them (random when None), the question and its answer."""
    key = new_key(rng) if key is None else key
    gen = filler_sentences(rng)
    filler = [next(gen) for _ in range(sentences)]
    at = rng.randint(0, sentences) if depth is None else round(depth * sentences)
    return INTRO + "".join(filler[:at]) + key_sentence(key) + "".join(filler[at:]) + QUESTION + f" {key}."


def recall_document(rng: random.Random, numbers: int) -> str:
    """A copying document: ``numbers`` random keys, then the same keys again. Every token of the
    repeat is predictable only by looking back (an induction head), which the passkey answer's five
    tokens alone reward too rarely for a tiny model to find."""
    keys = " ".join(str(new_key(rng)) for _ in range(numbers))
    return f"Remember these numbers: {keys}. Again: {keys}."


def corpus(docs: int, min_sentences: int, max_sentences: int, seed: int = 0, recall: float = 0.0,
           max_numbers: int = 20) -> list[str]:
    """``docs`` documents of uniformly min..max filler sentences, the key at a uniform depth; a share
    ``recall`` of them are copying documents of 1..max_numbers keys instead (``recall_document``)."""
    if not 0 <= min_sentences <= max_sentences:
        raise ValueError(f"sentences: need 0 <= min <= max, got {min_sentences} {max_sentences}")
    if not 0.0 <= recall <= 1.0:
        raise ValueError(f"recall: a share in [0, 1], got {recall}")
    rng = random.Random(seed)
    return [recall_document(rng, rng.randint(1, max_numbers)) if rng.random() < recall
            else document(rng, rng.randint(min_sentences, max_sentences)) for _ in range(docs)]


def prompt(tok, context: int, depth: float, key: int, rng: random.Random,
           answer_tokens: int = ANSWER_TOKENS) -> tuple[list[int], int]:
    """(prompt ids with bos, token index where the key sentence starts): the longest prompt of whole
    filler sentences within ``context - answer_tokens`` tokens, the key after ``depth`` of the filler
    tokens. The text is encoded in one piece, as pretraining encodes a document."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must lie in [0, 1], got {depth}")
    budget = context - answer_tokens - 1  # bos
    fixed = len(tok.encode(INTRO + key_sentence(key) + QUESTION))
    if fixed > budget:
        raise ValueError(f"context {context}: too short for the intro, key and question ({fixed + 1 + answer_tokens} "
                         f"tokens with bos and the answer)")
    lengths = {s: len(tok.encode(s)) for s in FILLER}
    sentences, used, gen = [], fixed, filler_sentences(rng)
    while True:
        s = next(gen)
        if used + lengths[s] > budget:
            break
        sentences.append(s)
        used += lengths[s]
    # the sentence boundary closest to depth × the filler tokens
    total = used - fixed
    cum, at = 0, 0
    for i, s in enumerate(sentences):
        if abs(cum + lengths[s] - depth * total) >= abs(cum - depth * total):
            break
        cum, at = cum + lengths[s], i + 1
    head = INTRO + "".join(sentences[:at])
    ids = [tok.bos_id] + tok.encode(head + key_sentence(key) + "".join(sentences[at:]) + QUESTION)
    while len(ids) > context - answer_tokens:  # a merge across sentence edges made it longer: drop filler
        sentences.pop()
        at = min(at, len(sentences))
        head = INTRO + "".join(sentences[:at])
        ids = [tok.bos_id] + tok.encode(head + key_sentence(key) + "".join(sentences[at:]) + QUESTION)
    return ids, 1 + len(tok.encode(head))


def retrieved(text: str, key: int) -> bool:
    """Exact retrieval: the first number of the answer is the key."""
    m = re.search(r"\d+", text)
    return m is not None and m.group() == str(key)


def digits_right(text: str, key: int) -> float:
    """Partial credit: the share of the key's digits that the answer's first number has in place."""
    m = re.search(r"\d+", text)
    got, want = (m.group() if m else ""), str(key)
    return sum(a == b for a, b in zip(got, want)) / len(want)


def evaluate(model, tok, context: int, depths: Sequence[float] = DEPTHS, trials: int = 10, seed: int = 0,
             max_batch: int = 16, answer_tokens: int = ANSWER_TOKENS) -> dict:
    """Greedy passkey retrieval at each depth (fractions in [0, 1]) over ``trials`` keys and fillers.

    ``model``: a Transformer (run through a fresh Engine) or an Engine. Returns {"config": …,
    "depths": [{"depth", "n", "correct", "rate", "digits", "key_position", "prompt_tokens"}…], "overall":
    {"n", "correct", "rate", "digits"}, "samples": [{"depth", "key", "answer", "correct"}…] (the first trial per depth)}."""
    from ..inference.engine import Engine
    from ..inference.sampling import SamplingParams

    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    if not depths:
        raise ValueError("no depths to evaluate")
    engine = model if isinstance(model, Engine) else Engine(model, max_batch=max_batch)
    if context > engine.context:
        raise ValueError(f"context {context} exceeds the model's max_position_embeddings {engine.context} "
                         f"(extend it with YaRN: minke pretrain --extend-to {context})")
    rng = random.Random(seed)
    cases = []  # (depth, key, ids, key position)
    for d in depths:
        for _ in range(trials):
            key = new_key(rng)
            ids, pos = prompt(tok, context, d, key, rng, answer_tokens)
            cases.append((d, key, ids, pos))
    t0 = time.perf_counter()
    done = engine.generate([c[2] for c in cases], SamplingParams(max_tokens=answer_tokens, temperature=0.0))
    seconds = time.perf_counter() - t0
    answers = [tok.decode(c.token_ids, skip_special_tokens=True) for c in done]
    right = [retrieved(a, c[1]) for a, c in zip(answers, cases)]
    digits = [digits_right(a, c[1]) for a, c in zip(answers, cases)]
    rows, samples = [], []
    for j, d in enumerate(depths):
        idx = range(j * trials, (j + 1) * trials)
        rows.append({"depth": d, "n": trials, "correct": sum(right[i] for i in idx),
                     "rate": sum(right[i] for i in idx) / trials,
                     "digits": sum(digits[i] for i in idx) / trials,
                     "key_position": sum(cases[i][3] for i in idx) / trials,
                     "prompt_tokens": [min(len(cases[i][2]) for i in idx), max(len(cases[i][2]) for i in idx)]})
        i = idx[0]
        samples.append({"depth": d, "key": cases[i][1], "answer": answers[i], "correct": right[i]})
    n = len(cases)
    return {"config": {"context": context, "depths": list(depths), "trials": trials, "seed": seed,
                       "max_position_embeddings": engine.context, "rope_scaling": engine.config.rope_scaling,
                       "seconds": round(seconds, 2)},
            "depths": rows, "overall": {"n": n, "correct": sum(right), "rate": sum(right) / n,
                                        "digits": sum(digits) / n}, "samples": samples}


def format_table(result: dict) -> str:
    c = result["config"]
    lines = [f"passkey retrieval at context {c['context']} ({c['trials']} keys per depth, greedy, "
             f"{c['seconds']:.1f}s)", f"{'depth':>6}  {'key at':>7}  {'retrieved':>9}  {'digits':>7}"]
    for r in result["depths"]:
        lines.append(f"{100 * r['depth']:>5.0f}%  {r['key_position']:>7.0f}  {100 * r['rate']:>8.1f}%  "
                     f"{100 * r['digits']:>6.1f}%")
    o = result["overall"]
    lines.append(f"{'all':>6}  {'':>7}  {100 * o['rate']:>8.1f}%  {100 * o['digits']:>6.1f}%  "
                 f"({o['correct']}/{o['n']})")
    return "\n".join(lines)


# ---- CLI --------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minke eval --task passkey", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # ---- model
    p.add_argument("--model", help="checkpoint directory (config.json, weights, tokenizer.json)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="weights and cache dtype (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--extrapolate", action="store_true",
                   help="allow --context beyond max_position_embeddings, RoPE unchanged (an unextended model "
                        "past its context)")
    p.add_argument("--yarn", action="store_true",
                   help="extend the checkpoint to --context with YaRN at load time, without training")
    # ---- the test
    p.add_argument("--context", type=int, help="prompt + answer tokens")
    p.add_argument("--depths", type=float, nargs="+", default=[100 * d for d in DEPTHS],
                   help="where the key sits, in percent of the filler")
    p.add_argument("--trials", type=int, default=10, help="keys per depth")
    p.add_argument("--seed", type=int, default=0, help="seed of the keys and the filler")
    p.add_argument("--batch", type=int, default=16, help="engine batch rows")
    p.add_argument("--out", help="write the JSON result here")
    # ---- training text instead
    p.add_argument("--write-corpus", metavar="FILE.jsonl",
                   help="write passkey training documents (field 'text') instead of evaluating")
    p.add_argument("--docs", type=int, default=20000, help="--write-corpus: documents")
    p.add_argument("--sentences", type=int, nargs=2, default=[4, 40], metavar=("MIN", "MAX"),
                   help="--write-corpus: filler sentences per document (uniform)")
    p.add_argument("--recall", type=float, default=0.0,
                   help="--write-corpus: share of copying documents (keys, then the same keys again)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    a = p.parse_args(argv)
    if a.write_corpus:
        if a.docs < 1:
            p.error(f"--docs must be >= 1, got {a.docs}")
        try:
            docs = corpus(a.docs, *a.sentences, seed=a.seed, recall=a.recall)
        except ValueError as e:
            p.error(str(e))
        out = Path(a.write_corpus)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        print(f"wrote {len(docs)} passkey documents ({a.sentences[0]}-{a.sentences[1]} filler sentences) to {out}")
        return 0
    if not a.model or not a.context:
        p.error("give --model DIR and --context N (or --write-corpus FILE)")
    if a.trials < 1:
        p.error(f"--trials must be >= 1, got {a.trials}")
    if any(not 0 <= d <= 100 for d in a.depths):
        p.error(f"--depths are percentages in [0, 100], got {a.depths}")
    import torch

    import minke
    from minke.config import ConfigError, ModelConfig, extend_context
    from minke.data.tokenizer import Tokenizer

    path = Path(a.model)
    if not (path / "tokenizer.json").exists():
        p.error(f"{path}/tokenizer.json not found (the checkpoint directory needs its tokenizer)")
    cfg = ModelConfig.load(path)
    try:
        if a.yarn:
            cfg = extend_context(cfg, a.context)
        elif a.context > cfg.max_position_embeddings:
            if not a.extrapolate:
                raise ConfigError(f"--context {a.context} exceeds max_position_embeddings "
                                  f"{cfg.max_position_embeddings} of {path}/config.json (pass --yarn or "
                                  f"--extrapolate to test beyond it)")
            cfg = cfg.replace(max_position_embeddings=a.context)
    except ConfigError as e:
        raise SystemExit(f"minke: {e}") from None
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, a.dtype) if a.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    tok = Tokenizer.load(path)
    model = minke.load(path, dtype=dtype, device=device, config=cfg)
    try:
        result = evaluate(model, tok, a.context, [d / 100 for d in a.depths], a.trials, a.seed, a.batch)
    except ValueError as e:
        raise SystemExit(f"minke: {e}") from None
    result["config"].update(model=str(path), extrapolate=a.extrapolate, yarn=a.yarn)
    print(format_table(result))
    if a.out:
        print(f"wrote {save_json(result, a.out)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

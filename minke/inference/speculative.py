"""MTP speculative decoding (DeepSeek-V3 §2.2 and §5.4.3: "use MTP to draft", ~85–90% acceptance of
the second token, 1.8× tokens/s).

Each decode step of a running sequence whose last token t_M (position M) is not yet in the cache:

1. verify — one main-model forward over [t_M, d_1 … d_n] (T = 1 + n, absorbed mode) at positions
   M … M+n gives the target distribution at every position;
2. accept — greedy rows keep the longest prefix of drafts equal to the argmax, then the argmax after
   it (so the output is exactly plain greedy's); sampling rows use speculative rejection sampling
   (Leviathan et al. 2023, Chen et al. 2023): keep d_j with probability min(1, p(d_j)/q(d_j)), on the
   first rejection draw from normalize(max(p − q, 0)), after n acceptances draw a bonus token from p.
   The output is distributed exactly as plain sampling with the same temperature/top-k/top-p (p and
   q both go through those processors); it is reproducible per seed but not token-identical to the
   non-speculative engine, since the random draws differ;
3. MTP — module 1 at positions M … M+n reads the verified hidden states h_i and the embedding of the
   token after each (the a accepted drafts, then the new token; positions past that are padding and
   get rolled back), in the same cache step, so its cache layer holds real entries for every verified
   position; its output at the last accepted position drafts d_1 of the next step;
4. roll back — every row's cache length becomes M + a + 1 (accepted drafts + the token before them):
   the rejected positions' latents stay in the blocks and are overwritten by the next step;
5. chain — for n > 1, module 1 drafts d_2 … d_n from its own output hidden state one position further
   each time (EAGLE-style; V3 ships one MTP module, so deeper drafts reuse it), writing only its own
   cache layer at speculative positions, which are rolled back again.

Prefill does steps 3 and 5 over the prompt. A sequence therefore always has its n drafts ready and all
rows verify the same T = 1 + n tokens, so the verify is one batched forward.

Shape legend: B rows, T = 1 + n tokens verified, n drafts, V vocab, D hidden.
"""

from __future__ import annotations

import torch

from . import sampling


def propose(rows, logits: torch.Tensor) -> None:
    """Draft one token per row from the MTP logits (B, V): argmax for greedy rows, otherwise drawn
    from the processed draft distribution q with the row's generator (q kept for the acceptance test)."""
    toks = logits.argmax(-1).tolist()
    samp = [i for i, r in enumerate(rows) if not r.params.greedy]
    if samp:
        q = sampling.probabilities(logits[samp], [rows[i].params for i in samp])
        for j, i in enumerate(samp):
            toks[i] = int(torch.multinomial(q[j], 1, generator=rows[i].gen))
            rows[i].draft_q.append(q[j])
    for r, t in zip(rows, toks):
        r.drafts.append(t)


def prefill_drafts(engine, rows, hidden: torch.Tensor, toks: list[int], lens: list[int],
                   draft: list[int] | None = None, starts: list[int] | None = None) -> torch.Tensor:
    """After a prefill forward (its cache view still open; rows right-padded to T): module 1 over each
    row's tokens [start, start + len) (default start 0: the whole sequence; a row past a cached prefix
    starts later, the module's cache layer holding the prefix), every position reading the next token
    (the just-chosen one last). The rows
    ``draft`` (default all) draft d_1; returns the module's hidden at their last positions (b, 1, D)
    for ``chain``. The other rows (a shared prompt: engine._Group) only fill the MTP cache layer; their
    last position, which reads a child's first token, is each child's own (``fork_drafts``)."""
    B, T = hidden.shape[:2]
    starts = [0] * B if starts is None else starts
    nxt = [r.tokens[s + 1:s + n] + [t] for r, t, s, n in zip(rows, toks, starts, lens)]
    next_ids = torch.tensor([x + [0] * (T - len(x)) for x in nxt], device=hidden.device)  # (B, T)
    h = engine.model.norm(hidden)  # module 1 reads the main model's state after the final norm
    _, g = engine.model.mtp_step(0, h, next_ids, engine.cache.positions(T), engine.cache, logits=False)
    draft = list(range(B)) if draft is None else draft
    rows = [rows[b] for b in draft]
    g = g[torch.tensor(draft, device=g.device, dtype=torch.long),
          torch.tensor([lens[b] - 1 for b in draft], device=g.device, dtype=torch.long)][:, None]  # (b, 1, D)
    if not rows:
        return g
    logits = engine.model.mtp_head(0, g[:, 0])  # (b, V)
    for b, r in enumerate(rows):
        r.drafts, r.draft_q = [], []
        r.draft_logits = logits[b]
    propose(rows, logits)
    return g


def fork_drafts(engine, kids, hidden: torch.Tensor, toks: list[int]) -> torch.Tensor:
    """Children forked from a shared prompt of P tokens (cache length P - 1, room reserved): module 1 at
    position P - 1, reading the prompt's last hidden state (D,) and each child's first token ``toks``,
    writes each child's own MTP entry there, as ``prefill_drafts`` would have in the child's own
    prefill. Drafts d_1; returns the module's hidden (k, 1, D) for ``chain``."""
    cache, k = engine.cache, len(kids)
    cache.begin([c.id for c in kids], 1)
    h = engine.model.norm(hidden).expand(k, 1, -1)  # as prefill_drafts: after the final norm
    ids = torch.tensor([[t] for t in toks], device=hidden.device)  # (k, 1)
    # MHA mode, as in the prefill that would have computed this position
    _, g = engine.model.mtp_step(0, h, ids, cache.positions(1), cache, absorb=False, logits=False)
    cache.advance(1)
    logits = engine.model.mtp_head(0, g[:, 0])  # (k, V)
    for b, c in enumerate(kids):
        c.drafts, c.draft_q = [], []
        c.draft_logits = logits[b]
    propose(kids, logits)
    return g


def chain(engine, rows, g: torch.Tensor) -> None:
    """Draft d_2 … d_n for rows whose d_1 is drafted and whose cache is committed: module 1 at one
    position further each time, its hidden (B, 1, D) standing in for the main model's; rolled back."""
    n = engine.num_draft
    if n == 1 or not rows:
        return
    cache, ids = engine.cache, [r.id for r in rows]
    for _ in range(n - 1):
        cache.begin(ids, 1)
        prev = torch.tensor([[r.drafts[-1]] for r in rows], device=g.device)
        _, g = engine.model.mtp_step(0, g, prev, cache.positions(1), cache, logits=False)
        cache.advance(1)
        propose(rows, engine.model.mtp_head(0, g[:, 0]))
    for s in ids:
        cache.truncate(s, cache.lengths[s] - (n - 1))


def accept_sampled(logits: torch.Tensor, drafts: list[int], q: list, params, gen) -> tuple[list[int], int]:
    """Speculative rejection sampling for one row: logits (n+1, V) of the verify, drafts (n,), q the
    draft distributions → (tokens to emit, drafts accepted)."""
    p = sampling.probabilities(logits, [params] * logits.shape[0])  # (n+1, V)
    out = []
    for j, d in enumerate(drafts):
        u = float(torch.rand((), generator=gen, device=p.device))
        if u * float(q[j][d]) <= float(p[j, d]):  # accept with probability min(1, p/q)
            out.append(d)
            continue
        resid = (p[j] - q[j]).clamp_min(0)
        resid = resid if float(resid.sum()) > 0 else p[j]
        out.append(int(torch.multinomial(resid, 1, generator=gen)))
        return out, j
    out.append(int(torch.multinomial(p[-1], 1, generator=gen)))
    return out, len(drafts)


def decode_step(engine, events, rows=None) -> None:
    """One speculative decode step for ``rows`` (default: every running sequence; see the module docstring)."""
    rows = engine._make_room(events) if rows is None else rows
    if not rows:
        return
    model, cache, n = engine.model, engine.cache, engine.num_draft
    B, T = len(rows), 1 + n
    ids = torch.tensor([[r.out[-1]] + r.drafts for r in rows], device=engine.device)  # (B, T)
    cache.begin([r.id for r in rows], T)
    pos = cache.positions(T)
    out = model(ids, positions=pos, cache=cache)  # logits (B, T, V), hidden (B, T, D)
    engine.stats.decode_forwards += 1

    # accept
    emitted, accepted = [], []
    preds = out.logits.argmax(-1).tolist()  # (B, T)
    for b, r in enumerate(rows):
        if r.params.greedy:
            a = 0
            while a < n and preds[b][a] == r.drafts[a]:
                a += 1
            toks = preds[b][:a + 1]
        else:
            toks, a = accept_sampled(out.logits[b], r.drafts, r.draft_q, r.params, r.gen)
        emitted.append(toks)
        accepted.append(a)
    engine.stats.draft_proposed += n * B
    engine.stats.draft_accepted += sum(accepted)

    # MTP over the verified positions, same cache step; then roll every row back to M + a + 1
    next_ids = torch.tensor([t + t[-1:] * (T - len(t)) for t in emitted], device=engine.device)  # (B, T)
    _, g = model.mtp_step(0, model.norm(out.hidden), next_ids, pos, cache, logits=False)  # (B, T, D)
    g = g[torch.arange(B, device=g.device), torch.tensor(accepted, device=g.device)][:, None]  # (B, 1, D)
    lengths = [cache.lengths[r.id] + a + 1 for r, a in zip(rows, accepted)]
    cache.advance(T)
    for r, n_len in zip(rows, lengths):
        cache.truncate(r.id, n_len)
    d_logits = model.mtp_head(0, g[:, 0])  # (B, V)
    for b, r in enumerate(rows):
        r.drafts, r.draft_q = [], []
        r.draft_logits = d_logits[b]
    propose(rows, d_logits)

    # emit, stopping each row at its first stop
    for b, (r, toks) in enumerate(zip(rows, emitted)):
        lps, tops = [None] * len(toks), [None] * len(toks)
        if r.params.logprobs:
            lps, best = sampling.logprobs(out.logits[b, :len(toks)], toks, r.params.top_logprobs)
            tops = best or tops
        for t, lp, top in zip(toks, lps, tops):
            if engine._append(r, t, lp, top, events):
                break
    live = [b for b, r in enumerate(rows) if r.finish_reason is None]
    chain(engine, [rows[b] for b in live], g[live])

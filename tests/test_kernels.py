"""Attention kernels (minke/kernels/attention.py) against their plain references."""

import pytest
import torch

import minke.kernels.attention as att


@pytest.mark.parametrize("masked", [False, True])
def test_math_attention_matches_fused(masked):
    """The explicit attention (CPU under torch.compile, short sequences), whole and in causal query
    blocks of 3 (the last one short), against torch's fused SDPA with the zero-padded v: output and the
    gradients of q, k, v; causal, and a bool mask with T < S."""
    g = torch.Generator().manual_seed(0)
    B, H, T, S, N, V = 2, 3, 5 if masked else 7, 7, 12, 8
    q, k, v = (torch.randn(B, H, t, d, generator=g, requires_grad=True) for t, d in ((T, N), (S, N), (S, V)))
    mask = torch.rand(B, 1, T, S, generator=g) < 0.7 if masked else None
    if masked:
        mask[..., 0] = True  # every query sees a key
    go = torch.randn(B, H, T, V, generator=g)
    results = []
    for block in (None, None, 3):  # first: the fused kernel
        o = att.math_attention(q, k, v, mask, 0.3, block) if results else att.fused_attention(q, k, v, mask, 0.3)
        results.append([o.detach(), *torch.autograd.grad(o, (q, k, v), go)])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert a.shape == b.shape and (a - b).abs().max().item() <= 1e-5


def test_causal_blocks_with_fewer_queries_than_keys():
    """Causal with T < S (the queries are the last T keys, as in a chunked prefill): blocks of 2 and 3
    against the whole (T, S) scores; SDPA's is_causal aligns the other way, so it is no reference here."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 3, 5, 8, generator=g, requires_grad=True)
    k = torch.randn(2, 3, 9, 8, generator=g, requires_grad=True)
    v = torch.randn(2, 3, 9, 6, generator=g, requires_grad=True)
    go = torch.randn(2, 3, 5, 6, generator=g)
    results = []
    for block in (None, 2, 3):
        o = att.math_attention(q, k, v, None, 0.3, block)
        results.append([o.detach(), *torch.autograd.grad(o, (q, k, v), go)])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert (a - b).abs().max().item() <= 1e-6


def _latents(B, H, T, S, C=12, R=4, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g).to(dtype) for shape in ((B, H, T, C), (B, H, T, R), (B, S, C), (B, S, R))]


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("T", [1, 3])
def test_absorbed_attention_matches_reference(T, B):
    """Absorbed (latent-space) attention against the einsum formula: causal with T < S (decode, a
    speculative verify), a bool mask of ragged rows (a batch with padding), and bf16 inputs."""
    H, S = 4, 9
    q_lat, q_pe, c_kv, k_pe = _latents(B, H, T, S)
    lens = torch.tensor([S, 5, 7][:B])  # row b sees keys < lens[b] - T + t + 1
    pos = lens[:, None] - T + torch.arange(T)  # (B, T)
    ragged = (torch.arange(S)[None, None, :] <= pos[:, :, None])[:, None]  # (B, 1, T, S)
    for mask in (None, ragged):
        ours = att.absorbed_attention(q_lat, q_pe, c_kv, k_pe, mask, 0.3)
        ref = att.absorbed_attention_reference(q_lat, q_pe, c_kv, k_pe, mask, 0.3)
        assert ours.shape == (B, H, T, c_kv.shape[-1]) and (ours - ref).abs().max().item() <= 1e-5
    bf = [t.bfloat16() for t in (q_lat, q_pe, c_kv, k_pe)]
    ours = att.absorbed_attention(*bf, ragged, 0.3)
    ref = att.absorbed_attention_reference(*bf, ragged, 0.3)
    assert ours.dtype == torch.bfloat16 and (ours.float() - ref).abs().max().item() <= 2e-2 * ref.abs().max().item()


def test_absorbed_attention_equals_mha_over_decompressed_keys():
    """Independent of both formulas above: decompress c_kv with random per-head key/value weights
    (k = c_kv·W_ukᵀ, v = c_kv·W_uvᵀ), run plain attention per head, and compare with the absorbed path
    (q_lat = q_nope·W_uk, out = o_lat·W_uvᵀ): the identity absorbed decode rests on."""
    g = torch.Generator().manual_seed(3)
    B, H, T, S, N, C, R, V = 2, 3, 2, 6, 5, 7, 4, 6
    q_nope, q_pe = torch.randn(B, H, T, N, generator=g), torch.randn(B, H, T, R, generator=g)
    c_kv, k_pe = torch.randn(B, S, C, generator=g), torch.randn(B, S, R, generator=g)
    w_uk, w_uv = torch.randn(H, N, C, generator=g), torch.randn(H, V, C, generator=g)
    k = torch.cat([torch.einsum("bsc,hnc->bhsn", c_kv, w_uk), k_pe[:, None].expand(B, H, S, R)], dim=-1)
    v = torch.einsum("bsc,hvc->bhsv", c_kv, w_uv)
    mha = att.math_attention(torch.cat([q_nope, q_pe], dim=-1), k, v, None, 0.4)  # (B, H, T, V)
    o_lat = att.absorbed_attention(torch.einsum("bhtn,hnc->bhtc", q_nope, w_uk), q_pe, c_kv, k_pe, None, 0.4)
    assert (torch.einsum("bhtc,hvc->bhtv", o_lat, w_uv) - mha).abs().max().item() <= 1e-4


@pytest.mark.parametrize("B", [1, 2])
def test_half_precision_keys_in_parts_match_reference(monkeypatch, B):
    """bf16 on CPU runs the keys as a KEY_BUCKET-multiple prefix and a zero-padded tail of KEY_BUCKET keys
    (oneDNN builds a kernel per shape); batch 1 runs 2-D GEMMs. Against the fp32 einsum formula with no
    tail, no prefix, both, and a ragged mask. Fails when the tail's padding is not dropped from the scores
    or the tail's share of the output is lost."""
    monkeypatch.setattr(att, "KEY_BUCKET", 8)
    assert att.buckets_keys(torch.bfloat16, "cpu") and not att.buckets_keys(torch.float32, "cpu")
    for S in (5, 16, 30):
        q_lat, q_pe, c_kv, k_pe = _latents(B, 3, 1, S, dtype=torch.bfloat16, seed=S)
        mask = (torch.arange(S)[None, None, None, :] < torch.tensor([S, S - 3][:B])[:, None, None, None])
        ours = att.absorbed_attention(q_lat, q_pe, c_kv, k_pe, mask, 0.3)
        ref = att.absorbed_attention_reference(q_lat, q_pe, c_kv, k_pe, mask, 0.3)
        assert ours.shape == ref.shape and (ours.float() - ref).abs().max().item() <= 2e-2 * ref.abs().max().item()

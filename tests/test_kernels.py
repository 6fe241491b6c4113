"""Attention kernels (minke/kernels/attention.py) against their plain references."""

import os
import shutil

import pytest
import torch

import minke.kernels.attention as att
from conftest import KernelSpy


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
    for row_by_row in (1 << 62, 0):  # a batch as one GEMM, and row by row (large caches)
        monkeypatch.setattr(att, "ROW_BY_ROW_MIN_ELEMENTS", row_by_row)
        for S in (5, 16, 30):
            q_lat, q_pe, c_kv, k_pe = _latents(B, 3, 1, S, dtype=torch.bfloat16, seed=S)
            mask = (torch.arange(S)[None, None, None, :] < torch.tensor([S, S - 3][:B])[:, None, None, None])
            for m in (mask, None):
                ours = att.absorbed_attention(q_lat, q_pe, c_kv, k_pe, m, 0.3)
                ref = att.absorbed_attention_reference(q_lat, q_pe, c_kv, k_pe, m, 0.3)
                assert ours.shape == ref.shape and (ours.float() - ref).abs().max().item() <= 2e-2 * ref.abs().max().item()


# ---- kernels/decode.cpp (one fp32 query token on the CPU) ----------------------------------------
import minke.kernels.cpp as kcpp  # noqa: E402

needs_cpp = pytest.mark.skipif(kcpp.cpp_kernels() is None, reason="the C++ decode kernels could not be built here")


@needs_cpp
@pytest.mark.parametrize("S", [1, 31, 32, 33, 100])
@pytest.mark.parametrize("H", [1, 3, 12])
@pytest.mark.parametrize("C, scale, tol", [(64, 0.2, 1e-5), (80, 2.0, 1e-4)])
def test_latent_attention_matches_reference(S, H, C, scale, tol):
    """decode.cpp's single-pass absorbed attention against the einsum formula: token counts on both
    sides of its 32-token blocks, head counts on both sides of its 4-query groups, latents that are
    views of one [c_kv | k_pe] row (their row stride is not their width), and scores that grow along
    the cache, so the online softmax rescales its running outputs at every block; a latent width with
    a 16-float tail past its 64-float chunks, and a scale at which scores span hundreds (exponentials
    below the kernel's e^-87 floor), against float64 (fp32 scores of that size carry ~1e-5 rounding)."""
    g = torch.Generator().manual_seed(S * 10 + H)
    R = 16
    rows = torch.randn(S, C + R + 8, generator=g)
    rows[:, :C] += torch.linspace(0, 6, S)[:, None]  # later tokens score higher for the positive queries
    c_kv, k_pe = rows[:, :C], rows[:, C:C + R]
    q_lat = torch.randn(H, C, generator=g).abs()
    q_pe = torch.randn(H, R, generator=g)
    d = [t.double() for t in (q_lat, q_pe, c_kv, k_pe)]  # float64 reference: large scores amplify fp32 rounding
    ref = ((d[0] @ d[2].T + d[1] @ d[3].T) * scale).softmax(-1) @ d[2]
    out = kcpp.cpp_kernels().latent_attention(q_lat, q_pe, c_kv, k_pe, scale)
    assert out.shape == (H, C)
    assert (out.double() - ref).abs().max().item() <= tol * ref.abs().max().item()


@needs_cpp
def test_absorbed_attention_takes_the_kernel_only_where_it_applies(monkeypatch):
    """absorbed_attention with the kernel built equals the torch path for one fp32 token seeing every
    key (mask None or all True), and a mask that hides keys keeps the torch path (the kernel sees every
    key), as do more heads than LATENT_KERNEL_MAX_HEADS: all equal the reference. The weight folds
    equal their bmm."""
    q_lat, q_pe, c_kv, k_pe = _latents(1, 12, 1, 70, C=64, R=16, seed=3)
    calls = []
    built = kcpp.cpp_kernels()

    class Spy:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(built, name)
    monkeypatch.setattr(kcpp, "_built", Spy())
    ref = att.absorbed_attention_reference(q_lat, q_pe, c_kv, k_pe, None, 0.3)
    for mask in (None, torch.ones(1, 1, 1, 70, dtype=torch.bool)):
        out = att.absorbed_attention(q_lat, q_pe, c_kv, k_pe, mask, 0.3)
        assert (out - ref).abs().max().item() <= 1e-5
    assert calls == ["latent_attention", "latent_attention"]
    hide = torch.ones(1, 1, 1, 70, dtype=torch.bool)
    hide[..., 10:20] = False
    out = att.absorbed_attention(q_lat, q_pe, c_kv, k_pe, hide, 0.3)
    assert (out - att.absorbed_attention_reference(q_lat, q_pe, c_kv, k_pe, hide, 0.3)).abs().max().item() <= 1e-5
    assert calls == ["latent_attention", "latent_attention"]  # not taken for the hiding mask
    many = _latents(1, att.LATENT_KERNEL_MAX_HEADS + 1, 1, 70, C=64, R=16, seed=5)
    out = att.absorbed_attention(*many, None, 0.3)
    assert (out - att.absorbed_attention_reference(*many, None, 0.3)).abs().max().item() <= 1e-5
    assert calls == ["latent_attention", "latent_attention"]  # nor for more heads than it pays for

    g = torch.Generator().manual_seed(4)
    H, N, V, C = 12, 24, 20, 64
    w = torch.randn(H, N + V, C, generator=g)  # kv_b_proj's weight by head
    q_nope = torch.randn(1, 1, H, N + 8, generator=g)[..., :N]  # a view, as MLA's split of q gives
    o_lat = torch.randn(1, H, 1, C, generator=g)
    q_ref = (q_nope.permute(2, 0, 1, 3).reshape(H, 1, N) @ w[:, :N]).view(H, 1, 1, C).transpose(0, 1)
    o_ref = (o_lat.transpose(0, 1).reshape(H, 1, C) @ w[:, N:].transpose(1, 2)).view(H, 1, 1, V).permute(1, 2, 0, 3)
    assert (att.absorb_query(q_nope, w[:, :N], w) - q_ref).abs().max().item() <= 1e-5
    assert (att.absorb_value(o_lat, w[:, N:].transpose(1, 2), w) - o_ref).abs().max().item() <= 1e-5
    assert calls[2:] == ["absorb_query", "absorb_value"]


@pytest.mark.parametrize("B, T", [(1, 1), (2, 1), (1, 3)])
def test_bf16_weight_folds_match_float64(monkeypatch, B, T):
    """kv_b_proj's two folds in bf16 as mla.py runs them (the key half kept as the transpose of an
    (H, C, N) copy): one token through decode.cpp's dot-product kernel (absorb_value's, for both folds;
    where AVX512-BF16 is), several through bmm in the (H, C, N) @ (H, N, B·T) form; each against
    float64 within bf16's rounding of the result (2^-8 relative, here of the largest entry) and equal to
    bmm's own bf16 result within that. Reduced widths of one 32-wide chunk (N) and of three (C). Under
    autograd neither fold asks for the kernel."""
    built = kcpp.cpp_kernels()
    spy = KernelSpy(built) if built is not None else None
    if spy is not None:
        monkeypatch.setattr(kcpp, "_built", spy)
    kernel = built is not None and built.has_bf16_dot()
    g = torch.Generator().manual_seed(B * 10 + T)
    H, N, V, C = 5, 32, 20, 96
    w = torch.randn(H, N + V, C, generator=g).bfloat16()
    w_uk, w_uv_t = w[:, :N].mT.contiguous().mT, w[:, N:].transpose(1, 2).contiguous()
    q_nope = torch.randn(B, T, H, N + 8, generator=g).bfloat16()[..., :N]  # a view, as MLA's split gives
    o_lat = torch.randn(B, H, T, C, generator=g).bfloat16()
    q_ref = torch.einsum("bthn,hnc->bhtc", q_nope.double(), w[:, :N].double())
    o_ref = torch.einsum("bhtc,hvc->bthv", o_lat.double(), w[:, N:].double())
    with torch.no_grad():
        q_lat, o = att.absorb_query(q_nope, w_uk, w), att.absorb_value(o_lat, w_uv_t, w)
    assert q_lat.shape == q_ref.shape and o.shape == o_ref.shape and q_lat.dtype == o.dtype == torch.bfloat16
    for ours, ref in ((q_lat, q_ref), (o, o_ref)):
        assert (ours.double() - ref).abs().max().item() <= 2 ** -8 * ref.abs().max().item()
    if spy is not None:
        assert spy.calls.count("absorb_value") == (2 if B * T == 1 and kernel else 0)
    bmm_q = (q_nope.permute(2, 0, 1, 3).reshape(H, B * T, N) @ w[:, :N].contiguous()).view(H, B, T, C).transpose(0, 1)
    assert (q_lat.double() - bmm_q.double()).abs().max().item() <= 2 ** -8 * q_ref.abs().max().item()
    if B * T == 1 and spy is not None:  # autograd: torch's bmm, the kernel not asked
        spy.calls.clear()
        wg = w.clone().requires_grad_()
        att.absorb_value(o_lat, wg[:, N:].transpose(1, 2), wg).float().sum().backward()
        att.absorb_query(q_nope, wg[:, :N].mT.contiguous().mT, wg).float().sum().backward()
        assert wg.grad is not None and "absorb_value" not in spy.calls and "absorb_query" not in spy.calls


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_select_rows_equals_index_select(dtype, monkeypatch):
    """decode.cpp's prefetching row gather against index_select: rows of a view whose row stride is not
    its width (an [c_kv | k_pe] pool's columns), repeated and unsorted indices, fewer rows than its
    prefetch distance, into a given buffer, contiguous or a column slice of a wider one (also torch's
    path, without the kernels); an index out of range names itself; under autograd torch's
    index_select runs and gradients flow."""
    g = torch.Generator().manual_seed(0)
    pool = torch.randn(300, 72, generator=g).to(dtype)
    x = pool[:, 8:40]  # (300, 32), row stride 72
    for M in (3, 200):
        idx = torch.randint(0, 300, (M,), generator=g)
        idx[0] = idx[-1]  # a repeat
        assert torch.equal(att.select_rows(x, idx), x.index_select(0, idx))
        out = torch.empty(M, 32, dtype=dtype)
        assert att.select_rows(x, idx, out) is out and torch.equal(out, x.index_select(0, idx))
        wide = torch.zeros(M, 40, dtype=dtype)  # into columns 4:36 of a wider buffer (DSA's [c_kv ‖ k_pe] rows)
        att.select_rows(x, idx, wide[:, 4:36])
        assert torch.equal(wide[:, 4:36], x.index_select(0, idx)) and not wide[:, :4].any() and not wide[:, 36:].any()
    with pytest.raises(RuntimeError, match="index 300 out of range for 300 rows"):
        att.select_rows(x, torch.tensor([5, 300]))
    with monkeypatch.context() as m:
        m.setattr(att, "cpp_kernels", lambda: None)
        wide = torch.zeros(3, 40, dtype=dtype)
        att.select_rows(x, torch.tensor([2, 0, 2]), wide[:, 4:36])
        assert torch.equal(wide[:, 4:36], x[[2, 0, 2]]) and not wide[:, :4].any()
    xg = x.float().requires_grad_()
    att.select_rows(xg, torch.tensor([1, 1, 7])).sum().backward()
    assert xg.grad[1].eq(2).all() and xg.grad[7].eq(1).all() and xg.grad.sum().item() == 3 * 32


def test_build_lock_left_behind_is_removed(tmp_path, monkeypatch):
    """torch's loader waits forever while its build lock exists; one left by a killed process is
    removed before loading (under minke's flock, which a dead process no longer holds); a compiler
    without OpenMP gets the one-thread build, and a failed build falls back to None with a warning."""
    import os

    from torch.utils import cpp_extension
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(kcpp, "_built", None)
    seen = []

    def fake_load(name, sources, build_directory, **kw):
        seen.append(os.path.exists(os.path.join(build_directory, "lock")))
        return "built"
    monkeypatch.setattr(cpp_extension, "load", fake_load)
    build_dir = cpp_extension._get_build_directory(f"minke_decode_{kcpp.machine_tag()}", False)
    open(os.path.join(build_dir, "lock"), "w").close()  # what a process killed mid-build leaves
    assert kcpp.cpp_kernels() == "built" and seen == [False]

    tried = []

    def load_without_openmp(name, sources, build_directory, extra_cflags, **kw):
        tried.append("-fopenmp" in extra_cflags)
        if "-fopenmp" in extra_cflags:
            raise RuntimeError("no OpenMP here")
        return "one thread"
    monkeypatch.setattr(cpp_extension, "load", load_without_openmp)
    for _ in range(2):  # an OpenMP build that fails is tried once on this machine, then the one-thread build
        monkeypatch.setattr(kcpp, "_built", None)
        assert kcpp.cpp_kernels() == "one thread"
    assert tried == [True, False, False]

    def failing_load(**kw):
        raise RuntimeError("no compiler here")
    monkeypatch.setattr(kcpp, "_built", None)
    monkeypatch.setattr(cpp_extension, "load", failing_load)
    assert kcpp.cpp_kernels() is None

    # a source that fails both ways (a compile error, not OpenMP) marks nothing: once fixed, OpenMP again
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "fresh"))
    monkeypatch.setattr(kcpp, "_built", None)
    assert kcpp.cpp_kernels() is None
    tried.clear()
    monkeypatch.setattr(kcpp, "_built", None)
    monkeypatch.setattr(cpp_extension, "load", lambda extra_cflags, **kw: tried.append("-fopenmp" in extra_cflags)
                        or "with OpenMP")
    assert kcpp.cpp_kernels() == "with OpenMP" and tried == [True]


@pytest.mark.skipif(shutil.which("c++") is None or os.environ.get("MINKE_CPP_KERNELS") == "0",
                    reason="no C++ compiler, or the kernels turned off")
def test_kernels_build_where_there_is_a_compiler():
    """Every instruction set gets a build (AVX2 without AVX-512 once failed on an inline-asm constraint
    that asks for one 16-float register, and every kernel silently fell back to torch)."""
    assert kcpp.cpp_kernels() is not None

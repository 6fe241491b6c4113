"""MTP in the layout the ecosystem runs DeepSeek's MTP weights in (transformers' MtpModel, vLLM
deepseek_mtp, SGLang deepseek_nextn): depth 1 reads the main model's hidden state after the final norm
at position i with the embedding of token i+1; depth k > 1 reads depth k-1's output after its
shared_head.norm. Checked against transformers' MtpModel on a checkpoint minke wrote, in training
(forward with mtp=True) and in drafting (the engine's speculative path).

The norms get random weights: with unit weights RMSNorm is scale invariant, hnorm(norm(h)) equals
hnorm(h), and the two layouts could not be told apart."""

import warnings

import pytest
import torch

import minke
from minke.inference.engine import Engine
from minke.inference.sampling import SamplingParams

TOL = 1e-4
pytestmark = pytest.mark.usefixtures("one_thread")


@torch.no_grad()
def randomized(cfg, seed=0):
    model = minke.build(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    for _, p in model.named_parameters():
        if p.dim() == 1:  # norms: far from 1, so the final norm and shared_head.norm matter
            p.copy_(torch.rand(p.shape, generator=g) + 0.5)
        else:
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    for m in model.moe_layers():  # positive, so transformers' 0.0 group mask equals minke's -inf
        m.gate.e_score_correction_bias.copy_(torch.rand(m.gate.e_score_correction_bias.shape, generator=g) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A minke model with two MTP modules, saved by minke.save, loaded by transformers + MtpModel."""
    from transformers import DeepseekV3ForCausalLM
    from transformers.modeling_layers import MtpModel

    model = randomized(minke.preset("tiny", num_nextn_predict_layers=2))
    d = tmp_path_factory.mktemp("mtp_ckpt")
    minke.save(model, d)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the main model reports the MTP layers as unexpected
        hf = DeepseekV3ForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    L = model.config.num_hidden_layers
    # transformers finds MTP keys through this list, which for V3 names layer 61 only (the 671B layout)
    hf._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{L + k}\..*" for k in range(2)]
    mtp = MtpModel.from_pretrained(hf).eval()
    return model, hf, mtp


def hf_mtp_logits(hf, mtp, x: torch.Tensor) -> list[torch.Tensor]:
    """transformers' MTP chain over x (B, T): depth k at positions 0..T-k-1 → logits (B, T-k, V)."""
    B, T = x.shape
    h = hf.model(x).last_hidden_state  # after the final norm
    out = []
    for k in range(1, len(mtp.layers) + 1):
        # MtpModel gives the shifted token i+k its own position (i+k); equivalent under RoPE
        pos = torch.arange(k, T).expand(B, T - k)
        h = mtp.forward_layer(k - 1, h[:, : T - k], pos, None, input_ids=x[:, k:])
        out.append(mtp.shared_head(h))
    return out


def test_mtp_logits_equal_transformers_mtp_model(pair):
    model, hf, mtp = pair
    x = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(x, mtp=True)
        ref = hf_mtp_logits(hf, mtp, x)
        assert (ours.logits - hf(x).logits).abs().max() <= TOL  # the main model agrees first
    assert len(ours.mtp_logits) == len(ref) == 2
    for k, (a, b) in enumerate(zip(ours.mtp_logits, ref), start=1):
        assert a.shape == b.shape
        diff = (a - b).abs().max().item()
        assert diff <= TOL, f"depth {k}: max |minke - MtpModel| = {diff:.3g}"


def test_speculative_drafts_equal_transformers_mtp_model(pair):
    """Each running sequence's next draft (module 1 over the paged cache, from the verified hidden
    states) equals transformers' depth-1 MTP logits at the sequence's last position."""
    model, hf, mtp = pair
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist() for n in (5, 11)]
    e = Engine(model, max_batch=2, block_size=4, num_blocks=32, speculative=True, num_draft=1)
    for p in prompts:
        e.add_request(p, SamplingParams(max_tokens=6, temperature=0.0, stop_token_ids=[]))
    checked = 0
    while e.has_unfinished():
        e.step()
        for r in e.running:
            with torch.no_grad():
                ref = hf_mtp_logits(hf, mtp, torch.tensor([r.tokens]))[0][0, -1]
            diff = (r.draft_logits - ref).abs().max().item()
            assert diff <= TOL, diff
            checked += 1
    assert checked >= 6

"""Shared test fixtures: tiny transformers configs and checkpoints for parity tests, a one-thread
fixture, and ``assert_frequencies`` for sampling tests.

The habit for every new test: show that it fails on a deliberate break of the code it guards (apply the
break in a private copy, e.g. ``cp -r`` the tree to /tmp and run pytest there with PYTHONPATH pointing at
it, never in the shared checkout), and name that break in the test's docstring and in the commit message
("fails with logits * temperature"). Prefer an independent reference (a hand computation, transformers,
the exact distribution behind a sampler with a stated statistical bound) over minke's own other path.
Waits are bounded and fail saying what was pending; no assertion depends on timing.
"""

import math
import os

# Sleep rather than spin while waiting for work: with spinning OpenMP threads, torch runs ~10x slower as
# soon as anything else (a torchrun worker, a server thread) shares CI's 2 cores. Must precede torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

# Two CPU cores on CI: more threads only add contention between pytest and torch.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def assert_frequencies(counts, p, fail_prob: float = 1e-7):
    """Empirical frequencies of n i.i.d. draws against the exact distribution p (V,), one bound for
    all V bins: by Hoeffding, P(|count_i/n − p_i| ≥ ε) ≤ 2·exp(−2nε²) per bin, so with
    ε = sqrt(ln(2V/fail_prob) / (2n)) a correct sampler fails with probability below ``fail_prob``
    (union bound over the bins). Seeded callers are deterministic; the bound says how unlucky a seed
    would have to be. Returns ε."""
    counts, p = torch.as_tensor(counts, dtype=torch.float64), torch.as_tensor(p, dtype=torch.float64)
    n = float(counts.sum())
    eps = math.sqrt(math.log(2 * len(p) / fail_prob) / (2 * n))
    gap = (counts / n - p).abs()
    assert float(gap.max()) < eps, (f"frequencies {(counts / n).tolist()} vs exact {p.tolist()}: bin "
                                    f"{int(gap.argmax())} off by {float(gap.max()):.4f} ≥ ε = {eps:.4f} (n = {n:.0f})")
    return eps


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls: a second OpenMP thread only adds synchronisation (and stalls on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def hf_v3_config(**over):
    """A V3-style transformers config exercising every MLA/MoE/YaRN branch at toy size."""
    from transformers import DeepseekV3Config

    kw = dict(vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
              num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32,
              kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
              n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3, n_group=4, topk_group=2,
              first_k_dense_replace=1, routed_scaling_factor=2.5, max_position_embeddings=512,
              rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                               "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
                               "mscale": 1.0, "mscale_all_dim": 0.8},
              num_mtp_layers=1)
    kw.update(over)
    return DeepseekV3Config(**kw)


def hf_v2_lite_config(**over):
    from transformers import DeepseekV2Config

    kw = dict(vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
              num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None,
              kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
              n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3, n_group=1, topk_group=1,
              topk_method="greedy", norm_topk_prob=False, first_k_dense_replace=1, routed_scaling_factor=1.0,
              max_position_embeddings=512,
              rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                               "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
                               "mscale": 0.707, "mscale_all_dim": 0.707})
    kw.update(over)
    return DeepseekV2Config(**kw)


@torch.no_grad()
def randomize_hf(model, seed=0):
    """Random weights everywhere, including norms and a positive routing bias (DeepSeek's code masks the
    dropped expert groups with -inf, transformers with 0.0: they agree while biased scores stay positive)."""
    g = torch.Generator().manual_seed(seed)
    for _, p in model.named_parameters():
        if p.dim() == 1:
            p.copy_(torch.rand(p.shape, generator=g) + 0.5)
        else:
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    for m in model.modules():
        b = getattr(m, "e_score_correction_bias", None)
        if isinstance(b, torch.Tensor):
            b.copy_(torch.rand(b.shape, generator=g) * 0.1)
    return model.eval()


@pytest.fixture(scope="session")
def hf_v3_dir(tmp_path_factory):
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(0)
    model = randomize_hf(DeepseekV3ForCausalLM(hf_v3_config()))
    d = tmp_path_factory.mktemp("hf_v3")
    model.save_pretrained(d)
    return d, model


@pytest.fixture(scope="session")
def hf_v2_dir(tmp_path_factory):
    from transformers import DeepseekV2ForCausalLM

    torch.manual_seed(0)
    model = randomize_hf(DeepseekV2ForCausalLM(hf_v2_lite_config()), seed=1)
    d = tmp_path_factory.mktemp("hf_v2")
    model.save_pretrained(d)
    return d, model


class KernelSpy:
    """Stands in for the built C++ extension (monkeypatch it over minke.kernels.cpp._built), recording
    the kernels asked for in ``calls``."""

    def __init__(self, built):
        self.built, self.calls = built, []

    def __getattr__(self, name):
        self.calls.append(name)
        return getattr(self.built, name)

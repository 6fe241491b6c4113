"""The MoE router computes in fp32 with autocast off (V3 §3.3 keeps the gate in higher precision):
under bf16 autocast the scores stay fp32 and the routing equals the fp32 routing, on inputs where a
bf16 router would choose other experts."""

import torch

import minke
from minke.model.moe import Gate


def test_gate_is_fp32_under_autocast():
    cfg = minke.preset("tiny", n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)
    gate = Gate(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        gate.weight.copy_(torch.randn(gate.weight.shape, generator=g) * 0.02)  # init scale
        gate.e_score_correction_bias.copy_(torch.rand(cfg.n_routed_experts, generator=g) * 1e-2)
    x = torch.randn(4096, cfg.hidden_size, generator=g)
    with torch.no_grad():
        w32, idx32, s32 = gate(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            w, idx, s = gate(x)
    # the input is one where precision matters: logits rounded to bf16 rank the experts differently
    k = cfg.num_experts_per_tok
    bias = gate.e_score_correction_bias
    top16 = ((x @ gate.weight.t()).bfloat16().float().sigmoid() + bias).topk(k, -1).indices.sort(-1).values
    assert (top16 != (s32 + bias).topk(k, -1).indices.sort(-1).values).any(dim=-1).sum() > 5
    assert s.dtype == torch.float32 and w.dtype == torch.float32
    assert torch.equal(idx, idx32) and torch.equal(w, w32) and torch.equal(s, s32)


def test_moe_layer_routes_in_fp32_under_autocast():
    """Inside a bf16 model's MoE layer (bf16 weights, bf16 activations) the gate still returns fp32
    scores: the routing bias and the load statistics are computed from them."""
    cfg = minke.preset("tiny")
    model = minke.build(cfg, seed=0, dtype=torch.bfloat16)
    gate = model.layers[1].mlp.gate
    x = torch.randn(64, cfg.hidden_size, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        w, idx, s = gate(x)
    assert s.dtype == torch.float32 and w.dtype == torch.float32
    with torch.no_grad():
        ref = torch.sigmoid(x.float() @ gate.weight.float().t())
    assert torch.equal(s, ref)

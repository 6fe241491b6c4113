"""Checkpoint I/O: sharding, FP8, and a clear error for every kind of bad input."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import minke
from minke.model.weights import CheckpointError, hf_to_minke
from minke.quant.fp8 import dequantize_weight, quantize_weight


@pytest.fixture
def tiny_dir(tmp_path):
    model = minke.build(minke.preset("tiny"), seed=0)
    minke.save(model, tmp_path)
    return tmp_path, model


def _x(cfg):
    return torch.randint(0, cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))


def test_sharded_checkpoint_roundtrip(tmp_path):
    model = minke.build(minke.preset("tiny"), seed=1)
    minke.save(model, tmp_path, max_shard_bytes=200_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and not (tmp_path / "model.safetensors").exists()
    back = minke.load(tmp_path, dtype=torch.float32)
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k


def test_hf_names_of_experts_and_mtp():
    cfg = minke.preset("tiny")
    L = cfg.num_hidden_layers
    assert hf_to_minke("model.layers.1.mlp.experts.7.down_proj.weight", cfg) == ("layers.1.mlp.experts.down_proj", 7, None)
    assert hf_to_minke(f"model.layers.{L}.eh_proj.weight", cfg) == ("mtp.0.eh_proj.weight", None, None)
    assert hf_to_minke(f"model.layers.{L}.shared_head.head.weight", cfg)[2] == "lm_head.weight"


def test_fp8_checkpoint_matches_dequantized_reference(tmp_path):
    cfg = minke.preset("tiny", hidden_size=160, moe_intermediate_size=136)  # partial 128-blocks on both axes
    model = minke.build(cfg, seed=2)
    minke.save(model, tmp_path, fp8=True)
    raw = load_file(tmp_path / "model.safetensors")
    key = "model.layers.1.self_attn.kv_b_proj.weight"
    assert raw[key].dtype == torch.float8_e4m3fn and key + "_scale_inv" in raw
    assert raw["model.layers.1.mlp.experts.3.down_proj.weight"].dtype == torch.float8_e4m3fn
    assert raw["model.embed_tokens.weight"].dtype == torch.float32  # embedding, head, router stay high precision
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["weight_block_size"] == [128, 128]
    loaded = minke.load(tmp_path, dtype=torch.float32)
    # reference: the same model with each quantized weight replaced by its dequantization
    ref = minke.build(cfg, seed=2)
    with torch.no_grad():
        for hf_key, t in raw.items():
            if t.dtype != torch.float8_e4m3fn:
                continue
            name, j, _ = hf_to_minke(hf_key, cfg)
            w = dequantize_weight(t, raw[hf_key + "_scale_inv"])
            dst = ref.state_dict()[name]
            (dst if j is None else dst[j]).copy_(w)
    x = _x(cfg)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, ref(x).logits)
        # and the quantized model still computes nearly the original function
        cos = torch.nn.functional.cosine_similarity(loaded(x).logits.flatten(), model(x).logits.flatten(), dim=0)
    assert cos > 0.95, cos
    assert loaded.config.quantization_config is None


def test_quantize_dequantize_blocks():
    w = torch.randn(300, 200) * torch.logspace(-3, 1, 200)  # columns of very different magnitude
    q, s = quantize_weight(w)
    assert s.shape == (3, 2) and q.dtype == torch.float8_e4m3fn
    back = dequantize_weight(q, s)
    assert ((back - w).abs() <= w.abs().amax() * 2 ** -3).all()
    with pytest.raises(ValueError, match="weight_scale_inv has shape"):
        dequantize_weight(q, s[:2])


def test_missing_key_is_named(tiny_dir):
    d, _ = tiny_dir
    sd = load_file(d / "model.safetensors")
    del sd["model.layers.2.self_attn.kv_b_proj.weight"]
    save_file(sd, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing.*model\.layers\.2\.self_attn\.kv_b_proj\.weight"):
        minke.load(d)


def test_unexpected_key_is_named(tiny_dir):
    d, _ = tiny_dir
    sd = load_file(d / "model.safetensors")
    sd["model.layers.0.self_attn.mystery.weight"] = torch.zeros(2)
    save_file(sd, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected key 'model\.layers\.0\.self_attn\.mystery\.weight'"):
        minke.load(d)


def test_layer_beyond_mtp_is_unexpected(tiny_dir):
    d, _ = tiny_dir
    sd = load_file(d / "model.safetensors")
    sd["model.layers.9.input_layernorm.weight"] = torch.ones(64)
    save_file(sd, d / "model.safetensors")
    with pytest.raises(CheckpointError, match="layer 9 is beyond"):
        minke.load(d)


def test_shape_mismatch_is_named(tiny_dir):
    d, _ = tiny_dir
    sd = load_file(d / "model.safetensors")
    sd["model.norm.weight"] = torch.ones(63)
    save_file(sd, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' has shape \(63,\), expected \(64,\)"):
        minke.load(d)


def test_truncated_safetensors_names_the_file(tiny_dir):
    d, _ = tiny_dir
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        minke.load(d)


def test_corrupt_safetensors_names_the_file(tiny_dir):
    d, _ = tiny_dir
    (d / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        minke.load(d)


def test_missing_shard_named(tmp_path):
    model = minke.build(minke.preset("tiny"), seed=1)
    minke.save(model, tmp_path, max_shard_bytes=200_000)
    victim = sorted(p for p in os.listdir(tmp_path) if p.startswith("model-"))[1]
    os.remove(tmp_path / victim)
    with pytest.raises(CheckpointError, match=victim):
        minke.load(tmp_path)


def test_checkpoint_without_mtp_loads_without_it(tiny_dir):
    d, model = tiny_dir
    sd = load_file(d / "model.safetensors")
    L = model.config.num_hidden_layers
    save_file({k: v for k, v in sd.items() if not k.startswith(f"model.layers.{L}.")}, d / "model.safetensors")
    with pytest.warns(UserWarning, match="no MTP weights"):
        back = minke.load(d, dtype=torch.float32)
    assert len(back.mtp) == 0 and back.config.num_nextn_predict_layers == 0
    x = _x(model.config)
    with torch.no_grad():
        assert torch.equal(back(x).logits, model(x).logits)


def test_partially_missing_mtp_is_an_error(tiny_dir):
    d, model = tiny_dir
    sd = load_file(d / "model.safetensors")
    L = model.config.num_hidden_layers
    del sd[f"model.layers.{L}.eh_proj.weight"]
    save_file(sd, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=f"model.layers.{L}.eh_proj.weight"):
        minke.load(d)


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        minke.load(tmp_path / "nope")


def test_bf16_load(tiny_dir):
    d, model = tiny_dir
    m = minke.load(d, dtype=torch.bfloat16)
    assert m.embed_tokens.weight.dtype == torch.bfloat16
    assert m.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32

"""ModelConfig: HF config.json in and out unchanged, both RoPE styles, clear errors for bad fields."""

import json

import pytest

import minke
from minke.config import ConfigError, ModelConfig

V3_JSON = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280,
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
    "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4,
    "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 3, "norm_topk_prob": True,
    "scoring_func": "sigmoid", "hidden_act": "silu", "max_position_embeddings": 163840, "rms_norm_eps": 1e-06,
    "rope_theta": 10000, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                                          "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                                          "type": "yarn"},
    "num_nextn_predict_layers": 1, "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1,
    "use_cache": True, "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config"},
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "torch_dtype": "bfloat16", "transformers_version": "4.33.1", "aux_loss_alpha": 0.001, "seq_aux": True,
}


def test_v3_config_json_roundtrips_unchanged(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(V3_JSON))
    cfg = ModelConfig.load(tmp_path)
    assert cfg.extra["auto_map"] and cfg.extra["seq_aux"] is True  # unused keys kept
    out = tmp_path / "out"
    out.mkdir()
    cfg.save(out)
    written = json.loads((out / "config.json").read_text())
    for k, v in V3_JSON.items():
        assert written[k] == v, k
    assert cfg.param_counts() == minke.preset("v3-671b").param_counts()


def test_rope_parameters_style_is_accepted_and_kept(tmp_path):
    d = dict(V3_JSON)
    rs = d.pop("rope_scaling")
    d.pop("rope_theta")
    d["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, **{k: v for k, v in rs.items() if k != "type"}}
    cfg = ModelConfig.from_dict(d)
    assert cfg.yarn["factor"] == 40 and cfg.rope_theta == 10000.0
    out = cfg.to_dict()
    assert "rope_scaling" not in out and out["rope_parameters"] == d["rope_parameters"]


def test_kv_cache_bytes():
    kv = minke.preset("v3-671b").kv_cache_bytes_per_token(2)
    assert kv["latent"] == 70272 and 4.9e6 < kv["decompressed"] < 5.1e6


@pytest.mark.parametrize("field,value,match", [
    ("topk_method", "top2", "unknown topk_method 'top2'"),
    ("scoring_func", "relu", "unknown scoring_func 'relu'"),
    ("n_group", 3, "n_routed_experts=256 is not divisible by n_group=3"),
    ("topk_group", 9, "topk_group=9"),
    ("num_experts_per_tok", 300, "num_experts_per_tok=300"),
    ("first_k_dense_replace", 99, "first_k_dense_replace=99"),
    ("hidden_size", 0, "hidden_size must be a positive integer"),
])
def test_contradictory_or_unknown_fields_are_named(tmp_path, field, value, match):
    d = dict(V3_JSON, **{field: value})
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=match) as e:
        ModelConfig.load(tmp_path)
    assert "config.json" in str(e.value)


def test_unreadable_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.load(tmp_path)
    with pytest.raises(ConfigError, match="no config.json"):
        ModelConfig.load(tmp_path / "missing")


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        minke.preset("huge")

"""ModelConfig: one config whose field names are the Hugging Face config.json keys.

DeepSeek-V2 and V3 configs load and save unchanged: keys minke does not use are kept in ``extra`` and
written back; ``rope_scaling`` (DeepSeek's released configs) and ``rope_parameters`` (what
transformers 5 writes) are both accepted, and the style that came in is the style that goes out.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")
SCORING_FUNCS = ("sigmoid", "softmax")


DSA_KEYS = ("index_n_heads", "index_head_dim", "index_topk")


class ConfigError(ValueError):
    """A config.json field is missing, unknown or contradicts another field."""


def _check_v32_layer_types(d: dict) -> None:
    """DeepseekV32Config's mlp_layer_types / layer_types must be what minke derives (dropped from ``d``)."""
    n, k, freq = d.get("num_hidden_layers"), d.get("first_k_dense_replace", 3), d.get("moe_layer_freq", 1)
    mlp, att = d.pop("mlp_layer_types", None), d.pop("layer_types", None)
    if mlp is not None and isinstance(n, int) and isinstance(k, int) and isinstance(freq, int) and freq >= 1:
        want = ["sparse" if i >= k and i % freq == 0 else "dense" for i in range(n)]
        if list(mlp) != want:
            raise ConfigError(f"config: mlp_layer_types {mlp} contradicts first_k_dense_replace={k}, "
                              f"moe_layer_freq={freq} (expected {want})")
    if att is not None and (any(t != "indexed_attention" for t in att) or len(att) != n):
        raise ConfigError(f"config: layer_types must be {n} x 'indexed_attention' (every V3.2 layer is DSA), got {att}")


@dataclass
class ModelConfig:
    model_type: str = "deepseek_v3"
    architectures: list = field(default_factory=lambda: ["DeepseekV3ForCausalLM"])
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int | None = 128
    # Multi-head Latent Attention
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # DeepSeekMoE
    n_routed_experts: int | None = 256
    n_shared_experts: int | None = 1
    num_experts_per_tok: int | None = 8
    n_group: int | None = 8
    topk_group: int | None = 4
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    # Multi-token prediction
    num_nextn_predict_layers: int = 1
    # DeepSeek Sparse Attention (V3.2, model_type deepseek_v32): the lightning indexer; None = dense MLA
    index_n_heads: int | None = None
    index_head_dim: int | None = None
    index_topk: int | None = None
    # Positions, norms, head
    max_position_embeddings: int = 163840
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    initializer_range: float = 0.006
    bos_token_id: int | None = 0
    eos_token_id: int | list | None = 1
    torch_dtype: str | None = None
    quantization_config: dict | None = None
    # Keys of config.json minke does not use, written back unchanged.
    extra: dict = field(default_factory=dict, repr=False)
    # "rope_scaling" or "rope_parameters": the style config.json used, so a round trip is unchanged.
    _rope_style: str = field(default="rope_scaling", repr=False)

    def __post_init__(self):
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, i: int) -> bool:
        """Layer i (MTP layers count from num_hidden_layers on) uses DeepSeekMoE rather than a dense MLP."""
        return bool(self.n_routed_experts) and i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0

    @property
    def dsa(self) -> bool:
        """DeepSeek Sparse Attention: every layer's MLA attends only to its indexer's top-k tokens."""
        return self.index_topk is not None

    @property
    def yarn(self) -> dict | None:
        rs = self.rope_scaling
        if rs and rs.get("type", rs.get("rope_type")) == "yarn":
            return rs
        return None

    # ---- validation ----------------------------------------------------------------------------
    def validate(self) -> None:
        def need(cond, msg):
            if not cond:
                raise ConfigError(f"config: {msg}")

        for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                  "qk_rope_head_dim", "v_head_dim", "max_position_embeddings"):
            v = getattr(self, k)
            need(isinstance(v, int) and v > 0, f"{k} must be a positive integer, got {v!r}")
        need(self.qk_nope_head_dim >= 0, f"qk_nope_head_dim must be >= 0, got {self.qk_nope_head_dim}")
        need(self.qk_rope_head_dim % 2 == 0, f"qk_rope_head_dim must be even for RoPE, got {self.qk_rope_head_dim}")
        need(self.q_lora_rank is None or self.q_lora_rank > 0, f"q_lora_rank must be null or > 0, got {self.q_lora_rank}")
        need(self.hidden_act == "silu", f"hidden_act {self.hidden_act!r} is not supported (DeepSeek uses 'silu')")
        need(0 <= self.first_k_dense_replace <= self.num_hidden_layers,
             f"first_k_dense_replace={self.first_k_dense_replace} must lie in [0, num_hidden_layers={self.num_hidden_layers}]")
        need(self.moe_layer_freq >= 1, f"moe_layer_freq must be >= 1, got {self.moe_layer_freq}")
        need(self.num_nextn_predict_layers >= 0, f"num_nextn_predict_layers must be >= 0, got {self.num_nextn_predict_layers}")
        if self.n_routed_experts:
            need(self.topk_method in TOPK_METHODS,
                 f"unknown topk_method {self.topk_method!r}; expected one of {', '.join(TOPK_METHODS)}")
            need(self.scoring_func in SCORING_FUNCS,
                 f"unknown scoring_func {self.scoring_func!r}; expected one of {', '.join(SCORING_FUNCS)}")
            need(self.moe_intermediate_size and self.moe_intermediate_size > 0, "moe_intermediate_size must be > 0")
            k, E = self.num_experts_per_tok, self.n_routed_experts
            need(k is not None and 1 <= k <= E, f"num_experts_per_tok={k} must lie in [1, n_routed_experts={E}]")
            g, tg = self.n_group or 1, self.topk_group or 1
            need(E % g == 0, f"n_routed_experts={E} is not divisible by n_group={g}")
            need(1 <= tg <= g, f"topk_group={tg} must lie in [1, n_group={g}]")
            need(k <= tg * (E // g), f"num_experts_per_tok={k} exceeds the experts in topk_group={tg} groups "
                                     f"of {E // g} ({tg * (E // g)})")
            if self.topk_method == "noaux_tc":
                need(E // g >= 2, f"noaux_tc scores a group by its top-2 experts: n_routed_experts/n_group="
                                  f"{E // g} must be >= 2")
        if self.intermediate_size is not None:
            need(self.intermediate_size > 0, "intermediate_size must be > 0")
        dsa = {k: getattr(self, k) for k in DSA_KEYS}
        if any(v is not None for v in dsa.values()) or self.model_type == "deepseek_v32":
            for k, v in dsa.items():
                need(isinstance(v, int) and not isinstance(v, bool) and v > 0,
                     f"{k} must be a positive integer (DeepSeek Sparse Attention needs all of "
                     f"{', '.join(DSA_KEYS)}), got {v!r}")
            need(bool(self.q_lora_rank), "index_n_heads/index_head_dim/index_topk: the indexer reads MLA's query "
                                         f"latent, so q_lora_rank must be set, got {self.q_lora_rank!r}")
            need(self.index_head_dim >= self.qk_rope_head_dim,
                 f"index_head_dim={self.index_head_dim} must be >= qk_rope_head_dim={self.qk_rope_head_dim} "
                 f"(RoPE rotates the indexer key's first qk_rope_head_dim dims)")
            need(self.model_type == "deepseek_v32", f"indexer keys (index_topk...) need model_type 'deepseek_v32' "
                                                    f"(transformers' DeepseekV32ForCausalLM), got {self.model_type!r}")
        rs = self.rope_scaling
        if rs is not None:
            t = rs.get("type", rs.get("rope_type"))
            need(t in ("yarn", "default", None), f"rope_scaling type {t!r} is not supported (yarn or default)")
            if t == "yarn":
                need(float(rs.get("factor", 0)) >= 1, f"rope_scaling.factor must be >= 1, got {rs.get('factor')}")
                need("original_max_position_embeddings" in rs, "rope_scaling (yarn) needs original_max_position_embeddings")
                orig = rs["original_max_position_embeddings"]
                need(isinstance(orig, int) and 0 < orig <= self.max_position_embeddings,
                     f"rope_scaling.original_max_position_embeddings={orig!r} must be a positive integer <= "
                     f"max_position_embeddings={self.max_position_embeddings} (the length YaRN extends from)")

    # ---- config.json ---------------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> set[str]:
        """The config.json keys held as fields (any other key goes to ``extra``)."""
        return {f.name for f in dataclasses.fields(cls) if not f.name.startswith("_") and f.name != "extra"}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        names = cls.field_names()
        style = "rope_scaling"
        if "rope_parameters" in d and d.get("rope_parameters") is not None:
            # transformers 5: {"rope_type": "yarn", "rope_theta": ..., "factor": ...}
            style = "rope_parameters"
            rp = dict(d.pop("rope_parameters"))
            d.setdefault("rope_theta", rp.pop("rope_theta", 10000.0))
            if rp.get("rope_type", "default") == "default":
                d["rope_scaling"] = None
            else:
                rp["type"] = rp.pop("rope_type")
                d["rope_scaling"] = rp
        elif "rope_parameters" in d:
            d.pop("rope_parameters")
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = dict(d["rope_scaling"])
        if d.get("model_type") == "deepseek_v32":
            # transformers' DeepseekV32Config: its defaults; no MTP unless config.json says so; the per-layer
            # type lists are derived from first_k_dense_replace/moe_layer_freq here, so they are checked, not kept.
            for k, v in (("index_n_heads", 64), ("index_head_dim", 128), ("index_topk", 2048),
                         ("num_nextn_predict_layers", 0)):
                d.setdefault(k, v)
            _check_v32_layer_types(d)
        if d.get("model_type") == "deepseek_v2":
            # V2 configs (and transformers' DeepseekV2Config) may omit these; V2 means softmax, greedy, no renorm.
            for k, v in (("scoring_func", "softmax"), ("topk_method", "greedy"), ("norm_topk_prob", False),
                         ("routed_scaling_factor", 1.0), ("num_nextn_predict_layers", 0)):
                d.setdefault(k, v)
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        if "num_key_value_heads" not in known:
            known["num_key_value_heads"] = known.get("num_attention_heads", cls.num_attention_heads)
        return cls(**known, extra=extra, _rope_style=style)

    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            if f.name in ("extra", "_rope_style"):
                continue
            out[f.name] = getattr(self, f.name)
        if self.torch_dtype is None:
            out.pop("torch_dtype")
        if self.quantization_config is None:
            out.pop("quantization_config")
        for k in DSA_KEYS:
            if out[k] is None:  # dense MLA: a V3 config.json round-trips without them
                out.pop(k)
        if self._rope_style == "rope_parameters":
            rp = {"rope_theta": out.pop("rope_theta")}
            rs = out.pop("rope_scaling")
            if rs:
                rs = dict(rs)
                rp["rope_type"] = rs.pop("type", rs.pop("rope_type", "default"))
                rp.update(rs)
            else:
                rp["rope_type"] = "default"
            out["rope_parameters"] = rp
        out.update(self.extra)
        if self.model_type == "deepseek_v32":
            n = self.num_hidden_layers
            out["mlp_layer_types"] = ["sparse" if self.is_moe_layer(i) else "dense" for i in range(n)]
            out["layer_types"] = ["indexed_attention"] * n
        return out

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ModelConfig":
        """Read config.json (a file or a directory holding one)."""
        p = os.path.join(path, "config.json") if os.path.isdir(path) else str(path)
        try:
            with open(p) as f:
                d = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{p}: no config.json found") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}: not valid JSON ({e})") from None
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{p}: {e}") from None
        except TypeError as e:
            raise ConfigError(f"{p}: {e}") from None

    def save(self, path: str | os.PathLike) -> None:
        p = os.path.join(path, "config.json") if os.path.isdir(path) else str(path)
        tmp = p + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
        os.replace(tmp, p)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ---- parameter and cache arithmetic --------------------------------------------------------
    def _attn_params(self) -> int:
        H, nh = self.hidden_size, self.num_attention_heads
        if self.q_lora_rank:
            q = H * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * nh * self.qk_head_dim
        else:
            q = H * nh * self.qk_head_dim
        kv = H * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank \
            + self.kv_lora_rank * nh * (self.qk_nope_head_dim + self.v_head_dim)
        idx = 0
        if self.dsa:  # the lightning indexer: wq_b, wk, k_norm (weight and bias), weights_proj
            J, E = self.index_n_heads, self.index_head_dim
            idx = self.q_lora_rank * J * E + H * E + 2 * E + H * J
        return q + kv + nh * self.v_head_dim * H + idx

    def _ffn_params(self, i: int) -> tuple[int, int]:
        """(total, active per token) of layer i's feed-forward part."""
        H = self.hidden_size
        if not self.is_moe_layer(i):
            n = 3 * H * self.intermediate_size
            return n, n
        e = 3 * H * self.moe_intermediate_size
        gate = self.n_routed_experts * H
        shared = (self.n_shared_experts or 0) * e
        return gate + shared + self.n_routed_experts * e, gate + shared + self.num_experts_per_tok * e

    def _block_params(self, i: int) -> tuple[int, int]:
        a = self._attn_params() + 2 * self.hidden_size
        t, act = self._ffn_params(i)
        return a + t, a + act

    def param_counts(self) -> dict:
        """Parameter counts from the config alone (buffers such as the routing bias excluded).

        ``mtp`` counts each MTP module as the checkpoint stores it (its own copies of the embedding
        and output head included, as in DeepSeek's 671B + 14B figure); ``mtp_unique`` leaves those
        copies out, as minke holds them (shared with the main model).
        """
        H, V = self.hidden_size, self.vocab_size
        emb = V * H
        head = 0 if self.tie_word_embeddings else V * H
        total = emb + head + H
        active = emb + head + H
        for i in range(self.num_hidden_layers):
            t, a = self._block_params(i)
            total, active = total + t, active + a
        mtp_unique = 0
        for k in range(self.num_nextn_predict_layers):
            t, _ = self._block_params(self.num_hidden_layers + k)
            mtp_unique += t + 2 * H + 2 * H * H + H  # enorm, hnorm, eh_proj, shared_head.norm
        mtp = mtp_unique + self.num_nextn_predict_layers * (emb + V * H)
        return {"total": total, "active": active, "mtp": mtp, "mtp_unique": mtp_unique,
                "total_with_mtp": total + mtp}

    def kv_cache_bytes_per_token(self, bytes_per_element: int = 2, mtp: bool = False) -> dict:
        """Cache bytes per token over the main layers (and the MTP modules' with ``mtp``): MLA's latent
        cache vs the decompressed K/V cache."""
        L = self.num_hidden_layers + (self.num_nextn_predict_layers if mtp else 0)
        latent = (self.kv_lora_rank + self.qk_rope_head_dim) * L * bytes_per_element
        full = self.num_attention_heads * (self.qk_head_dim + self.v_head_dim) * L * bytes_per_element
        out = {"latent": latent, "decompressed": full, "ratio": full / latent}
        if self.dsa:  # DeepSeek Sparse Attention also caches one indexer key per token and layer
            out["indexer"] = self.index_head_dim * L * bytes_per_element
        return out


def _yarn(factor, original, mscale=1.0, mscale_all_dim=1.0):
    return {"type": "yarn", "factor": factor, "original_max_position_embeddings": original,
            "beta_fast": 32, "beta_slow": 1, "mscale": mscale, "mscale_all_dim": mscale_all_dim}


PRESETS: dict[str, dict[str, Any]] = {
    # CI-sized: every code path (q LoRA, noaux_tc with 2 groups, a dense layer, MoE, MTP) in ~0.3M params.
    "tiny": dict(vocab_size=1024, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                 num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32,
                 kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                 n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
                 first_k_dense_replace=1, routed_scaling_factor=1.0, num_nextn_predict_layers=1,
                 max_position_embeddings=1024, initializer_range=0.02),
    # ~200M total, V3's ratios scaled down: 1 dense + 11 MoE layers, 16 routed experts, 1 shared, 4 active.
    "small": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, moe_intermediate_size=384,
                  num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12, q_lora_rank=384,
                  kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
                  n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
                  first_k_dense_replace=1, routed_scaling_factor=2.5, num_nextn_predict_layers=1,
                  max_position_embeddings=4096),
    "v2-lite": dict(model_type="deepseek_v2", architectures=["DeepseekV2ForCausalLM"], vocab_size=102400,
                    hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
                    num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, q_lora_rank=None,
                    kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                    n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, n_group=1, topk_group=1,
                    topk_method="greedy", scoring_func="softmax", norm_topk_prob=False,
                    routed_scaling_factor=1.0, first_k_dense_replace=1, num_nextn_predict_layers=0,
                    max_position_embeddings=163840, bos_token_id=100000, eos_token_id=100001,
                    rope_scaling=_yarn(40, 4096, 0.707, 0.707)),
    "v3-671b": dict(rope_scaling=_yarn(40, 4096),
                    quantization_config={"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                         "weight_block_size": [128, 128]}),
    # DeepSeek-V3.2-Exp: V3's widths plus a lightning indexer per layer (DeepSeek Sparse Attention).
    "v3.2-671b": dict(model_type="deepseek_v32", architectures=["DeepseekV32ForCausalLM"], index_n_heads=64,
                      index_head_dim=128, index_topk=2048, rope_scaling=_yarn(40, 4096),
                      quantization_config={"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                           "weight_block_size": [128, 128]}),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    unknown = sorted(overrides.keys() - ModelConfig.field_names())
    if unknown:
        raise ConfigError(f"{unknown[0]!r} is not a model config field (preset {name!r})")
    return ModelConfig(**{**PRESETS[name], **overrides})


def extend_context(cfg: ModelConfig, target: int) -> ModelConfig:
    """YaRN context extension (V3 §4.3: 4K → 32K → 128K): ``cfg`` with max_position_embeddings =
    ``target`` and rope_scaling yarn at factor = target / original, where original is the length the
    model was pretrained at (an existing YaRN's original_max_position_embeddings, else
    max_position_embeddings). An existing YaRN keeps its beta/mscale; a new one takes DeepSeek-V3's
    (beta_fast 32, beta_slow 1, mscale 1, mscale_all_dim 1: RoPE magnitude 1, softmax scale × mscale²)."""
    if not isinstance(target, int) or target < 1:
        raise ConfigError(f"extend to {target!r}: the new context must be a positive integer")
    y = cfg.yarn
    orig = y["original_max_position_embeddings"] if y else cfg.max_position_embeddings
    factor = target / orig
    if factor < 1:
        raise ConfigError(f"extend to {target}: rope_scaling.factor = {target} / original_max_position_embeddings "
                          f"{orig} = {factor:.3g} is below 1 (YaRN extends a context, it cannot shrink one)")
    if target < cfg.max_position_embeddings:
        raise ConfigError(f"extend to {target}: below the model's max_position_embeddings "
                          f"{cfg.max_position_embeddings} (nothing to extend)")
    rs = dict(y) if y else _yarn(factor, orig)
    rs["factor"] = float(factor)
    return cfg.replace(max_position_embeddings=target, rope_scaling=rs)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature: 0.1·mscale·ln(scale) + 1 (1 when not extending)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

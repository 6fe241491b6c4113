"""Hugging Face checkpoints in and out: the one HF ↔ minke name table, safetensors I/O, FP8 dequant.

Layout (DeepseekV3ForCausalLM / DeepseekV2ForCausalLM): config.json + model.safetensors, or shards
listed in model.safetensors.index.json. Differences from minke's module names, all handled here:
- ``model.`` prefix on everything but ``lm_head``;
- routed experts are one key per expert (``mlp.experts.{j}.gate_proj.weight``), minke stacks them;
- MTP module k sits at ``model.layers.{num_hidden_layers + k}`` and stores copies of the shared
  embedding (``embed_tokens``) and head (``shared_head.head``), which minke holds once;
- FP8 checkpoints add ``<name>.weight_scale_inv`` beside each E4M3 weight.
An unmapped or missing key is an error naming it, never a silent skip; the MTP layers are skipped
only when asked (``load(..., drop_mtp=True)``).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections import defaultdict

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import ModelConfig
from ..quant.fp8 import BLOCK, dequantize_weight, quantize_weight
from ..quant.modules import holds_fp8, to_fp8_inference
from .transformer import Transformer

_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
# Old checkpoints carry RoPE tables; minke computes them from the config.
_IGNORED = re.compile(r"\.rotary_emb\.inv_freq$")
SHARED = "shared"  # an MTP copy of the main embedding/head
FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}


class CheckpointError(ValueError):
    """A checkpoint file or key is missing, unexpected, malformed or of the wrong shape."""


# ---- the name table -----------------------------------------------------------------------------
def hf_to_minke(key: str, cfg: ModelConfig) -> tuple[str, int | None, str | None]:
    """HF key → (minke state-dict name, expert index or None, shared-with name or None). Raises on unknown keys."""
    if key in ("lm_head.weight",):
        return key, None, None
    if key in ("model.embed_tokens.weight", "model.norm.weight"):
        return key[len("model."):], None, None
    m = _LAYER.match(key)
    if not m:
        raise CheckpointError(f"unexpected key {key!r}: not part of a DeepSeek-V2/V3 checkpoint")
    i, rest = int(m.group(1)), m.group(2)
    L = cfg.num_hidden_layers
    if i < L:
        name = f"layers.{i}.{rest}"
    elif i - L < cfg.num_nextn_predict_layers:
        if rest == "embed_tokens.weight":
            return f"mtp.{i - L}.{rest}", None, "embed_tokens.weight"
        if rest == "shared_head.head.weight":
            return f"mtp.{i - L}.{rest}", None, "lm_head.weight"
        name = f"mtp.{i - L}.{rest}"
    else:
        hint = " (an MTP layer? load(..., drop_mtp=True) drops them on purpose)" \
            if cfg.num_nextn_predict_layers == 0 else ""
        raise CheckpointError(f"unexpected key {key!r}: layer {i} is beyond num_hidden_layers={L} + "
                              f"num_nextn_predict_layers={cfg.num_nextn_predict_layers}{hint}")
    e = _EXPERT.match(name)
    if e:
        return f"{e.group(1)}.{e.group(3)}", int(e.group(2)), None
    return name, None, None


def minke_to_hf(model: Transformer):
    """Yield (HF key, tensor) for every checkpoint tensor, experts unstacked and MTP copies included."""
    cfg = model.config
    L = cfg.num_hidden_layers
    for name, t in model.state_dict().items():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        if name.startswith("layers."):
            hf = "model." + name
        elif name.startswith("mtp."):
            k, rest = name[len("mtp."):].split(".", 1)
            hf = f"model.layers.{L + int(k)}.{rest}"
        elif name == "lm_head.weight":
            hf = name
        else:
            hf = "model." + name
        m = re.match(r"^(.*\.mlp\.experts)\.(gate_proj|up_proj|down_proj)(_scale_inv)?$", hf)
        if m:  # (an FP8 model in memory also holds <proj>_scale_inv stacks)
            for j in range(t.shape[0]):
                yield f"{m.group(1)}.{j}.{m.group(2)}.weight{m.group(3) or ''}", t[j]
        else:
            yield hf, t
    sd = model.state_dict()
    for k in range(cfg.num_nextn_predict_layers):
        yield f"model.layers.{L + k}.embed_tokens.weight", sd["embed_tokens.weight"]
        yield f"model.layers.{L + k}.shared_head.head.weight", sd["lm_head.weight"]


def _fp8_candidate(key: str, t: torch.Tensor) -> bool:
    """What DeepSeek's FP8 checkpoints quantize: the linear weights of attention (kv_a_proj_with_mqa
    too) and FFNs (not the embedding, head, router, norms or eh_proj). V3.2's indexer: wq_b and wk,
    not weights_proj."""
    if ".self_attn.indexer." in key:
        return t.dim() == 2 and key.endswith((".wq_b.weight", ".wk.weight"))
    if t.dim() != 2 or not key.endswith(("_proj.weight", ".kv_a_proj_with_mqa.weight")) or ".eh_proj." in key:
        return False
    return ".self_attn." in key or ".mlp." in key


# ---- loading ------------------------------------------------------------------------------------
def checkpoint_files(path: str) -> tuple[list[str], dict[str, str] | None]:
    """The weight files of the checkpoint directory ``path`` and its index's weight map (None unsharded)."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: malformed index ({e})") from None
        files = sorted(set(weight_map.values()))
        for fn in files:
            if not os.path.exists(os.path.join(path, fn)):
                raise CheckpointError(f"{index} lists {fn}, which is missing from {path}")
        return [os.path.join(path, fn) for fn in files], weight_map
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(single):
        return [single], None
    files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no model.safetensors, index or *.safetensors files")
    return files, None


def _open(fn: str):
    try:
        return safe_open(fn, framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error types for bad headers and short files
        raise CheckpointError(f"{fn}: not a readable safetensors file ({e})") from None


def load_state(model: Transformer, path: str, drop_layers: int = 0) -> None:
    """Fill ``model`` (already allocated, any dtype/device) from the HF checkpoint at ``path``, one
    tensor at a time: peak memory is the model plus one tensor. ``drop_layers``: the checkpoint's MTP
    layers (model.layers.{L} … {L + drop_layers - 1}) are skipped on purpose (the model has none);
    a layer past them is still an unexpected key."""
    cfg = model.config
    L = cfg.num_hidden_layers
    files, weight_map = checkpoint_files(path)
    targets = model.state_dict(keep_vars=True)
    filled: set[str] = set()
    experts_filled: dict[str, set[int]] = defaultdict(set)
    for fn in files:
        f = _open(fn)
        keys = list(f.keys())
        keyset = set(keys)
        for key in keys:
            if key.endswith(".weight_scale_inv") or _IGNORED.search(key):
                continue
            if drop_layers and (m := _LAYER.match(key)) and L <= int(m.group(1)) < L + drop_layers:
                continue
            name, j, shared = hf_to_minke(key, cfg)
            try:
                t = f.get_tensor(key)
            except Exception as e:
                raise CheckpointError(f"{fn}: cannot read tensor {key!r} ({e})") from None
            scale = None
            if t.dtype == torch.float8_e4m3fn:
                skey = key[: -len("weight")] + "weight_scale_inv"
                if skey in keyset:
                    scale = f.get_tensor(skey)
                elif weight_map and skey in weight_map:
                    scale = _open(os.path.join(path, weight_map[skey])).get_tensor(skey)
                else:
                    raise CheckpointError(f"{fn}: FP8 tensor {key!r} has no {skey!r}")
                want = (-(-t.shape[0] // BLOCK), -(-t.shape[1] // BLOCK)) if t.dim() == 2 else None
                if tuple(scale.shape) != want:
                    raise CheckpointError(f"{fn}: {skey!r} has shape {tuple(scale.shape)}, expected {want} for "
                                          f"{key!r} of shape {tuple(t.shape)} in {BLOCK}x{BLOCK} blocks")
            fp8_dst = name + "_scale_inv" in targets  # kept FP8 in memory (load(..., fp8=True))
            if scale is not None and not fp8_dst:
                t = dequantize_weight(t, scale)
            elif fp8_dst and scale is None:  # a BF16/FP32 checkpoint loaded as FP8: quantized here
                t, scale = quantize_weight(t)
            if shared is not None:
                ref = targets[shared]
                if tuple(t.shape) != tuple(ref.shape):
                    raise CheckpointError(f"{fn}: {key!r} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}")
                continue  # a copy of the shared embedding/head; the main one is loaded from its own key
            if name not in targets:
                raise CheckpointError(f"{fn}: unexpected key {key!r} (no minke tensor {name!r} for this config)")
            dst = targets[name] if j is None else targets[name][j]
            if j is not None and j >= targets[name].shape[0]:
                raise CheckpointError(f"{fn}: {key!r}: expert {j} but n_routed_experts={targets[name].shape[0]}")
            if tuple(t.shape) != tuple(dst.shape):
                raise CheckpointError(f"{fn}: {key!r} has shape {tuple(t.shape)}, expected {tuple(dst.shape)}")
            with torch.no_grad():
                dst.copy_(t)
                if fp8_dst:
                    sdst = targets[name + "_scale_inv"]
                    (sdst if j is None else sdst[j]).copy_(scale)
            for n in (name, name + "_scale_inv") if fp8_dst else (name,):
                if j is None:
                    filled.add(n)
                else:
                    experts_filled[n].add(j)
    for name, got in experts_filled.items():
        if len(got) == targets[name].shape[0]:
            filled.add(name)
    missing = [n for n in targets if n not in filled and not (cfg.tie_word_embeddings and n == "lm_head.weight")]
    if missing and all(n.startswith("mtp.") for n in missing) and not any(n.startswith("mtp.") for n in filled):
        # Written by a tool that drops MTP layers (transformers does): run without them, and say so.
        warnings.warn(f"{path}: no MTP weights (model.layers.{cfg.num_hidden_layers}.*) although config.json has "
                      f"num_nextn_predict_layers={cfg.num_nextn_predict_layers}; loading without MTP modules")
        model.mtp = torch.nn.ModuleList()
        model.config = cfg.replace(num_nextn_predict_layers=0)
        return
    if missing:
        hf = {minke: hf for hf, minke in _hf_names(model)}
        names = [hf.get(n, n) for n in missing]
        raise CheckpointError(f"{path}: {len(missing)} tensors missing from the checkpoint, e.g. "
                              + ", ".join(names[:8]))


def _hf_names(model: Transformer):
    L = model.config.num_hidden_layers
    for name in model.state_dict():
        if name.startswith("mtp."):
            k, rest = name[4:].split(".", 1)
            yield f"model.layers.{L + int(k)}.{rest}", name
        elif name == "lm_head.weight":
            yield name, name
        else:
            yield "model." + name, name


def load(path: str | os.PathLike, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
         config: ModelConfig | None = None, drop_mtp: bool = False, fp8: bool = False) -> Transformer:
    """Load a Hugging Face DeepSeek-V2/V3 directory (FP8 weights dequantized to ``dtype``).
    ``drop_mtp=True`` loads the main model only, skipping the checkpoint's MTP layers (memory for
    inference without speculative decoding); every main-model tensor must still be there.
    ``fp8=True`` keeps the attention and FFN weights in E4M3 with their 128×128 block scales in memory
    (minke.quant.modules; a BF16/FP32 checkpoint is quantized as it loads); the rest is in ``dtype``."""
    path = str(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a directory")
    cfg = config or ModelConfig.load(path)
    drop = 0
    if drop_mtp:  # how many MTP layers the checkpoint holds: its config.json says, or the given config
        has_json = config is not None and os.path.exists(os.path.join(path, "config.json"))
        drop = max(cfg.num_nextn_predict_layers, (ModelConfig.load(path) if has_json else cfg).num_nextn_predict_layers)
        cfg = cfg.replace(num_nextn_predict_layers=0)
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to(dtype)
    if fp8:
        to_fp8_inference(model, dtype)
    model = model.to_empty(device=device)
    for m in model.moe_layers():
        if m.gate.e_score_correction_bias is not None:  # fp32, see Gate
            m.gate.e_score_correction_bias = torch.zeros_like(m.gate.e_score_correction_bias, dtype=torch.float32)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    load_state(model, path, drop)
    if fp8:  # what is in memory is DeepSeek's FP8 block format
        model.config = model.config.replace(quantization_config=FP8_CONFIG)
    elif model.config.quantization_config:  # dequantized at load: what is in memory is no longer FP8
        model.config = model.config.replace(quantization_config=None)
    model.eval()
    return model


# ---- saving -------------------------------------------------------------------------------------
def _written(key: str, t: torch.Tensor, dtype: torch.dtype, fp8: bool) -> dict[str, torch.Tensor]:
    """One checkpoint tensor as it is written: {name: CPU tensor with its own storage} (FP8: the E4M3
    weight and its weight_scale_inv). The routing bias stays fp32."""
    t = t.detach()
    if not _kept(key, t):
        t = t.to(dtype)
    out = {key: t}
    if fp8 and _fp8_candidate(key, t) and t.dtype != torch.float8_e4m3fn:
        q, s = quantize_weight(t)
        out = {key: q, key[: -len("weight")] + "weight_scale_inv": s}
    return {k: v.to("cpu").contiguous().clone() for k, v in out.items()}  # safetensors refuses shared views


def _kept(key: str, t: torch.Tensor) -> bool:
    """Written in its own dtype: the routing bias (fp32), and an FP8 model's E4M3 weights and scales."""
    return key.endswith(("e_score_correction_bias", "weight_scale_inv")) or t.dtype == torch.float8_e4m3fn


def _written_bytes(key: str, t: torch.Tensor, dtype: torch.dtype, fp8: bool) -> int:
    """What ``_written`` will produce, in bytes, without producing it."""
    if fp8 and _fp8_candidate(key, t) and t.dtype != torch.float8_e4m3fn:
        O, I = t.shape
        return O * I + 4 * -(-O // BLOCK) * -(-I // BLOCK)  # E4M3 + one fp32 scale per block
    return t.numel() * (t.element_size() if _kept(key, t) else torch.empty((), dtype=dtype).element_size())


def save(model: Transformer, path: str | os.PathLike, dtype: torch.dtype | None = None, fp8: bool | None = None,
         max_shard_bytes: int = 5 * 2**30) -> None:
    """Write config.json + safetensors (sharded with an index past ``max_shard_bytes``) in the HF
    layout. Shards are planned from the tensors' sizes, then built and written one at a time, so at
    most one shard's CPU copy exists beside the model. Each file is written to a temporary name and
    renamed, so a crash leaves no torn file. ``fp8=True`` writes DeepSeek's FP8 format (E4M3 +
    weight_scale_inv per 128×128 block); a model holding FP8 weights (load(..., fp8=True)) writes them
    bit for bit (``fp8=None``: FP8 exactly when the model holds it; to BF16: ``minke convert``)."""
    path = str(path)
    held = holds_fp8(model)
    if fp8 is None:
        fp8 = held
    elif held and not fp8:
        raise ValueError("save(..., fp8=False): this model holds FP8 weights; save it as FP8 and convert it with "
                         "`minke convert --to bf16`")
    os.makedirs(path, exist_ok=True)
    cfg = model.config
    first = next(model.parameters())
    out_dtype = dtype or first.dtype
    entries = list(minke_to_hf(model))  # (HF key, view into the model): no copies yet
    plan: list[list[int]] = [[]]  # entry indices per shard; an FP8 weight and its scale stay together
    size = 0
    for i, (key, t) in enumerate(entries):
        nbytes = _written_bytes(key, t, out_dtype, fp8)
        if size + nbytes > max_shard_bytes and plan[-1]:
            plan.append([])
            size = 0
        plan[-1].append(i)
        size += nbytes
    extra = {"quantization_config": FP8_CONFIG} if fp8 else {"quantization_config": None}
    out_cfg = cfg.replace(torch_dtype=str(out_dtype).replace("torch.", ""), **extra)
    weight_map, total = {}, 0
    names = ["model.safetensors"] if len(plan) == 1 else \
        [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))]
    for fn, idxs in zip(names, plan):
        shard = {}
        for i in idxs:
            shard.update(_written(*entries[i], out_dtype, fp8))
        tmp = os.path.join(path, fn + ".tmp")
        save_file(shard, tmp, metadata={"format": "pt"})
        os.replace(tmp, os.path.join(path, fn))
        weight_map.update({k: fn for k in shard})
        total += sum(v.numel() * v.element_size() for v in shard.values())
        del shard  # freed before the next shard is built
    index = os.path.join(path, "model.safetensors.index.json")
    if len(plan) > 1:
        with open(index + ".tmp", "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        os.replace(index + ".tmp", index)
    elif os.path.exists(index):
        os.remove(index)
    out_cfg.save(path)

"""`minke convert`: a checkpoint between BF16 and DeepSeek's FP8 block format, tensor by tensor.

--to fp8: the linear weights of attention and FFNs (the ones DeepSeek's checkpoints quantize) become
E4M3 + ``weight_scale_inv`` per 128×128 block; tensors already FP8 are copied bit for bit with their
scales. --to bf16: FP8 weights are dequantized (W = W_fp8 · scale_inv per block), for tools that cannot
read FP8. Everything else is written in --dtype (the routing bias stays fp32). Works on the files, not a
model: each shard is converted on its own (peak memory: one shard), with the same shard names and an
updated index; config.json gets or loses its quantization_config; the other files (tokenizer…) are copied.

Round trips: FP8 → FP8 copies the bits. FP8 → BF16 → FP8 gives back the same bits whenever each
block's scale is recovered from its dequantized amax (448 · scale rounds back to it: so for FP8 made from
a BF16 checkpoint, as here; BF16's rounding of the other q · scale stays far below half an E4M3 step).
With --pow2 the values come back exactly but not always the bits: a block whose largest value rounded
down to 224 · 2^k is re-encoded with half the scale and doubled values.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

import torch
from safetensors.torch import save_file

from .model.weights import FP8_CONFIG, CheckpointError, _fp8_candidate, _open, checkpoint_files
from .quant.fp8 import FP8, dequantize_weight, quantize_weight

SCALE = "weight_scale_inv"
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="minke convert", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("checkpoints")
    g.add_argument("--model", required=True, help="input checkpoint directory (config.json + safetensors)")
    g.add_argument("--out", required=True, help="output directory (created; must differ from --model)")
    g = p.add_argument_group("format")
    g.add_argument("--to", required=True, choices=["fp8", "bf16"], help="FP8 block format or plain BF16 weights")
    g.add_argument("--pow2", action="store_true", help="--to fp8: power-of-two (UE8M0) scales")
    g.add_argument("--dtype", choices=list(DTYPES), default="bfloat16",
                   help="dtype of the tensors that are not FP8 (and of dequantized weights)")
    return p.parse_args(argv)


def _scale_key(key: str) -> str:
    return key[: -len("weight")] + SCALE


def convert_file(fn: str, get_scale, to: str, dtype: torch.dtype, pow2: bool) -> dict[str, torch.Tensor]:
    """One safetensors file → the tensors to write. ``get_scale(key)`` finds a scale in any shard."""
    f = _open(fn)
    keys = set(f.keys())
    out: dict[str, torch.Tensor] = {}
    for key in f.keys():
        if key.endswith(SCALE):
            continue  # written with its weight
        try:
            t = f.get_tensor(key)
        except Exception as e:
            raise CheckpointError(f"{fn}: cannot read tensor {key!r} ({e})") from None
        if t.dtype == FP8:
            scale = f.get_tensor(_scale_key(key)) if _scale_key(key) in keys else get_scale(key)
            if to == "fp8":
                out[key], out[_scale_key(key)] = t, scale
                continue
            try:
                out[key] = dequantize_weight(t, scale, dtype=dtype)
            except ValueError as e:
                raise CheckpointError(f"{fn}: {_scale_key(key)!r} for {key!r}: {e}") from None
        elif to == "fp8" and _fp8_candidate(key, t):
            try:
                out[key], out[_scale_key(key)] = quantize_weight(t, pow2=pow2)
            except ValueError as e:  # non-finite weights
                raise CheckpointError(f"{fn}: {key!r}: {e}") from None
        else:
            out[key] = t if key.endswith("e_score_correction_bias") or not t.is_floating_point() else t.to(dtype)
    return {k: v.contiguous() for k, v in out.items()}


def convert(src: str, dst: str, to: str, dtype: torch.dtype = torch.bfloat16, pow2: bool = False) -> None:
    src, dst = os.path.abspath(src), os.path.abspath(dst)
    if not os.path.isdir(src):
        raise CheckpointError(f"{src}: not a directory")
    if src == dst:
        raise ValueError("--out must differ from --model (shards are written while others are still read)")
    cfg_path = os.path.join(src, "config.json")
    if not os.path.exists(cfg_path):
        raise CheckpointError(f"{src}: no config.json")
    files, weight_map = checkpoint_files(src)

    def get_scale(key: str) -> torch.Tensor:
        skey = _scale_key(key)
        for fn in ([os.path.join(src, weight_map[skey])] if weight_map and skey in weight_map else files):
            f = _open(fn)
            if skey in f.keys():
                return f.get_tensor(skey)
        raise CheckpointError(f"{src}: FP8 tensor {key!r} has no {skey!r}")

    os.makedirs(dst, exist_ok=True)
    new_map, total = {}, 0
    for fn in files:
        tensors = convert_file(fn, get_scale, to, dtype, pow2)
        name = os.path.basename(fn)
        save_file(tensors, os.path.join(dst, name + ".tmp"), metadata={"format": "pt"})
        os.replace(os.path.join(dst, name + ".tmp"), os.path.join(dst, name))
        new_map.update({k: name for k in tensors})
        total += sum(v.numel() * v.element_size() for v in tensors.values())
    if weight_map is not None:
        with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": new_map}, f, indent=2)
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["torch_dtype"] = str(dtype).replace("torch.", "")
    if to == "fp8":
        cfg["quantization_config"] = {**FP8_CONFIG, **({"scale_fmt": "ue8m0"} if pow2 else {})}
    else:
        cfg.pop("quantization_config", None)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    for name in os.listdir(src):  # tokenizer files, chat template, generation config, …
        p = os.path.join(src, name)
        if os.path.isfile(p) and not name.endswith(".safetensors") and name not in (
                "config.json", "model.safetensors.index.json"):
            shutil.copy2(p, os.path.join(dst, name))


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        convert(a.model, a.out, a.to, DTYPES[a.dtype], a.pow2)
    except (CheckpointError, ValueError) as e:
        print(f"minke convert: {e}")
        return 1
    print(f"{a.model} -> {a.out} ({a.to}{', power-of-two scales' if a.pow2 else ''})")
    return 0

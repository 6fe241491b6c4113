"""`minke info`: parameter counts and KV-cache bytes per token of a preset or a checkpoint directory."""

from __future__ import annotations

import argparse
import json

from .config import PRESETS, ModelConfig, preset


def report(cfg: ModelConfig, bytes_per_element: int = 2) -> dict:
    pc = cfg.param_counts()
    kv = cfg.kv_cache_bytes_per_token(bytes_per_element)
    return {**{f"params_{k}": v for k, v in pc.items()},
            "kv_bytes_per_token_latent": kv["latent"], "kv_bytes_per_token_decompressed": kv["decompressed"],
            "kv_compression": round(kv["ratio"], 2)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="minke info", description=__doc__)
    p.add_argument("--preset", default="tiny", help=f"one of {', '.join(PRESETS)}")
    p.add_argument("--model", help="a checkpoint directory (its config.json) instead of a preset")
    p.add_argument("--bytes", type=int, default=2, help="bytes per cache element (2 = BF16)")
    p.add_argument("--json", action="store_true", help="print JSON")
    a = p.parse_args(argv)
    cfg = ModelConfig.load(a.model) if a.model else preset(a.preset)
    r = report(cfg, a.bytes)
    if a.json:
        print(json.dumps(r))
        return 0
    name = a.model or a.preset
    print(f"{name}: {r['params_total'] / 1e9:.3f}B parameters (+{r['params_mtp'] / 1e9:.3f}B MTP), "
          f"{r['params_active'] / 1e9:.3f}B active per token")
    print(f"KV cache per token ({a.bytes} B/elt): latent {r['kv_bytes_per_token_latent']:,} B vs decompressed "
          f"{r['kv_bytes_per_token_decompressed']:,} B ({r['kv_compression']}x)")
    return 0

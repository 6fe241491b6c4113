"""Launched by tests/test_fp8_parallel.py under ``torchrun --nproc_per_node 2`` (CPU, gloo).

For each mode (expert parallel + FSDP2, and FSDP2 alone) it builds the tiny model from a seed, puts
it in FP8 (``to_fp8_training``), parallelizes it, records the module types and which experts' FP8
GEMMs each rank runs, compares the forward and the first gradients with an unparallelized FP8 copy
(this rank's rows; the full batch), and trains ``dist_worker.train``'s AdamW steps on its half of
each global batch. Rank 0 writes ``<out>/result.json``; tests/test_fp8_parallel.py compares it with
the same training in one process.
"""

from __future__ import annotations

import copy

import torch

import dist_worker
import minke
import minke.quant.modules as fp8_modules
from minke.quant.modules import FP8TrainExperts, FP8TrainLinear, to_fp8_training
from minke.train import parallel

# Global batch 4 → 2 rows of 64 tokens per rank: each rank's tokens are whole 128-token tiles of the one-process
# batch, so the weight gradients' 1×128 tiles along the tokens (fp8.py) are the same with 1 and 2 processes.
SEQ = 64


def batches(vocab: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (dist_worker.GLOBAL_BATCH, SEQ), generator=g) for _ in range(dist_worker.STEPS)]


def fp8_model(seed: int = 0, fp8: bool = True):
    """The tiny preset without MTP (its rows are 63 tokens, whose tiles could not be one process's), in FP8."""
    model = minke.build(minke.preset("tiny", num_nextn_predict_layers=0), seed=seed)
    if not fp8:
        return model
    to_fp8_training(model)
    return model


class GemmLog:
    """The layer names ``fp8_linear`` is called with while on (FP8 linears and experts pass theirs; an
    expert's is ``<layer>.mlp.experts.<global id>.<proj>``)."""

    def __init__(self):
        self.names: set[str] = set()
        self._f = fp8_modules.fp8_linear

    def __enter__(self):
        def logged(x, w, b=None, pow2=False, name="fp8_linear"):
            self.names.add(name)
            return self._f(x, w, b, pow2, name)
        fp8_modules.fp8_linear = logged
        return self

    def __exit__(self, *exc):
        fp8_modules.fp8_linear = self._f


def check_mode(ep: bool, d: parallel.Dist, out: str) -> dict:
    ref = fp8_model()
    model = parallel.parallelize(copy.deepcopy(ref), d, ep=ep)
    data = batches(ref.config.vocab_size)
    res = {"experts_type": sorted({type(m.experts).__name__ for m in model.moe_layers()}),
           "experts_fp8": all(isinstance(m.experts, FP8TrainExperts) or getattr(m.experts, "fp8", None)
                              for m in model.moe_layers()),
           "fp8_linears": sum(isinstance(m, FP8TrainLinear) for m in model.modules())}
    local = parallel.shard_batch(data[0], d)
    with torch.no_grad():
        b = ref(local, mtp=True)
        with GemmLog() as log:  # this rank's FP8 GEMMs (their backward products run inside the same calls)
            a = model(local, mtp=True)
    res["forward_diff"] = max((x - y).abs().max().item()
                              for x, y in zip([a.logits, *a.mtp_logits], [b.logits, *b.mtp_logits]))
    res["expert_gemms"] = parallel.all_gather_object(sorted(n for n in log.names if ".mlp.experts." in n))
    dist_worker.loss_fn(model, local).backward()
    dist_worker.loss_fn(ref, data[0]).backward()
    g_par, g_ref = dist_worker.full_grads(model), dist_worker.full_grads(ref)
    res["grad_rel_diff"] = {k: ((g_par[k] - g_ref[k]).norm() / g_ref[k].norm().clamp_min(1e-30)).item() for k in g_ref}
    model.zero_grad(set_to_none=True)
    del ref
    res.update(dist_worker.train(model, data, d))
    if ep:  # the FP8 experts of a rank that gets no rows still join the all-to-all backward
        res["starved_grad_abs"] = dist_worker.starved_grad(model, data[0], d)
    return res


if __name__ == "__main__":
    dist_worker.main(check_mode)

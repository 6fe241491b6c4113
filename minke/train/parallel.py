"""Scale-out under ``torchrun``: expert parallelism for the routed experts, FSDP2 for everything else.

The model code stays single-device math (parallelism is applied from outside it); this file changes a
built model from outside:

- **Expert parallelism** (V3 §3.2 trains with EP across nodes). Each rank keeps E/W of every MoE
  layer's routed experts. ``MoE.forward`` is untouched: ``grouped_moe`` still sorts the local
  (token, expert) rows by expert and hands them to ``experts.grouped(rows, counts)``; here that call
  exchanges row counts, sends each row to the rank owning its expert (``all_to_all_single`` with split
  sizes), runs this rank's experts over what arrived, and sends the results back in the same order.
  The gate is replicated, so routing, gate weights, loads and the balance loss stay local.
- **FSDP2** (``fully_shard``) per Block (MTP modules included) and on the root, over the same 1-D mesh
  of all W ranks. The expert slices are passed as ``ignored_params``: they are already partitioned.

Expert weights are DTensors sharded on dim 0 over that mesh, so the state dict, the optimizer, the
gradient norm and ``full_tensor()`` see full (E, ·, ·) tensors, exactly like FSDP's own parameters.

FP8 (``minke.quant.modules.to_fp8_training``) goes on before this: FSDP2 gathers each FP8 linear's whole
weight before its forward (its 128×128 blocks are one process's), and EPExperts replacing FP8TrainExperts
runs the FP8 GEMMs on its local experts.

Gradient scale. FSDP averages the dense gradients over ranks, which makes the step the gradient of the
mean of the W local losses (= the full-batch loss, local batches being equal). A rank's experts
receive rows from all W ranks, so their gradient arrives as a *sum* of W local-loss gradients; it is
scaled by 1/W on the way into the weights to match (``_ScaleGrad``). tests/test_parallel.py checks
full-batch single-process gradients against the gathered parallel ones.

Data parallelism is over the same W ranks: each takes B/W rows of the global batch (``shard_batch``).
Checkpoints stay whole: ``full_state_model`` gathers the model onto rank 0 for ``minke.save``, and
``optimizer_state`` the optimizer state keyed by parameter name, so a run resumes on any world size.

Verified on torch 2.13, CPU, gloo, 2 processes: ``all_to_all_single`` with uneven split sizes,
``fully_shard`` on a CPU device mesh with ``ignored_params``, ``clip_grad_norm_`` and AdamW over FSDP's
and the expert DTensors together, the full-state optimizer dicts. On CUDA the same code runs with
nccl (not exercised here: no GPU in CI).

Shape legend: M (token, expert) rows on this rank, R rows received, D hidden, W world, El = E/W local experts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

from ..model.moe import Experts, gather_rows, inverse_permutation
from ..model.transformer import Transformer
from ..model.weights import load_state
from ..quant.modules import FP8TrainExperts


# ---- process group ------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    mesh: DeviceMesh | None = None  # 1-D over all ranks; None when world == 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | torch.device | None = None) -> Dist:
    """Join the torchrun job (RANK/WORLD_SIZE/LOCAL_RANK from the environment): nccl on CUDA, gloo on
    CPU. Without torchrun (or with one process) no process group is made and world is 1.
    ``device`` (default: cuda if available) picks the type: "cpu" runs gloo even where CUDA exists.
    Under torchrun each rank takes GPU ``LOCAL_RANK``; a single process keeps an explicit "cuda:1"."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        if world > 1 or dev.index is None:
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if world == 1:
        return Dist(device=dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                device_id=dev if dev.type == "cuda" else None)
    mesh = init_device_mesh(dev.type, (world,), mesh_dim_names=("dp",))
    return Dist(rank, world, local_rank, dev, mesh)


def shutdown() -> None:
    """Every rank leaves together: the others wait for rank 0's last work (final checkpoint, report)
    before the process group goes, so no rank tears gloo down while a peer still holds it (a rank that
    left first was seen to abort: "terminate called without an active exception")."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """``obj`` from rank ``src`` on every rank (picklable objects: a tokenizer, a config)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    """[obj of rank 0, obj of rank 1, …] on every rank (``[obj]`` with one process)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a new tensor; ``t`` itself when there is one process)."""
    if not dist.is_initialized():
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t


def reduce_loads(loads: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per-layer expert loads (E,) summed over ranks in one collective: the global counts the
    aux-loss-free bias update needs, so every rank moves its replicated bias identically."""
    if not dist.is_initialized() or not loads:
        return loads
    return list(all_reduce_sum(torch.stack(loads)).unbind(0))


def shard_batch(x: torch.Tensor, d: Dist) -> torch.Tensor:
    """This rank's rows of a global batch (B, …); B must divide by the world size."""
    if x.shape[0] % d.world:
        raise ValueError(f"global batch {x.shape[0]} does not divide over {d.world} ranks")
    return x.chunk(d.world)[d.rank]


def clip_grad_norm_(params, max_norm: float) -> float:
    """torch's clip over plain or DTensor gradients (sharded ones give the global norm); a float back."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


# ---- expert parallelism -------------------------------------------------------------------------
class _AllToAll(torch.autograd.Function):
    """Rows of x (M, …) go out in chunks of ``send[r]`` to rank r; ``recv[r]`` rows arrive from rank r.
    Backward sends the gradient back the way the rows came."""

    @staticmethod
    def forward(ctx, x, send: list[int], recv: list[int], group):
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty((sum(recv), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        gx = g.new_empty((sum(ctx.send), *g.shape[1:]))
        dist.all_to_all_single(gx, g.contiguous(), ctx.send, ctx.recv, group=ctx.group)
        return gx, None, None, None


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; gradient times ``s`` (the 1/W of the module docstring)."""

    @staticmethod
    def forward(ctx, x, s: float):
        ctx.s = s
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.s, None


class _LocalExperts:
    """This rank's expert slices as plain tensors, computed with Experts' own math (one formula)."""

    expert, grouped = Experts.expert, Experts.grouped

    def __init__(self, gate_proj, up_proj, down_proj):
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj


class _LocalFP8Experts(_LocalExperts):
    """The same slices computed with FP8TrainExperts' math (FP8 GEMMs), when ``to_fp8_training`` ran
    before ``parallelize``; ``fp8_first`` makes errors name the global expert id."""

    expert, grouped, _swiglu = FP8TrainExperts.expert, FP8TrainExperts.grouped, FP8TrainExperts._swiglu

    def __init__(self, gate_proj, up_proj, down_proj, fp8_name: str, fp8_pow2: bool, fp8_first: int):
        super().__init__(gate_proj, up_proj, down_proj)
        self.fp8_name, self.fp8_pow2, self.fp8_first = fp8_name, fp8_pow2, fp8_first


class EPExperts(nn.Module):
    """Drop-in for ``Experts`` under expert parallelism: same parameter names and full shapes (as
    DTensors sharded on dim 0), this rank holding experts [rank·El, (rank+1)·El). Replacing an
    ``FP8TrainExperts`` it keeps FP8 GEMMs for the local experts (``fp8``: its name and pow2)."""

    def __init__(self, experts: Experts | FP8TrainExperts, mesh: DeviceMesh):
        super().__init__()
        self.group, self.world = mesh.get_group(), mesh.size()
        E = experts.gate_proj.shape[0]
        if E % self.world:
            raise ValueError(f"expert parallelism needs n_routed_experts ({E}) divisible by the world size "
                             f"({self.world}); run with ep=False to FSDP-shard the experts instead")
        self.n_local = E // self.world
        self.first = lo = mesh.get_local_rank() * self.n_local
        self.fp8 = (experts.fp8_name, experts.fp8_pow2) if isinstance(experts, FP8TrainExperts) else None
        for name in ("gate_proj", "up_proj", "down_proj"):
            p = getattr(experts, name)
            local = p.detach()[lo:lo + self.n_local].clone()
            setattr(self, name, nn.Parameter(DTensor.from_local(local, mesh, [Shard(0)], run_check=False),
                                             requires_grad=p.requires_grad))

    def extra_repr(self) -> str:
        return f"experts [{self.first}, {self.first + self.n_local}) of {self.n_local * self.world}" + \
            (", FP8 GEMMs" if self.fp8 else "")

    def expert(self, e: int, x: torch.Tensor):
        raise NotImplementedError("the looped reference (MoE.reference) runs on an unparallelized model")

    def grouped(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x (M, D) sorted by global expert id, counts (E,) rows each → (M, D), rows in the same order."""
        W, El = self.world, self.n_local
        recv_counts = torch.empty(W * El, dtype=torch.long, device=x.device)
        dist.all_to_all_single(recv_counts, counts, group=self.group)
        counts, rc = counts.tolist(), recv_counts.tolist()  # [s·El + j]: rows from rank s for local expert j (the one host sync)
        send = [sum(counts[r * El:(r + 1) * El]) for r in range(W)]
        recv = [sum(rc[s * El:(s + 1) * El]) for s in range(W)]
        rows = _AllToAll.apply(x, send, recv, self.group)  # (R, D) by source rank, then local expert
        # Regroup by local expert so each expert runs once over everything it received.
        local_id = torch.arange(El, device=x.device).repeat(W).repeat_interleave(recv_counts, output_size=sum(recv))
        order = local_id.argsort(stable=True)
        weights = [_ScaleGrad.apply(p.to_local(), 1.0 / W).to(x.dtype)
                   for p in (self.gate_proj, self.up_proj, self.down_proj)]
        local = _LocalExperts(*weights) if self.fp8 is None else _LocalFP8Experts(*weights, *self.fp8, self.first)
        mine = gather_rows(rows, order)
        y = local.grouped(mine, recv_counts.view(W, El).sum(0))
        if not y.shape[0]:
            # Nothing arrived: keep the rows and the weights in the graph, whatever the experts' math
            # returned for no rows, so the backward of the all-to-all that brought the rows runs on every
            # rank (else a deadlock) and the weights' (zero) gradient exists (a None grad would make this
            # rank skip the collectives of the gradient norm).
            y = y + mine.to(y.dtype) * 0 + sum(w.flatten()[0] for w in weights) * 0
        return _AllToAll.apply(gather_rows(y, inverse_permutation(order)), recv, send, self.group)


# ---- applying it --------------------------------------------------------------------------------
def parallelize(model: Transformer, d: Dist, ep: bool = True, param_dtype: torch.dtype | None = None) -> Transformer:
    """Expert parallelism (``ep``), then FSDP2 per Block and on the root. In place; returns the model.
    Identity when world == 1. ``param_dtype`` (e.g. bf16) is FSDP's compute dtype, with fp32 gradient
    reduction; the fp32 routing bias and the gate's fp32 math are unaffected."""
    if d.world == 1:
        return model.to(d.device)
    model.to(d.device)
    if ep:
        for moe in model.moe_layers():
            moe.experts = EPExperts(moe.experts, d.mesh)
    ignored = {p for m in model.modules() if isinstance(m, EPExperts) for p in m.parameters()}
    # cast_forward_inputs off: blocks take the fp32 RoPE tables (cos, sin), which must stay fp32.
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None,
                              cast_forward_inputs=False)
    for block in [*model.layers, *model.mtp]:
        if hasattr(block, "shared_head"):
            # Transformer.forward calls an MTP module's shared_head.norm after the module's forward,
            # when the module is already resharded: it needs its own FSDP unit.
            fully_shard(block.shared_head.norm, mesh=d.mesh, mp_policy=mp)
        fully_shard(block, mesh=d.mesh, ignored_params=ignored, mp_policy=mp)
    fully_shard(model, mesh=d.mesh, ignored_params=ignored, mp_policy=mp)
    return model


def full_state_model(model: Transformer, d: Dist) -> Transformer | None:
    """The whole model as a plain single-device Transformer on rank 0's CPU (None on other ranks), for
    ``minke.save``. Every rank must call it (each sharded tensor is gathered in turn). With one process
    the model itself is returned."""
    if d.world == 1:
        return model
    state = {}
    for k, v in model.state_dict().items():
        v = v.full_tensor() if isinstance(v, DTensor) else v
        if d.is_main:
            state[k] = v.detach().cpu()
    if not d.is_main:
        return None
    with torch.device("meta"):
        out = Transformer(model.config)
    out.load_state_dict(state, assign=True)
    if model.config.tie_word_embeddings:
        out.lm_head.weight = out.embed_tokens.weight
    return out.train(model.training)


def load_model_state(model: Transformer, path: str) -> None:
    """``weights.load_state`` that also fills a parallelized model: every rank reads the full HF
    checkpoint into a plain CPU copy and keeps its own shards (peak: one full copy per rank)."""
    if not any(isinstance(p, DTensor) for p in model.parameters()):
        return load_state(model, path)
    with torch.device("meta"):
        plain = Transformer(model.config)
    plain.to_empty(device="cpu")  # fp32, the routing bias included
    if model.config.tie_word_embeddings:
        plain.lm_head.weight = plain.embed_tokens.weight
    load_state(plain, path)
    set_model_state_dict(model, plain.state_dict(), options=StateDictOptions(full_state_dict=True))


def optimizer_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """The optimizer's full state keyed by parameter name, on rank 0's CPU ({} on other ranks; every
    rank must call it). Name-keyed and unsharded, so a run resumes on any number of ranks."""
    return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    """Inverse of ``optimizer_state``: every rank passes the full state and keeps its own shards."""
    set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))

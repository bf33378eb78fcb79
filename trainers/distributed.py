"""Data-parallel training across processes (``torchrun``): one replica of the policy per rank.

Launch (one process per GPU, or several CPU processes with ``gloo``)::

    torchrun --nproc_per_node 8 -m entropy_ops.trainers train --num_prompts=64 ...
    torchrun --nnodes 2 --node_rank R --master_addr HOST --master_port 29500 \\
             --nproc_per_node 8 -m entropy_ops.trainers train ...

What each rank does, and why the result is the single-process step:

- every rank draws the same ``num_prompts`` prompts (the prompt sampler is
  seeded by ``seed`` alone) and keeps its shard of ``num_prompts / W`` whole
  prompt groups (``W`` = world size): rank ``r`` takes groups
  ``[r k, (r + 1) k)``, ``k = num_prompts / W``. A group never spans ranks, so
  group-relative advantages (GRPO, Dr.GRPO, RLOO, GRPO-S, SEED-GRPO, EM-RL) are
  those of one process. Statistics over the whole batch are per rank: GTPO's
  standardization of its O+ / O- token sets, and the entropy mask's quantile.
- sampling uses the random stream ``seed + r`` (rank 0's is the
  single-process stream);
- each micro-batch loss is weighted by its share of the *global* batch
  (tokens or responses, summed over ranks with one all-reduce), so after
  gradient accumulation the rank gradients add up to the full batch's
  gradient: ``g = sum_r sum_{m in r} w_m grad L_m``. One bucketed all-reduce
  (sum) per optimizer step makes every replica hold ``g`` (the reduction DDP
  performs, done once after accumulation, and correct when dynamic sampling
  leaves a rank with fewer micro-batches or none); clipping and AdamW then
  take identical steps on identical replicas. Parameters are broadcast from
  rank 0 at start.
- rank 0 alone evaluates, logs and writes checkpoints (a shared file system
  is assumed for ``--resume``); each rank's random state goes into the
  checkpoint, so a resumed run continues every rank's stream.

With ``parallelism: ddp`` (the default) every replica holds the whole model
and optimizer state: data parallelism for models that fit one device. With
``parallelism: fsdp`` the same step runs on a model sharded with FSDP2
(``fsdp.py``): each rank holds ``1/W`` of the parameters, gradients and
optimizer state, FSDP's reduce-scatter sums the gradients, and
:func:`sum_gradients` leaves those sharded (``DTensor``) gradients alone.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Gradients are all-reduced in flat buffers of about this many bytes.
BUCKET_BYTES = 64 * 2**20


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``rank`` of ``world_size`` (``world_size == 1``: not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_world_size() -> int:
    """``WORLD_SIZE`` set by torchrun (1 when absent)."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable WORLD_SIZE must be an integer, got {value!r}") from None


def init_distributed(device_type: str) -> DistContext:
    """Join the process group torchrun describes (``nccl`` for CUDA, ``gloo`` for CPU); no-op for one process."""
    world = launched_world_size()
    if world <= 1:
        return DistContext()
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this build of torch")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank)


def shard_rows(rows: list, ctx: DistContext) -> list:
    """This rank's contiguous share of the step's prompts (``len(rows)`` divisible by the world size)."""
    if not ctx.enabled:
        return rows
    if len(rows) % ctx.world_size:
        raise ValueError(f"num_prompts ({len(rows)}) must be divisible by the number of processes "
                         f"({ctx.world_size}) so that each rank gets whole prompt groups")
    k = len(rows) // ctx.world_size
    return rows[ctx.rank * k:(ctx.rank + 1) * k]


def all_reduce_sum(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """The elementwise sum over ranks of ``values`` (returned unchanged when not distributed)."""
    if not ctx.enabled:
        return values
    buf = values.detach().to(_comm_device(ctx), copy=True)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(values.device)


def all_reduce_extreme(value: float, ctx: DistContext, *, largest: bool) -> float:
    """The max (``largest``) or min over ranks of a scalar."""
    if not ctx.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_comm_device(ctx))
    dist.all_reduce(t, op=dist.ReduceOp.MAX if largest else dist.ReduceOp.MIN)
    return float(t.item())


def any_rank(flag: bool, ctx: DistContext) -> bool:
    """True when ``flag`` is True on at least one rank (e.g. a Ctrl-C seen by one process)."""
    return all_reduce_extreme(1.0 if flag else 0.0, ctx, largest=True) > 0


def _is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _comm_device(ctx: DistContext) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _buckets(tensors: list[torch.Tensor], bucket_bytes: int):
    bucket, size = [], 0
    for t in tensors:
        if bucket and (size + t.numel() * t.element_size() > bucket_bytes or t.dtype != bucket[0].dtype
                       or t.device != bucket[0].device):
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += t.numel() * t.element_size()
    if bucket:
        yield bucket


def sum_gradients(params: list[torch.nn.Parameter], ctx: DistContext, bucket_bytes: int = BUCKET_BYTES) -> None:
    """Replace each ``p.grad`` by its sum over ranks (a missing gradient counts as zeros).

    Parameters sharded by FSDP (``DTensor``) are skipped: their backward already summed them.
    """
    if not ctx.enabled:
        return
    params = [p for p in params if not _is_sharded(p)]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    for bucket in _buckets([p.grad for p in params], bucket_bytes):
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for g in bucket:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def broadcast_parameters(module: torch.nn.Module, ctx: DistContext) -> None:
    """Copy rank 0's parameters and buffers to every rank (one tensor at a time through the
    backend's device when they live elsewhere, e.g. a CPU-loaded model under NCCL)."""
    if not ctx.enabled:
        return
    device = _comm_device(ctx)
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            if t.device == device:
                dist.broadcast(t.data, src=0)
            else:
                buf = t.data.to(device)
                dist.broadcast(buf, src=0)
                t.data.copy_(buf)


def replica_max_abs_diff(module: torch.nn.Module, ctx: DistContext) -> float:
    """``max |p_r - p_0|`` over ranks and replicated parameters: 0.0 when the replicas are identical.

    FSDP-sharded parameters (``DTensor``) have one copy, not replicas: they are not compared.
    """
    if not ctx.enabled:
        return 0.0
    worst = 0.0
    with torch.no_grad():
        for p in module.parameters():
            if _is_sharded(p):
                continue
            ref = p.detach().clone()
            dist.broadcast(ref, src=0)
            worst = max(worst, float((p.detach() - ref).abs().max()))
    return all_reduce_extreme(worst, ctx, largest=True)


def gather_objects(obj, ctx: DistContext) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` when not distributed)."""
    if not ctx.enabled:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def shutdown(ctx: DistContext, *, wait: bool = True) -> None:
    """Leave the process group (when this module joined it). ``wait``: first wait for every rank, so that no
    rank tears down its transport while a peer still talks to it (a gloo rank that exits early can be
    aborted at exit); ``False`` after an error, when a peer may never arrive."""
    if ctx.enabled and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()

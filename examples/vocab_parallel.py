"""Per-token log-probs and entropies with a tensor-parallel (vocab-sharded) lm_head.

Needs only the base install (``pip install -e .`` from a clone, or ``pip install entropy-ops``).
Runs on the CPU in seconds, two processes talking over gloo:

    python examples/vocab_parallel.py                          # spawns 2 ranks itself
    torchrun --nproc_per_node 4 examples/vocab_parallel.py      # or under torchrun (any world size)

Each rank holds the rows ``[vocab_start, vocab_start + V_r)`` of the lm_head (Megatron's
VocabParallelEmbedding / ColumnParallelLinear layout; shard sizes may differ) and the full hidden
states. ``vocab_parallel_linear_logprobs_and_entropy`` returns the same ``(logp, entropy)`` on every
rank with two small all-reduces per call (no rank ever holds logits for the full vocabulary), and
backward gives each rank the gradient of its own rows and the all-reduced gradient of the hidden
states. On GPUs: ``init_process_group("nccl")`` and CUDA tensors; the fused Triton kernels run.
"""
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from entropy_ops import linear_logprobs_and_entropy
from entropy_ops.vocab_parallel import vocab_parallel_linear_logprobs_and_entropy

V, D, B, T = 1001, 64, 2, 12  # a vocabulary that does not split evenly


def shard_bounds(rank: int, world: int) -> tuple[int, int]:
    """``(vocab_start, V_r)``: the first ``V % world`` ranks get one extra row."""
    base, extra = divmod(V, world)
    start = rank * base + min(rank, extra)
    return start, base + (rank < extra)


def main(rank: int, world: int) -> float:
    g = torch.Generator().manual_seed(0)  # same full inputs on every rank; each keeps its own rows
    full_weight = torch.randn(V, D, generator=g) / D**0.5
    hidden = torch.randn(B, T, D, generator=g, requires_grad=True)
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[:, :4] = -100  # prompt positions: ignored
    start, size = shard_bounds(rank, world)
    weight_shard = full_weight[start:start + size].clone().requires_grad_(True)

    logp, entropy = vocab_parallel_linear_logprobs_and_entropy(
        hidden, weight_shard, targets, vocab_start=start, temperature=0.9, logit_softcap=30.0)
    loss = -(logp.sum() + 0.01 * entropy.sum()) / (targets != -100).sum()  # the same loss on every rank
    loss.backward()  # hidden.grad: all-reduced; weight_shard.grad: this rank's rows only

    # Check against the single-process op on the full lm_head.
    h1, w1 = hidden.detach().requires_grad_(True), full_weight.clone().requires_grad_(True)
    ref_logp, ref_H = linear_logprobs_and_entropy(h1, w1, targets, temperature=0.9, logit_softcap=30.0)
    (-(ref_logp.sum() + 0.01 * ref_H.sum()) / (targets != -100).sum()).backward()
    err = max((logp - ref_logp).abs().max().item(), (entropy - ref_H).abs().max().item(),
              (hidden.grad - h1.grad).abs().max().item(),
              (weight_shard.grad - w1.grad[start:start + size]).abs().max().item())
    print(f"rank {rank}/{world}: vocab rows [{start}, {start + size}), mean entropy {entropy[:, 4:].mean():.4f} nats, "
          f"max |difference| to the single-process op {err:.2e}")
    return err


def _spawned(rank: int, world: int, init_file: str):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        main(rank, world)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    if "RANK" in os.environ:  # under torchrun
        dist.init_process_group("gloo")
        try:
            main(dist.get_rank(), dist.get_world_size())
        finally:
            dist.destroy_process_group()
    else:
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_spawned, args=(2, os.path.join(tmp, "init")), nprocs=2, join=True)

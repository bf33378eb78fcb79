"""Data-parallel training (trainers/distributed.py) on CPU with the gloo backend, 2 processes.

- the user's path: ``torchrun --standalone --nproc_per_node 2 -m entropy_ops.trainers train`` for two
  steps, with ``--parallelism=ddp`` and ``--parallelism=fsdp``: exit 0, rank 0 alone logs and checkpoints
  (with both ranks' random states), DDP's replicas identical, FSDP's steps equal to DDP's;
- the math: a fixed rollout batch split by prompt group over 2 ranks gives, after ``Trainer.update``,
  the same gradients and parameters on each rank as one process updating on the whole batch (token-mean
  and per-response aggregations, micro-batches that do not divide the shards), and a rank left without
  any group (dynamic sampling) joins the reductions with zero gradients instead of hanging;
- sharding and bucketing helpers.
"""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from entropy_ops.trainers.algorithms import RolloutBatch
from entropy_ops.trainers.checkpoint import list_checkpoints, load_state
from entropy_ops.trainers.config import TrainConfig
from entropy_ops.trainers.distributed import DistContext, _buckets, shard_rows
from entropy_ops.trainers.grpo_trainer import Trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Pinned explicitly (not the defaults, which change with the task): the embedded tiny model, the arithmetic task.
BASE = dict(model="tiny-arith", dataset="arithmetic", arithmetic_digits=2, num_prompts=4, group_size=2,
            max_new_tokens=6, micro_batch_size=3, num_eval_prompts=4, eval_samples=1, eval_every=0, save_every=0,
            learning_rate=1e-3, seed=5, device="cpu", plot=False)


@pytest.fixture(autouse=True, scope="module")
def restore_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _torchrun_train(out, parallelism: str):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "entropy_ops.trainers", "train", "--max-steps", "2", "--output-dir", str(out),
           "--model=tiny-arith", "--dataset=arithmetic", "--arithmetic_digits=2", "--learning_rate=1e-4",
           "--num_prompts=4", "--group_size=4", "--max_new_tokens=6", "--num_eval_prompts=4", "--eval_samples=1",
           "--eval_every=0", "--plot=false", "--device=cpu", f"--parallelism={parallelism}"]
    proc = subprocess.run(cmd, cwd=out.parent, env=_clean_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2]  # one line per step: rank 0 alone logs
    for r in train:
        assert 0.0 <= r["reward/mean"] <= 1.0 and r["entropy"] > 0 and torch.isfinite(torch.tensor(r["loss/loss"]))
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [0, 2]
    summary = json.load(open(out / "summary.json"))
    assert summary["world_size"] == 2
    (step, path), = list_checkpoints(str(out))
    state = load_state(path)
    assert step == 2 and len(state["rng_ranks"]) == 2
    assert not torch.equal(state["rng_ranks"][0]["torch"], state["rng_ranks"][1]["torch"])  # rank streams differ
    return proc.stdout, train, summary


def test_torchrun_two_processes_two_steps_ddp_and_fsdp(tmp_path):
    """The user's command under both parallelisms; FSDP's steps are DDP's (same samples, loss, gradient norm)."""
    stdout, ddp, summary = _torchrun_train(tmp_path / "ddp", "ddp")
    assert "data parallel: 2 processes, replicas identical: True" in stdout
    assert summary["replica_max_abs_diff"] == 0.0
    stdout, fsdp, _ = _torchrun_train(tmp_path / "fsdp", "fsdp")
    assert "fully sharded (FSDP2): 2 processes" in stdout
    for a, b in zip(ddp, fsdp):
        for key in ("reward/mean", "completion_length/mean"):
            assert a[key] == b[key], key  # the same completions were sampled
        for key in ("loss/loss", "entropy", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key


# ---------------------------------------------------------------- gradient equivalence
# name: (algorithm, the rank left without groups or None); all run in one spawn of 2 processes.
CASES = {"grpo-seq-mean-token-mean": ("grpo", None), "dr-grpo-token-sum": ("dr-grpo", None),
         "rank1-empty": ("grpo", 1)}


def _config(tmp, name, loss_preset_algo):
    return TrainConfig.from_dict({**BASE, "algo": loss_preset_algo, "output_dir": os.path.join(str(tmp), name)})


def _fixed_batch(trainer, rollout, adv):
    """The RolloutBatch ``update`` needs, with the policy's own old log-probs (rewards are unused there)."""
    old_logp, old_H = trainer.score(trainer.model, rollout)
    B = len(rollout.completions)
    return RolloutBatch(prompts=rollout.prompts, completions=rollout.completions, group_size=trainer.config.group_size,
                        rewards=torch.zeros(B), correct=torch.zeros(B, dtype=torch.bool),
                        completion_mask=rollout.completion_mask, old_logprobs=old_logp, old_entropy=old_H)


def _update_and_collect(trainer, rollout, adv):
    if rollout is None:
        trainer.update(None, None, None, None)
    else:
        trainer.update(rollout, _fixed_batch(trainer, rollout, adv), adv, None)
    return ({n: p.grad.clone() for n, p in trainer.model.named_parameters()},
            {n: p.detach().clone() for n, p in trainer.model.named_parameters()})


def _worker(rank, world, port, tmp, rollout_path, results):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    rollout, adv = torch.load(rollout_path, weights_only=False)
    out = {}
    for case, (algo, empty_rank) in CASES.items():
        trainer = Trainer(_config(tmp, f"{case}-rank{rank}", algo))
        G, k = trainer.config.group_size, trainer.config.num_prompts // world
        rows = torch.arange(rank * k * G, (rank + 1) * k * G)
        if rank == empty_rank:
            out[case] = _update_and_collect(trainer, None, None)
        else:
            out[case] = _update_and_collect(trainer, rollout.select(rows), adv[rows])
    torch.save(out, os.path.join(results, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def updates(tmp_path_factory):
    """``{case: (reference (grads, params), [rank 0's, rank 1's])}`` after one ``Trainer.update``."""
    tmp = tmp_path_factory.mktemp("ddp")
    refs = {}
    for case, (algo, empty_rank) in CASES.items():
        single = Trainer(_config(tmp, f"single-{case}", algo))
        if not refs:
            torch.manual_seed(11)
            rollout = single.engine.generate([r["prompt"] for r in single.train_rows[:4]], num_samples=2,
                                             max_new_tokens=6, temperature=1.3)
            adv = torch.randn(len(rollout.completions))
            torch.save((rollout, adv), tmp / "rollout.pt")
        # The reference: one process, the whole batch (or only rank 0's half when rank 1 has none).
        ref_rows = torch.arange(len(rollout.completions)) if empty_rank is None else torch.arange(4)
        refs[case] = _update_and_collect(single, rollout.select(ref_rows), adv[ref_rows])
    results = tmp / "results"
    results.mkdir()
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp), str(tmp / "rollout.pt"), str(results)),
                       nprocs=2, join=True, start_method="spawn")
    ranks = [torch.load(results / f"rank{r}.pt") for r in range(2)]
    return {case: (refs[case], [ranks[0][case], ranks[1][case]]) for case in CASES}


@pytest.mark.parametrize("case", list(CASES))
def test_two_rank_update_equals_single_process(updates, case):
    (ref_grads, ref_params), per_rank = updates[case]
    for name, ref in ref_grads.items():
        g0, g1 = per_rank[0][0][name], per_rank[1][0][name]
        assert torch.equal(g0, g1), name  # identical replicas: the all-reduced sum is the same bytes
        scale = ref.abs().max().clamp_min(1e-12)
        assert (g0 - ref).abs().max() / scale < 1e-5, (name, float((g0 - ref).abs().max()), float(scale))
    nonzero = sum(float(g.abs().sum()) > 0 for g in ref_grads.values())
    assert nonzero > len(ref_grads) // 2  # a real gradient, not zeros on both sides
    for name, ref in ref_params.items():
        p0, p1 = per_rank[0][1][name], per_rank[1][1][name]
        assert torch.equal(p0, p1), name
        assert_adamw_close(p0, ref, [ref_grads[name]], BASE["learning_rate"], name)


def assert_adamw_close(param, ref, ref_grads, lr, name):
    """``param`` vs ``ref`` after ``len(ref_grads)`` AdamW steps whose gradients agree to 1e-5 of each tensor's largest.

    AdamW moves an element by about ``lr * g / (|g| + eps)`` per step. Where every step's reference
    gradient is at least 1e-3 of the tensor's largest, the gradient difference is at most 1% of ``g``
    and ``|g| >> eps``, so the steps agree to 1% of ``lr``. Elsewhere ``g`` is within the float32 noise
    of summing the batch in another order (e.g. the key-projection bias, whose exact gradient is 0), and
    its sign is noise too: there only AdamW's bound of about ``lr`` per step holds.
    """
    well_defined = torch.ones_like(ref, dtype=torch.bool)
    for g in ref_grads:
        well_defined &= g.abs() >= 1e-3 * g.abs().max()
    torch.testing.assert_close(param[well_defined], ref[well_defined], rtol=0, atol=1e-2 * lr, msg=name)
    assert float((param - ref).abs().max()) <= 2.0 * lr * len(ref_grads), name


# ---------------------------------------------------------------- helpers
def test_shard_rows_gives_whole_contiguous_shares():
    rows = list(range(8))
    assert shard_rows(rows, DistContext()) == rows
    assert [shard_rows(rows, DistContext(rank=r, world_size=4)) for r in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    with pytest.raises(ValueError, match=r"num_prompts \(6\) must be divisible by the number of processes \(4\)"):
        shard_rows(list(range(6)), DistContext(rank=0, world_size=4))


def test_buckets_split_by_size_and_dtype():
    ts = [torch.zeros(10), torch.zeros(10), torch.zeros(10, dtype=torch.float64), torch.zeros(30)]
    sizes = [[t.numel() for t in b] for b in _buckets(ts, bucket_bytes=80)]
    assert sizes == [[10, 10], [10], [30]]


def test_trainer_rejects_num_prompts_not_divisible(tmp_path, monkeypatch):
    from entropy_ops.trainers import grpo_trainer

    monkeypatch.setattr(grpo_trainer, "init_distributed", lambda device_type: DistContext(rank=0, world_size=3))
    with pytest.raises(ValueError, match=r"num_prompts \(4\) must be divisible"):
        Trainer(_config(tmp_path, "x", "grpo"))

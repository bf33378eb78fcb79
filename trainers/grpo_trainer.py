"""The step loop of the GRPO family: rollout, rewards, advantages, fused policy loss, optimizer.

One training step (:meth:`Trainer.train_step`):

1. draw ``num_prompts`` prompts and sample ``G = group_size`` completions each
   (transformers ``generate``: temperature, top-p, top-k, ``max_new_tokens``);
2. score them with the reward functions (weighted sum, each component logged);
   with ``dynamic_sampling``, drop the groups whose rewards are all equal;
3. one no-grad pass of the policy: the body's last hidden states at the
   completion positions and ``lm_head.weight`` go through the fused op
   ``linear_logprobs_and_entropy`` -> ``old_logprobs`` and the rollout entropy
   (and the reference model's log-probs when the loss has a KL term);
4. the algorithm plug-in turns the batch into advantages (``[B]`` or ``[B, T]``);
5. ``num_iterations`` optimizer passes over the batch, in micro-batches with
   gradient accumulation, each micro-batch's loss from the fused
   ``policy_loss(hidden=..., weight=lm_head.weight)``: the ``[N, V]`` logits are
   never materialized, and prompt positions never reach the vocabulary.

Micro-batch losses are weighted by their share of the batch's valid tokens
(``token-mean`` aggregation, and an algorithm's own loss, taken to be a token
mean) or of its responses (the per-response aggregations), so the accumulated
gradient is that of one pass over the whole batch. (The entropy mask's
quantile is taken per micro-batch.)

Under ``torchrun`` the step is data-parallel: each rank samples and trains on
its share of the prompt groups, and the gradients are summed over ranks once
per optimizer step (``distributed.py`` says how and why that is the
single-process step).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
import time
from functools import partial

import torch

from .advantages import groups_with_signal
from .algorithms import Algorithm, RolloutBatch, get_algorithm
from .checkpoint import (checkpoint_run_id, latest_checkpoint, load_state, rng_state, save_checkpoint,
                         set_rng_state)
from .config import TrainConfig
from .distributed import (all_reduce_sum, any_rank, broadcast_parameters, gather_objects,
                          init_distributed, replica_max_abs_diff, shard_rows, sum_gradients)
from .evaluation import evaluate
from .fsdp import apply as apply_fsdp
from .interrupt import GracefulStop
from .logging_utils import (EVAL_KEYS, MetricsLogger, format_line, is_terminal, peak_memory_mib, plot_metrics,
                            read_metrics)
from .model import (auto_threads, choose_attn_implementation, choose_device, choose_dtype, completion_hidden,
                    lm_head_of, load_model, load_tokenizer)
from .preflight import check_before_loading
from .rewards import MathCorrectness, build_rewards
from .rollout import Rollout, make_engine, sequence_inputs
from .run_folder import (RESUME_FREE, move_run_aside, new_run_id, read_run_id, record_resume, resume_changes,
                         write_run_file, write_yaml)
from .tasks import TASKS, PromptSampler, load_rows

IGNORE = -100


def lr_factor(step: int, *, warmup: int, total: int, schedule: str) -> float:
    """Learning-rate multiplier: linear warm-up over ``warmup`` steps, then constant / cosine / linear to 0."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress


class Trainer:
    """Builds everything from a :class:`TrainConfig` (validated first) and runs :meth:`train`."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = cfg = config.validate()
        self.output_dir = check_before_loading(cfg)
        from entropy_ops.linear_ops import linear_logprobs_and_entropy
        from entropy_ops.policy_loss import policy_loss

        self._linear_op, self._policy_loss = linear_logprobs_and_entropy, policy_loss
        self.device = choose_device(cfg.device)
        self.dist = init_distributed(self.device.type)
        if self.dist.enabled and self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", self.dist.local_rank)  # one GPU per process
        shard_rows(list(range(cfg.num_prompts)), self.dist)  # num_prompts divisible by the world size
        self.algorithm: Algorithm = get_algorithm(cfg.algo, **cfg.algo_options)
        self.custom_loss = self.algorithm.has_custom_loss
        self.reward_fn = build_rewards(cfg.rewards, answer_format=cfg.answer_format, max_new_tokens=cfg.max_new_tokens)
        self.correctness = MathCorrectness(cfg.answer_format)
        self.train_rows, self.eval_rows = load_rows(cfg)

        resume_from = latest_checkpoint(self.output_dir) if cfg.resume else None
        if cfg.resume and resume_from is None and self.dist.is_main:
            print(f"resume: no checkpoint in {self.output_dir}, starting a new run from step 0", file=sys.stderr)
        random.seed(cfg.seed + self.dist.rank)  # rank 0's streams are the single-process ones
        torch.manual_seed(cfg.seed + self.dist.rank)
        dtype = choose_dtype(cfg.dtype, self.device)
        attn = choose_attn_implementation(cfg.attn_implementation, self.device)
        # FSDP loads on the CPU: fully_shard then moves the model to the device one unit (block) at a time
        load_on = torch.device("cpu") if cfg.parallelism == "fsdp" and self.dist.enabled else self.device
        self.model = load_model(resume_from or cfg.model, device=load_on, dtype=dtype, attn_implementation=attn)
        self.tokenizer = load_tokenizer(resume_from or cfg.model)
        broadcast_parameters(self.model, self.dist)
        self.head = lm_head_of(self.model)
        threads = cfg.torch_threads or auto_threads(self.model, self.device)
        if threads:
            torch.set_num_threads(threads)
        loss_config = cfg.loss_config(self.algorithm.loss_preset, dict(self.algorithm.loss_overrides))
        self.loss_config = dataclasses.replace(loss_config, temperature=self.head.op_temperature(cfg.temperature))
        self.ref_model = None
        if self.loss_config.beta > 0 or self.algorithm.needs_reference:
            self.ref_model = load_model(cfg.ref_model or cfg.model, device=load_on, dtype=dtype,
                                        attn_implementation=attn).requires_grad_(False)
        self.engine = make_engine(cfg.rollout_engine, self.model, self.tokenizer, **cfg.rollout_engine_options)
        # parallelism 'fsdp': shard the model (before the optimizer), route head, engine and losses through it
        self.fsdp = apply_fsdp(self) if cfg.parallelism == "fsdp" else None
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                           betas=(cfg.adam_beta1, cfg.adam_beta2))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, partial(
            lr_factor, warmup=cfg.warmup_steps, total=cfg.max_steps, schedule=cfg.lr_schedule))
        self.sampler = PromptSampler(self.train_rows, cfg.seed)
        self.step = 0
        if resume_from is not None:
            state = load_state(resume_from)
            if self.fsdp is not None:
                self.fsdp.load_optimizer_state(self.optimizer, state["optimizer"])
            else:
                self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.sampler.load_state_dict(state["sampler"])
            ranks = state.get("rng_ranks")
            if ranks is not None and len(ranks) == self.dist.world_size:
                set_rng_state(ranks[self.dist.rank])
            elif self.dist.rank == 0:
                set_rng_state(state["rng"])
            else:  # saved with another world size: a fresh stream per rank and step
                torch.manual_seed(cfg.seed + self.dist.rank + 100_003 * int(state["step"]))
            self.step = int(state["step"])
        self.resumed_from = resume_from
        self.logger = None  # rank 0 alone logs and writes files
        self.run_id = None
        if self.dist.is_main:
            self.run_id = self._open_run_folder(resume_from)

    def _open_run_folder(self, resume_from: str | None) -> str:
        """Create (or continue) the run folder, its ``run.json`` and the metrics log. Returns the run id."""
        cfg, log_path = self.config, os.path.join(self.output_dir, "metrics.jsonl")
        task = cfg.dataset if cfg.dataset in TASKS else os.path.basename(cfg.dataset)
        print(f"training {cfg.algo} on {cfg.model}, task {task}, {cfg.max_steps} steps (seed {cfg.seed}, "
              f"lr {cfg.learning_rate:g}) -> {self.output_dir}")
        if cfg.overwrite:
            moved = move_run_aside(self.output_dir)
            if moved:
                print(f"overwrite: the previous run in {self.output_dir} was moved to {moved}", file=sys.stderr)
        os.makedirs(self.output_dir, exist_ok=True)
        run_id = None
        if resume_from is not None:  # continue the run's id (a checkpoint from before run ids: a new one)
            run_id = read_run_id(self.output_dir) or checkpoint_run_id(resume_from)
            print(f"resuming from {resume_from} (step {self.step})")
        if run_id is None:
            run_id = new_run_id()
            write_run_file(self.output_dir, run_id, algo=cfg.algo, seed=cfg.seed, model=cfg.model,
                           resumed_from=resume_from)
        self.logger = MetricsLogger(log_path, append=True)  # never truncated
        values = cfg.to_dict()
        if resume_from is not None:  # rows logged after the checkpoint are superseded, not deleted
            changes = resume_changes(self.output_dir, cfg)  # the saved settings, before config.yaml is rewritten
            for key, (old, new) in changes.items():
                note = "" if key in RESUME_FREE else " (this changes the experiment; recorded in run.json)"
                print(f"resume: {key} {old!r} -> {new!r}{note}", file=sys.stderr)
            record_resume(self.output_dir, self.step, os.path.basename(resume_from), changes)
            self.logger.log(self.step, "resume", {"checkpoint": os.path.basename(resume_from), "run_id": run_id,
                                                  "changed": changes})
            values.update(resume=False, overwrite=False)  # config.yaml: the run's settings, not this command's
        write_yaml(os.path.join(self.output_dir, "config.yaml"), values)
        return run_id

    # ------------------------------------------------------------------ scoring
    def fused_logprobs(self, model, head, rollout: Rollout, *, with_grad: bool, rows: slice, entropy: bool = True):
        """Per-token ``(logp, H)`` ``[b, T]`` of ``rollout[rows]`` from hidden states and the lm-head weight."""
        ids, attn, pos = sequence_inputs(rollout.prompt_ids[rows], rollout.prompt_mask[rows],
                                         rollout.completion_ids[rows], rollout.completion_mask[rows])
        with torch.set_grad_enabled(with_grad):
            hidden = completion_hidden(model, ids, attn, pos, rollout.prompt_ids.shape[1])
            targets = rollout.completion_ids[rows].masked_fill(~rollout.completion_mask[rows], IGNORE)
            return self._linear_op(hidden, head.weight, targets, bias=head.bias,
                                   temperature=head.op_temperature(self.config.temperature), ignore_index=IGNORE,
                                   return_entropy=entropy, logit_softcap=head.logit_softcap, backend=self.config.backend)

    @torch.no_grad()
    def score(self, model, rollout: Rollout, *, entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """No-grad ``(logp, H)`` ``[B, T]`` fp32 of the whole rollout, zero where the mask is False."""
        head = self.head if model is self.model else lm_head_of(model)
        mask = rollout.completion_mask
        logps, ents = [], []
        for rows in self._micro_batches(len(rollout.completions)):
            logp, H = self.fused_logprobs(model, head, rollout, with_grad=False, rows=rows, entropy=entropy)
            logps.append(logp.float() * mask[rows])
            if entropy:
                ents.append(H.float() * mask[rows])
        return torch.cat(logps), (torch.cat(ents) if entropy else None)

    def _micro_batches(self, n: int) -> list[slice]:
        m = self.config.micro_batch_size
        return [slice(i, min(i + m, n)) for i in range(0, n, m)]

    # ------------------------------------------------------------------- a step
    def rollout_batch(self, rows: list[dict]) -> tuple[Rollout, RolloutBatch, dict]:
        """Sample, reward, (dynamic sampling), score. Returns the rollout, the algorithm's batch, metrics."""
        cfg, G = self.config, self.config.group_size
        t0 = time.perf_counter()
        rollout = self.engine.generate([r["prompt"] for r in rows], num_samples=G, max_new_tokens=cfg.max_new_tokens,
                                       temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)
        t_gen = time.perf_counter() - t0
        fields = {k: [r.get(k) for r in rows for _ in range(G)] for k in rows[0] if k != "prompt"}
        lengths = rollout.completion_lengths
        total, components = self.reward_fn(rollout.prompts, rollout.completions,
                                           completion_lengths=lengths.tolist(), **fields)
        rewards = torch.tensor(total, dtype=torch.float32)
        pre_drop = {"reward/mean": (rewards.sum().item(), len(rewards)),
                    "completion_length/mean": (lengths.sum().item(), len(lengths))}
        metrics = {"reward/mean": rewards.mean(), "reward/std": rewards.std(), "time/generate_s": t_gen,
                   "completion_length/mean": lengths.float().mean(), "completion_length/max": lengths.max(),
                   "completion_length/truncated_frac": rollout.truncated.float().mean(),
                   "throughput/gen_tokens_per_s": lengths.sum().item() / max(t_gen, 1e-9)}
        for name, values in components.items():
            v = torch.tensor(values)
            metrics[f"reward/{name}/mean"], metrics[f"reward/{name}/std"] = v.mean(), v.std()
        if cfg.dynamic_sampling:
            keep = groups_with_signal(rewards, G).repeat_interleave(G).nonzero().squeeze(1)
            metrics["dynamic_sampling/kept_frac"] = len(keep) / len(rewards)
            rollout, rewards = rollout.select(keep), rewards[keep]
            components = {k: [v[i] for i in keep.tolist()] for k, v in components.items()}
            fields = {k: [v[i] for i in keep.tolist()] for k, v in fields.items()}
        if "correctness" in components:
            correct = torch.tensor(components["correctness"]) > 0
        elif "answer" in fields:
            correct = torch.tensor(self.correctness(rollout.prompts, rollout.completions, answer=fields["answer"])) > 0
        else:
            correct = torch.zeros(len(rewards), dtype=torch.bool)
        metrics["_sums"] = dict(pre_drop)
        if len(rewards) == 0:
            return rollout, None, metrics
        old_logp, old_H = self.score(self.model, rollout)
        batch = RolloutBatch(
            prompts=rollout.prompts, completions=rollout.completions, group_size=G, rewards=rewards.to(self.device),
            correct=correct.to(self.device), completion_mask=rollout.completion_mask,
            old_logprobs=old_logp, old_entropy=old_H,
            answers=[self.correctness.extract(c) for c in rollout.completions],
            reward_components={k: torch.tensor(v, device=self.device) for k, v in components.items()},
            extras=fields,
        )
        valid = rollout.completion_mask
        metrics["entropy"] = (old_H.sum() / valid.sum().clamp_min(1)).item()
        metrics["correct_frac"] = correct.float().mean()
        metrics["_sums"].update({"entropy": (old_H.sum().item(), valid.sum().item()),
                                 "correct_frac": (correct.float().sum().item(), len(correct))})
        return rollout, batch, metrics

    def train_step(self) -> dict:
        """One step: rollout batch, advantages, ``num_iterations`` optimizer passes. Returns the step's metrics."""
        cfg = self.config
        t0 = time.perf_counter()
        rows = shard_rows(self.sampler.sample(cfg.num_prompts), self.dist)
        rollout, batch, metrics = self.rollout_batch(rows)
        self._globalize(metrics)
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        if batch is None and not self.dist.enabled:  # dynamic sampling dropped every group: nothing to learn from
            metrics["skipped"] = 1.0
            self.scheduler.step()
            return metrics
        if batch is None:  # this rank has nothing, others may: join the step's collectives with zero gradients
            metrics.update(self.update(rollout, None, None, None))
            self.scheduler.step()
            return metrics
        ref_logp = self.score(self.ref_model, rollout, entropy=False)[0] if self.ref_model is not None else None
        adv = self.algorithm.advantages(batch)
        B, T = batch.completion_mask.shape
        if tuple(adv.shape) not in ((B,), (B, T)):
            raise ValueError(f"algorithm {self.algorithm.name!r} returned advantages of shape {tuple(adv.shape)}, "
                             f"expected ({B},) or ({B}, {T})")
        adv = adv.float().to(self.device)
        metrics.update(self.algorithm.step_metrics(batch, adv))  # the algorithm's mechanism check
        metrics.update({"advantage/mean": adv.mean(), "advantage/std": adv.std(), "advantage/min": adv.min(),
                        "advantage/max": adv.max()})
        t1 = time.perf_counter()
        metrics.update(self.update(rollout, batch, adv, ref_logp))
        self.scheduler.step()
        now = time.perf_counter()
        n_tokens = int(rollout.prompt_mask.sum() + rollout.completion_mask.sum())
        metrics.update({"time/update_s": now - t1, "time/step_s": now - t0,
                        "throughput/tokens_per_s": n_tokens / (now - t0), **peak_memory_mib(self.device)})
        return metrics

    def _globalize(self, metrics: dict) -> None:
        """Replace the rank-local means listed in ``metrics["_sums"]`` by means over all ranks."""
        sums = metrics.pop("_sums")
        if not self.dist.enabled:
            return
        keys = ("reward/mean", "completion_length/mean", "entropy", "correct_frac")
        local = torch.tensor([v for k in keys for v in sums.get(k, (0.0, 0))], dtype=torch.float64)
        total = all_reduce_sum(local, self.dist).view(-1, 2)
        for key, (value, count) in zip(keys, total.tolist()):
            if count > 0:
                metrics[key] = value / count
            else:
                metrics.pop(key, None)

    def update(self, rollout: Rollout, batch: RolloutBatch | None, adv, ref_logp) -> dict:
        """``num_iterations`` optimizer steps over the batch, with gradient accumulation over micro-batches.

        ``batch`` is None on a rank left without groups (dynamic sampling) in a distributed run:
        it takes part in the reductions with zero gradients.
        """
        cfg = self.config
        per_token = (self.algorithm.loss_aggregation == "token") if self.custom_loss else (
            self.loss_config.aggregation == "token-mean")
        if batch is not None:
            mask = batch.completion_mask
            targets = rollout.completion_ids.masked_fill(~mask, IGNORE)
            sizes = mask.sum(1) if per_token else (mask.sum(1) > 0).long()
        else:
            sizes = torch.zeros(0, dtype=torch.long, device=self.device)
        total = all_reduce_sum(sizes.sum(), self.dist)  # the global batch's tokens (or responses)
        if int(total) == 0:  # possible only for a batch of empty completions
            return {"skipped": 1.0}
        sums: dict[str, float] = {}
        extremes: dict[str, float] = {}
        grad_norms = []
        params = [p for p in self.model.parameters() if p.requires_grad]
        for _ in range(cfg.num_iterations):
            self.optimizer.zero_grad(set_to_none=True)
            for rows in self._micro_batches(0 if batch is None else len(batch.completions)):
                weight = (sizes[rows].sum() / total).item()
                if weight == 0:
                    continue
                loss, parts = self._micro_batch_loss(rollout, rows, targets, adv, batch, ref_logp)
                (loss * weight).backward()
                parts = {"loss": loss.detach(), **parts}
                for k, v in parts.items():
                    v = float(v)
                    if k.endswith(("_max", "_min")):
                        pick = max if k.endswith("_max") else min
                        extremes[k] = pick(extremes.get(k, v), v)
                    else:
                        sums[k] = sums.get(k, 0.0) + weight * v / cfg.num_iterations
            sum_gradients(params, self.dist)  # every replica now holds the full batch's gradient
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
            grad_norms.append(float(norm))
            self.optimizer.step()
            self.engine.update_weights(self.model)  # a separate engine (vLLM) samples the next batch from these
        if self.dist.enabled:  # loss terms: weighted sums add over ranks, extremes reduce (a rank may have none)
            gathered = gather_objects((sums, extremes), self.dist)
            sums, extremes = {}, {}
            for rank_sums, rank_extremes in gathered:
                for k, v in rank_sums.items():
                    sums[k] = sums.get(k, 0.0) + v
                for k, v in rank_extremes.items():
                    extremes[k] = (max if k.endswith("_max") else min)(extremes.get(k, v), v)
        return {**{f"loss/{k}": v for k, v in {**sums, **extremes}.items()}, "grad_norm": sum(grad_norms) / len(grad_norms)}

    def _micro_batch_loss(self, rollout, rows, targets, adv, batch, ref_logp):
        ref = None if ref_logp is None else ref_logp[rows]
        if self.custom_loss:  # e.g. EM-FT: the algorithm's own loss on (logp, H) from the fused op
            logp, H = self.fused_logprobs(self.model, self.head, rollout, with_grad=True, rows=rows)
            return self.algorithm.loss(logp, H, batch.completion_mask[rows], ref, advantages=adv[rows],
                                       old_logprobs=batch.old_logprobs[rows])
        ids, attn, pos = sequence_inputs(rollout.prompt_ids[rows], rollout.prompt_mask[rows],
                                         rollout.completion_ids[rows], rollout.completion_mask[rows])
        hidden = completion_hidden(self.model, ids, attn, pos, rollout.prompt_ids.shape[1])
        return self._policy_loss(
            targets=targets[rows], mask=batch.completion_mask[rows], advantages=adv[rows], hidden=hidden,
            weight=self.head.weight, bias=self.head.bias, old_logprobs=batch.old_logprobs[rows], ref_logprobs=ref,
            config=self.loss_config, ignore_index=IGNORE, logit_softcap=self.head.logit_softcap,
            backend=self.config.backend,
        )

    # ----------------------------------------------------------------- the run
    def evaluate(self) -> dict:
        return evaluate(self, self.eval_rows)

    def save(self) -> str:
        """Write a checkpoint (rank 0; every rank contributes its random state). Returns its path ("" off rank 0)."""
        rng_ranks = gather_objects(rng_state(), self.dist)
        full = self.fsdp.checkpoint_parts(self.optimizer) if self.fsdp is not None else None  # every rank gathers
        if not self.dist.is_main:
            return ""
        model, optimizer_state = full if full is not None else (self.model, self.optimizer.state_dict())
        state = {"optimizer": optimizer_state, "scheduler": self.scheduler.state_dict(),
                 "sampler": self.sampler.state_dict(), "rng": rng_ranks[0]}
        if self.dist.enabled:
            state["rng_ranks"] = rng_ranks
        return save_checkpoint(self.output_dir, self.step, model=model, tokenizer=self.tokenizer, state=state,
                               keep=self.config.keep_checkpoints, run_id=self.run_id)

    def train(self) -> dict:
        """Run to ``max_steps`` (evaluating, logging, saving); Ctrl-C saves a checkpoint, then stops.

        After Ctrl-C the checkpoint is saved first, then the held-out set is evaluated at the stop
        (a second Ctrl-C skips that evaluation). Returns a summary: first and last evaluation, steps,
        wall time, output paths, ``interrupted``, ``resumed_from`` (and, in a distributed run,
        ``replica_max_abs_diff``: 0.0 when the replicas stayed identical).
        """
        from tqdm.auto import tqdm

        cfg, main = self.config, self.dist.is_main
        t0 = time.perf_counter()
        # A progress bar only on a terminal: written to a file, its redraws are unreadable (the
        # metrics lines every log_every steps are the progress there).
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc=f"{cfg.algo}", dynamic_ncols=True,
                   disable=not main or not is_terminal(sys.stderr))
        logged = read_metrics(self.logger.path) if self.resumed_from and main else []
        last_eval = self.step if any(r["kind"] == "eval" and r["step"] == self.step for r in logged) else None
        last_saved = self.step if self.resumed_from else None  # the checkpoint we started from
        evaluating = bool(self.eval_rows) and (main or self.fsdp is not None)  # FSDP: every rank runs the shards
        stopped = False
        with GracefulStop() as stop:
            try:
                if self.step == 0 and evaluating and cfg.eval_at_start:
                    self._log_eval(bar)
                    last_eval = self.step
                while self.step < cfg.max_steps:
                    stopped = any_rank(stop.requested, self.dist)  # every rank stops at the same step
                    if stopped:
                        break
                    metrics = self.train_step()
                    self.step += 1
                    if main:
                        self.logger.log(self.step, "train", metrics)
                    bar.update(1)
                    bar.set_postfix(reward=f"{float(metrics['reward/mean']):.3f}",
                                    H=f"{metrics.get('entropy', float('nan')):.3f}")
                    if self.step % cfg.log_every == 0 and main:
                        bar.write(format_line(self.step, metrics))
                    if cfg.eval_every and self.step % cfg.eval_every == 0 and evaluating:
                        self._log_eval(bar)
                        last_eval = self.step
                    if cfg.save_every and self.step % cfg.save_every == 0:
                        self.save()
                        last_saved = self.step
                if not stopped and evaluating and last_eval != self.step:
                    self._log_eval(bar)
                if last_saved != self.step:
                    path = self.save()
                    if main:
                        bar.write(f"saved {path}")
                if stopped and evaluating and last_eval != self.step:  # the checkpoint is safe: now evaluate
                    if main:
                        bar.write(f"evaluating the held-out set at step {self.step} (Ctrl-C again skips it)")
                    try:
                        self._log_eval(bar)
                    except KeyboardInterrupt:
                        if main:
                            bar.write("held-out evaluation at the stop skipped")
            finally:
                bar.close()
                if self.logger is not None:
                    self.logger.close()
        summary = {"output_dir": self.output_dir, "steps": self.step, "wall_s": round(time.perf_counter() - t0, 1),
                   "interrupted": stopped, "resumed_from": self.resumed_from, "run_id": self.run_id}
        if self.dist.enabled:
            summary.update(world_size=self.dist.world_size, replica_max_abs_diff=replica_max_abs_diff(self.model, self.dist))
        if not main:
            return summary
        evals = [r for r in read_metrics(self.logger.path) if r["kind"] == "eval"]  # a resumed run's too
        summary.update(first_eval=evals[0] if evals else None, last_eval=evals[-1] if evals else None)
        if cfg.plot:
            title = f"{self.output_dir}: {self.algorithm.name}, seed {cfg.seed}, {self.step} steps"
            summary["plot"] = plot_metrics(self.logger.path, os.path.join(self.output_dir, "metrics.png"), title=title)
        with open(os.path.join(self.output_dir, "summary.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
        return summary

    def _log_eval(self, bar) -> None:
        metrics = self.evaluate()
        if self.logger is None:  # FSDP, rank > 0: took part in the sharded forward passes only
            return
        self.logger.log(self.step, "eval", metrics)
        bar.write(format_line(self.step, metrics, EVAL_KEYS) + "  (held-out)")

"""Fully sharded data parallelism (FSDP2, ``torch.distributed.fsdp.fully_shard``) for the trainer.

Switched on with ``parallelism: fsdp`` under ``torchrun`` (``docs/distributed.md``). The step is the
data-parallel step of ``distributed.py`` (each rank samples and trains on its ``num_prompts / W``
prompt groups, micro-batch losses weighted by their share of the global batch), with the model
state sharded instead of replicated:

- **loading**: the trainer loads the model on the CPU (each rank a full copy in host memory);
  ``fully_shard`` moves each unit to the device as it shards it, so a device holds at most the
  shards so far plus one unit in full.
- **units**: every transformer block (the classes in the model's ``_no_split_modules``) is one FSDP
  unit; everything else (token embeddings, final norm, ``lm_head``, tied or not) belongs to the root
  unit, a thin wrapper module around the Hugging Face model. Each rank keeps a dim-0 shard (a
  ``DTensor``) of every parameter, of its gradient and of AdamW's two moments (the optimizer is
  built on the sharded parameters): ``1/W`` of each.
- **the fused op sees the full lm_head weight**: FSDP2 all-gathers a unit's parameters in that
  unit's forward pre-hook, and the trainer never calls the model's own ``forward`` (it runs the
  body, then hands ``lm_head.weight`` to the fused op). So every computation on the policy (the
  micro-batch loss, scoring, generation) runs *inside the root wrapper's forward*
  (``_Root.forward(fn) = fn()``): the root unit is unsharded there, and ``LiveHead`` reads the
  module's current ``lm_head`` parameter on each access, i.e. the full ``[V, D]`` weight (the
  ``LMHead`` captured at load time would hold the sharded ``DTensor``). The root unit stays
  unsharded through backward; FSDP's end-of-backward callback reduce-scatters its gradient and
  reshards it.
- **mixed precision** (``fsdp_compute_dtype``, off by default): FSDP2's ``MixedPrecisionPolicy``
  all-gathers the parameters cast to e.g. bfloat16, so the body, the fused op (hidden states and
  the full lm_head weight) and sampling compute in it, while the shards, their float32-reduced
  gradients and AdamW's moments stay in the parameters' dtype (``dtype: float32``: fp32 master
  weights, ``16 P / W`` bytes per rank).
- **sum, not mean**: the micro-batch weights already make the per-rank gradients add up to the
  global batch's gradient, so the reduce-scatter sums (gradient divide factor 1; FSDP's default
  divides by ``W``), with a plain ``SUM`` reduction (gloo has no ``PREMUL_SUM``).
- **generation** (``ShardedEngine``, ``fsdp_generation``) runs inside the root's forward too.
  ``full`` (default): every unit is all-gathered once and kept unsharded for the whole ``generate``
  call (one all-gather per unit and call, not per token), then resharded; peak memory is the full
  parameters in their dtype, plus the KV cache. ``blockwise``: each block is all-gathered for its
  forward at every decoding step and resharded after it (peak: the root unit and about two
  blocks; traffic: the model once per token), with the ranks in lockstep (``synced_gpus``).
- **clipping**: ``torch.nn.utils.clip_grad_norm_`` accepts the sharded ``DTensor`` gradients; the
  global norm is ``sqrt(sum_r ||g_r||^2)`` over the shards (one all-reduce).
- **checkpoints** (``checkpoint_parts``, ``load_optimizer_state``): the full weights
  (``get_model_state_dict(full_state_dict=True, cpu_offload=True)``) and the optimizer state (each
  sharded moment all-gathered in turn) are gathered to rank 0's CPU and written in the
  data-parallel format: ``model.safetensors`` by ``save_pretrained`` and the optimizer state keyed
  by parameter index in ``trainer_state.pt``, so a checkpoint resumes under either parallelism and
  another world size. A resume reloads the full weights on every rank, shards them again and keeps
  each rank's slice of the optimizer state: it continues bit for bit.
- **evaluation** runs on every rank (same prompts, same seed, same sampled completions), because
  scoring goes through the sharded units' collectives; rank 0 alone logs it.

Not combined with FSDP (``check_config`` refuses them at validation): ``dynamic_sampling`` (ranks
would run different numbers of forward passes, and every pass is a collective) and
``rollout_engine: vllm`` (its weight sync reads the unsharded model). The frozen reference model of
a KL term (or of an algorithm that needs one) is sharded the same way, with its own root wrapper.
"""
from __future__ import annotations

import sys

import torch
from torch import nn

GENERATION_MODES = ("full", "blockwise")  # ShardedEngine
COMPUTE_DTYPES = ("bfloat16", "float16")  # MixedPrecisionPolicy.param_dtype


def check_config(config) -> None:
    """Raise ``ValueError`` for a bad ``fsdp_generation`` or options that do not combine with ``parallelism: fsdp``."""
    if config.fsdp_generation not in GENERATION_MODES:
        raise ValueError(f"fsdp_generation must be one of {GENERATION_MODES}, got {config.fsdp_generation!r}")
    if config.fsdp_compute_dtype not in (None, *COMPUTE_DTYPES):
        raise ValueError(f"fsdp_compute_dtype must be null or one of {COMPUTE_DTYPES}, "
                         f"got {config.fsdp_compute_dtype!r}")
    if config.parallelism != "fsdp":
        if config.fsdp_compute_dtype is not None:
            raise ValueError("fsdp_compute_dtype needs parallelism 'fsdp'")
        return
    if config.dynamic_sampling:
        raise ValueError("parallelism 'fsdp' does not support dynamic_sampling: ranks left with different numbers "
                         "of groups would run different numbers of sharded forward passes")
    if config.rollout_engine != "hf":
        raise ValueError(f"parallelism 'fsdp' needs rollout_engine 'hf', got {config.rollout_engine!r}: "
                         "the engine's weight sync reads unsharded parameters")


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: modules whose class is named in ``model._no_split_modules``."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"{type(model).__name__}: no transformer blocks to shard (its _no_split_modules "
                         f"{sorted(names)} name no submodule)")
    return blocks


class _Root(nn.Module):
    """FSDP's root unit: owns the parameters outside the blocks; its forward runs a closure."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fn):
        return fn()


class LiveHead:
    """The output head as ``read(model)`` returns it now, read afresh on every attribute access.

    Inside the root's forward this is the unsharded ``lm_head`` parameter; outside it, the shard.
    """

    def __init__(self, model: nn.Module, read) -> None:
        self._model, self._read = model, read

    def __getattr__(self, name):
        return getattr(self._read(self._model), name)


class ShardedPolicy:
    """A Hugging Face causal LM sharded with ``fully_shard`` over all ranks of the default group.

    ``run(fn)`` calls ``fn()`` inside the root unit's forward (nested calls run directly);
    ``run(fn, full=True)`` first unshards every unit and keeps them unsharded until ``fn``
    returns. Every unit is resharded when ``fn``'s output holds no tensor that requires grad (and
    by FSDP's backward otherwise), so the module's parameters are the sharded ones whenever the
    optimizer runs: a loss computed under ``run`` must be backpropagated before the next step.
    """

    def __init__(self, model: nn.Module, device: torch.device, compute_dtype: torch.dtype | None = None) -> None:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        from torch.distributed.tensor import DTensor

        self.model = model
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        # compute_dtype: the all-gathered (unsharded) parameters are cast to it; gradients are
        # reduce-scattered in float32 into shards of the parameters' own dtype (see fsdp_compute_dtype)
        mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32 if compute_dtype else None)
        self.blocks = [fully_shard(block, mesh=mesh, reshard_after_forward=True, mp_policy=mp)
                       for block in transformer_blocks(model)]
        self.root = fully_shard(_Root(model), mesh=mesh, mp_policy=mp)
        self.units = [self.root, *self.blocks]
        for unit in self.units:
            unit.set_gradient_divide_factor(1.0)  # sum over ranks: see the module docstring
            unit.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)
        self._depth = 0
        with torch.no_grad():  # resharded after it: the optimizer must be built on the shards
            self.run(lambda: None)  # the first forward decides FSDP's root: it must be the wrapper's
        unsharded = [n for n, p in model.named_parameters() if not isinstance(p, DTensor)]
        if unsharded:
            raise RuntimeError(f"parameters left unsharded after fully_shard: {unsharded[:4]}")

    def run(self, fn, *, full: bool = False):
        if self._depth:
            return fn()
        self._depth += 1
        backward_pending = False  # until fn returns an output with an autograd graph
        try:
            if full:
                for unit in self.units:
                    unit.unshard()
                for block in self.blocks:
                    block.set_reshard_after_forward(False, recurse=False)
            out = self.root(fn)
            backward_pending = _requires_grad(out)
            return out
        finally:
            self._depth -= 1
            if full:
                for block in self.blocks:
                    block.set_reshard_after_forward(True, recurse=False)
            if full or not backward_pending:
                for unit in self.units:
                    unit.reshard()

    def wrap(self, method):
        """``method`` run inside the root's forward (for the trainer's loss and scoring methods)."""
        def inside_root(*args, **kwargs):
            return self.run(lambda: method(*args, **kwargs))

        inside_root.__wrapped__ = method
        return inside_root

    # ------------------------------------------------------------- checkpoints
    def checkpoint_parts(self, optimizer):
        """``(model for save_pretrained, optimizer state dict)`` on rank 0, ``(None, None)`` elsewhere.

        Collective: every rank calls it. Both are full (unsharded) CPU copies: the weights from
        ``get_model_state_dict(full_state_dict=True, cpu_offload=True)``, the optimizer state as
        ``Optimizer.state_dict()`` of the unsharded model (keyed by parameter index), each sharded
        state tensor all-gathered in turn.
        """
        import torch.distributed as dist
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        weights = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        main = dist.get_rank() == 0
        sharded = optimizer.state_dict()
        state = {}
        for index, entries in sharded["state"].items():  # the same order on every rank
            full = {key: _gathered(value) for key, value in entries.items()}
            if main:
                state[index] = full
        if not main:
            return None, None
        return _FullWeights(self.model, weights), {"state": state, "param_groups": sharded["param_groups"]}

    def load_optimizer_state(self, optimizer, state: dict) -> None:
        """Load a full, index-keyed optimizer state dict (any world size, either parallelism).

        Every rank holds the whole dict (read from the checkpoint) and keeps its own shard of each
        state tensor (the parameter's placements, sliced locally: no communication).
        """
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if len(params) != sum(len(g["params"]) for g in state["param_groups"]):
            raise ValueError("the checkpoint's optimizer state does not match the model's parameters")
        local = {index: {key: _sharded_like(value, params[int(index)]) for key, value in entries.items()}
                 for index, entries in state["state"].items()}
        optimizer.load_state_dict({"state": local, "param_groups": state["param_groups"]})


def _requires_grad(out) -> bool:
    """Whether ``out`` (a tensor, or tuples, lists and dicts of them) holds a tensor that requires grad."""
    if isinstance(out, torch.Tensor):
        return out.requires_grad
    if isinstance(out, (tuple, list)):
        return any(_requires_grad(o) for o in out)
    if isinstance(out, dict):
        return any(_requires_grad(o) for o in out.values())
    return False


def _gathered(value):
    """A state entry unsharded to the CPU (a ``DTensor`` is all-gathered; anything else is returned as is)."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor().cpu() if isinstance(value, DTensor) else value


def _sharded_like(value, param):
    """``value`` (a full tensor shaped like ``param``) cut to this rank's shard of the sharded ``param``."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not (isinstance(param, DTensor) and isinstance(value, torch.Tensor) and value.shape == param.shape):
        return value
    return distribute_tensor(value.to(param.to_local().device), param.device_mesh, param.placements,
                             src_data_rank=None)


class ShardedEngine:
    """A rollout engine whose ``generate`` runs inside the root's forward, in one of two modes.

    ``"full"``: every unit is all-gathered once per ``generate`` call and kept unsharded to its end
    (``ShardedPolicy.run(full=True)``): one all-gather of the model per call, peak memory the full
    parameters; ranks may stop after different numbers of tokens.
    ``"blockwise"``: the root unit (embeddings, lm_head) is unsharded, and each block is all-gathered
    for its forward and resharded after it, at every decoding step: peak memory the root unit and
    about two blocks, but the whole model crosses the network once per generated token. Every rank
    must then run the same number of steps: transformers' ``generate`` does (``synced_gpus``, chosen
    by it for a module that carries ``_is_fsdp_managed_module``), running dummy steps on a rank whose
    completions have all ended until every rank's have.
    """

    def __init__(self, engine, policy: ShardedPolicy, mode: str = "full") -> None:
        if mode not in GENERATION_MODES:
            raise ValueError(f"fsdp_generation must be one of {GENERATION_MODES}, got {mode!r}")
        self._engine, self._policy, self.mode = engine, policy, mode

    def generate(self, *args, **kwargs):
        def call():
            return self._engine.generate(*args, **kwargs)

        if self.mode == "full":
            return self._policy.run(call, full=True)
        model = self._policy.model
        model._is_fsdp_managed_module = True
        try:
            return self._policy.run(call)
        finally:
            del model._is_fsdp_managed_module

    def update_weights(self, model) -> None:
        self._engine.update_weights(model)

    def __getattr__(self, name):
        return getattr(self._engine, name)


class _FullWeights:
    """What ``save_checkpoint`` needs of a model: ``save_pretrained`` writing the gathered full weights."""

    def __init__(self, model: nn.Module, state_dict: dict) -> None:
        self._model, self._state_dict = model, state_dict

    def save_pretrained(self, path: str, **kwargs) -> None:
        self._model.save_pretrained(path, state_dict=self._state_dict, **kwargs)


def apply(trainer):
    """Shard ``trainer.model`` over the ranks and route the trainer's policy computations through the root.

    Shards ``trainer.ref_model`` too, when there is one. Replaces, on the trainer instance: ``head``
    (a ``LiveHead``), ``engine`` (a ``ShardedEngine``), and the methods ``fused_logprobs`` (run
    inside the root of the model it scores) and ``_micro_batch_loss`` (inside the policy's root).
    Returns the ``ShardedPolicy``, or None for a single process (nothing to shard). Call it before
    the optimizer is built: the optimizer must hold the sharded parameters.
    """
    if not trainer.dist.enabled:
        print("parallelism 'fsdp' with one process: nothing to shard, training unsharded", file=sys.stderr)
        return None
    from .model import lm_head_of

    compute = trainer.config.fsdp_compute_dtype
    compute = None if compute is None else getattr(torch, compute)
    policy = ShardedPolicy(trainer.model, trainer.device, compute)
    trainer.head = LiveHead(trainer.model, lm_head_of)
    trainer.engine = ShardedEngine(trainer.engine, policy, trainer.config.fsdp_generation)
    routes = {id(trainer.model): (policy, None)}
    if trainer.ref_model is not None:  # the frozen reference model, sharded the same way
        routes[id(trainer.ref_model)] = (ShardedPolicy(trainer.ref_model, trainer.device, compute),
                                         LiveHead(trainer.ref_model, lm_head_of))
    trainer.fused_logprobs = _routed(trainer.fused_logprobs, routes)
    trainer._micro_batch_loss = policy.wrap(trainer._micro_batch_loss)
    return policy


def _routed(fused_logprobs, routes: dict):
    """``fused_logprobs(model, head, ...)`` run inside the root of ``model``'s ``ShardedPolicy``.

    For the reference model the ``head`` argument (read outside any root: a shard) is replaced
    by a ``LiveHead`` of it.
    """
    def inside_root(model, head, *args, **kwargs):
        policy, live_head = routes[id(model)]
        return policy.run(lambda: fused_logprobs(model, live_head or head, *args, **kwargs))

    inside_root.__wrapped__ = fused_logprobs
    return inside_root

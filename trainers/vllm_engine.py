"""Rollouts sampled by a colocated vLLM engine (optional extra: ``pip install "entropy-ops[vllm]"``).

``VLLMEngine`` builds a ``vllm.LLM`` on the policy's GPU from the policy's model
path (``model.name_or_path``), samples with ``vllm.SamplingParams`` and returns a
``Rollout`` laid out exactly as ``HFGenerateEngine`` lays it out (see
``trainers/rollout.py``): prompts tokenized by the trainer's tokenizer and
left-padded, completions cut after their first end token and right-padded,
``truncated`` where no end token came, text decoded with special tokens skipped.

vLLM keeps its own copy of the weights, so the trainer must call
``update_weights(policy)`` after each optimizer step; it copies every parameter
into the vLLM model in place (``model.load_weights`` of the vLLM model class,
which takes Hugging Face parameter names and fuses q/k/v, gate/up itself) and
clears the prefix cache, whose KV blocks were computed with the old weights.

How the vLLM model is reached, by version:

* vLLM with ``LLM.apply_model`` (the V1 engine; the path TRL >= 1.x targets with
  vLLM 0.22-0.31): ``llm.apply_model(fn)`` runs ``fn(model)`` in each worker.
  With the engine core in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``,
  which ``VLLMEngine`` sets unless the environment already sets it) the call is
  a plain function call: the policy's tensors are handed over, not serialized.
* older vLLM (the V0 engine, no ``LLM.apply_model``):
  ``llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights``.

The newest vLLM also has a weight-transfer API (``init_weight_transfer_engine``,
``update_weights`` with IPC / NCCL backends) for a separate inference process;
it is not used here: colocated, in-process ``load_weights`` needs no transport.

Side effect: the in-process vLLM worker seeds the global Python / NumPy / torch
generators with ``seed`` when it starts (vLLM's own ``set_random_seed``), so build
the engine before restoring a checkpoint's RNG state; by default ``seed`` is
``torch.initial_seed()``, the seed the process already runs with.

Memory: vLLM reserves ``gpu_memory_utilization`` x the GPU's memory for its
weights and KV cache at construction, next to the policy, its gradients and the
optimizer state; the default here is 0.3, not vLLM's 0.9.
"""
from __future__ import annotations

import inspect
import os

import torch

from .rollout import Rollout, end_token_ids, pack_completions

INSTALL_HINT = 'pip install "entropy-ops[vllm]"'
# Name components wrappers add to parameter names, which the vLLM model does not know:
# torch.compile's and activation checkpointing's anywhere, DistributedDataParallel's in front.
_WRAPPER_PARTS = ("_orig_mod", "_checkpoint_wrapped_module")


def import_vllm():
    """The ``vllm`` module, or ``ImportError`` with the install command when it is missing."""
    try:
        import vllm
    except ImportError as err:
        raise ImportError(
            f'rollout_engine="vllm" needs the vllm package, which is not installed: {INSTALL_HINT} '
            "(vLLM runs on a CUDA GPU; use rollout_engine=\"hf\" otherwise)"
        ) from err
    return vllm


def vllm_parameter_name(name: str) -> str:
    """A policy parameter name as the vLLM model's ``load_weights`` expects it (wrapper components removed)."""
    parts = name.split(".")
    if parts[0] == "module":
        parts = parts[1:]
    return ".".join(p for p in parts if p not in _WRAPPER_PARTS)


class VLLMEngine:
    """Sampling with a colocated vLLM ``LLM`` that follows the policy's weights.

    Options (``rollout_engine_options``; ``None`` leaves vLLM's default):

    * ``model_path``: what vLLM loads (default: the policy's ``name_or_path``);
    * ``gpu_memory_utilization`` (default 0.3), ``tensor_parallel_size`` (1),
      ``dtype`` (default: the policy's parameter dtype, e.g. ``"bfloat16"``),
      ``enable_prefix_caching``, ``max_model_len``, ``enforce_eager``,
      ``max_num_seqs``, ``max_num_batched_tokens``, ``distributed_executor_backend``,
      ``trust_remote_code``: passed to ``vllm.LLM`` as they are;
    * ``seed``: the ``vllm.LLM`` seed (default: ``torch.initial_seed()``, the
      trainer's seed when it seeded torch before building the engine);
    * ``sampling_seed``: when set, request ``k`` (counted over the run, one per
      prompt) samples with ``SamplingParams(seed=sampling_seed + k)``, so the
      samples do not depend on how vLLM batches requests.
    """

    def __init__(self, model, tokenizer, *, model_path: str | None = None, gpu_memory_utilization: float = 0.3,
                 tensor_parallel_size: int = 1, dtype: str | None = None, enable_prefix_caching: bool | None = None,
                 max_model_len: int | None = None, seed: int | None = None, sampling_seed: int | None = None,
                 enforce_eager: bool | None = None, max_num_seqs: int | None = None,
                 max_num_batched_tokens: int | None = None, distributed_executor_backend: str | None = None,
                 trust_remote_code: bool = False) -> None:
        if not (isinstance(gpu_memory_utilization, (int, float)) and 0 < gpu_memory_utilization <= 1):
            raise ValueError("rollout_engine_options.gpu_memory_utilization: expected a fraction in (0, 1], "
                             f"got {gpu_memory_utilization!r}")
        if not (isinstance(tensor_parallel_size, int) and tensor_parallel_size >= 1):
            raise ValueError(f"rollout_engine_options.tensor_parallel_size: expected an int >= 1, "
                             f"got {tensor_parallel_size!r}")
        if sampling_seed is not None and not isinstance(sampling_seed, int):
            raise ValueError(f"rollout_engine_options.sampling_seed: expected an int or None, got {sampling_seed!r}")
        path = model_path or getattr(model, "name_or_path", None)
        if not path:
            raise ValueError("rollout_engine_options.model_path: the policy has no name_or_path; "
                             "give the directory or Hub name vLLM should load")
        vllm = import_vllm()
        self.model, self.tokenizer = model, tokenizer
        self.eos_ids = end_token_ids(model, tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id = self.eos_ids[0] if pad is None else pad
        self.sampling_seed = sampling_seed
        self._requests_sampled = 0
        self._SamplingParams = vllm.SamplingParams
        if dtype is None:
            dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        kwargs = dict(model=path, gpu_memory_utilization=float(gpu_memory_utilization),
                      tensor_parallel_size=tensor_parallel_size, dtype=dtype,
                      seed=torch.initial_seed() % 2**31 if seed is None else seed,
                      trust_remote_code=trust_remote_code)
        optional = dict(enable_prefix_caching=enable_prefix_caching, max_model_len=max_model_len,
                        enforce_eager=enforce_eager, max_num_seqs=max_num_seqs,
                        max_num_batched_tokens=max_num_batched_tokens,
                        distributed_executor_backend=distributed_executor_backend)
        kwargs.update({k: v for k, v in optional.items() if v is not None})
        # The V1 engine core in this process: apply_model is then a direct call (no pickling of
        # the weights or of the closure). An explicit setting in the environment wins.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self.llm_kwargs = kwargs
        self.llm = vllm.LLM(**kwargs)
        # The policy may already differ from the files on disk (dtype cast, a broadcast from rank 0).
        self.update_weights(model)

    # ------------------------------------------------------------------ weights
    def update_weights(self, model) -> None:
        """Copy every parameter of ``model`` into the vLLM model, then clear vLLM's prefix cache.

        One ``load_weights`` call with ``[(name, tensor), ...]`` for all
        ``named_parameters()`` (tied weights appear once, as ``named_parameters``
        lists them), names stripped of wrapper components. The tensors are detached
        views, not copies; vLLM copies them into its own (possibly fused, cast) storage.
        """
        weights = [(vllm_parameter_name(n), p.detach()) for n, p in model.named_parameters()]

        def load(vllm_model):
            vllm_model.load_weights(weights)

        if callable(getattr(self.llm, "apply_model", None)):
            self.llm.apply_model(load)
        else:
            try:
                runner_model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
            except AttributeError as err:
                raise RuntimeError("VLLMEngine.update_weights: this vLLM has neither LLM.apply_model nor "
                                   "llm_engine.model_executor.driver_worker.model_runner.model") from err
            load(runner_model)
        if callable(getattr(self.llm, "reset_prefix_cache", None)):
            self.llm.reset_prefix_cache()

    # ------------------------------------------------------------------ sampling
    def sampling_params(self, *, num_samples: int, max_new_tokens: int, temperature: float, top_p: float,
                        top_k: int, greedy: bool, num_prompts: int):
        """One ``SamplingParams`` for all prompts, or one per prompt when ``sampling_seed`` is set.

        ``n = num_samples``, ``max_tokens = max_new_tokens``, ``stop_token_ids`` =
        the end tokens ``HFGenerateEngine`` stops on; greedy is ``temperature = 0``;
        ``top_k = 0`` (off, as in ``generate``) becomes vLLM's ``-1``.
        """
        if greedy:
            sampling = dict(temperature=0.0, top_p=1.0, top_k=-1)
        else:
            sampling = dict(temperature=float(temperature), top_p=float(top_p),
                            top_k=int(top_k) if int(top_k) > 0 else -1)
        common = dict(n=int(num_samples), max_tokens=int(max_new_tokens), stop_token_ids=list(self.eos_ids),
                      detokenize=False, **sampling)
        if self.sampling_seed is None:
            return self._SamplingParams(**common)
        first = self.sampling_seed + self._requests_sampled
        self._requests_sampled += num_prompts
        return [self._SamplingParams(**common, seed=first + i) for i in range(num_prompts)]

    @torch.no_grad()
    def generate(self, prompts, *, num_samples=1, max_new_tokens=256, temperature=1.0, top_p=1.0, top_k=0,
                 greedy=False) -> Rollout:
        prompts = list(prompts)
        if not (isinstance(num_samples, int) and num_samples >= 1):
            raise ValueError(f"num_samples: expected an int >= 1, got {num_samples!r}")
        if not (isinstance(max_new_tokens, int) and max_new_tokens >= 1):
            raise ValueError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens!r}")
        device = next(self.model.parameters()).device
        enc = self.tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"].bool()
        requests = [{"prompt_token_ids": row[m].tolist()} for row, m in zip(ids, mask)]
        params = self.sampling_params(num_samples=num_samples, max_new_tokens=max_new_tokens,
                                      temperature=temperature, top_p=top_p, top_k=top_k, greedy=greedy,
                                      num_prompts=len(prompts))
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        if len(outputs) != len(prompts):
            raise RuntimeError(f"vLLM returned {len(outputs)} request outputs for {len(prompts)} prompts")
        rows, stopped = [], []
        for out in outputs:  # vLLM returns the requests in submission order
            if len(out.outputs) != num_samples:
                raise RuntimeError(f"vLLM returned {len(out.outputs)} samples for a prompt, expected {num_samples}")
            for sample in sorted(out.outputs, key=lambda s: getattr(s, "index", 0)):
                rows.append(list(sample.token_ids))
                stopped.append(getattr(sample, "finish_reason", None) == "stop")
        completion_ids, completion_mask, truncated = pack_completions(rows, self.eos_ids, self.pad_id, stopped)
        texts = self.tokenizer.batch_decode([row[m].tolist() for row, m in zip(completion_ids, completion_mask)],
                                            skip_special_tokens=True)
        return Rollout(
            prompts=[p for p in prompts for _ in range(num_samples)], completions=texts,
            prompt_ids=ids.repeat_interleave(num_samples, 0).to(device),
            prompt_mask=mask.repeat_interleave(num_samples, 0).to(device),
            completion_ids=completion_ids.to(device), completion_mask=completion_mask.to(device),
            truncated=truncated.to(device),
        )


VLLM_OPTIONS: tuple[str, ...] = tuple(
    name for name, p in inspect.signature(VLLMEngine.__init__).parameters.items() if p.kind is p.KEYWORD_ONLY
)

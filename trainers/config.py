"""The trainer's configuration: one dataclass, loadable from YAML, with ``key=value`` overrides.

Every field carries its documentation in ``metadata["help"]``
(``entropy-ops train --print-config`` prints them all as commented YAML).
:meth:`TrainConfig.validate` checks types, ranges, names and paths and raises a
``ValueError`` / ``TypeError`` naming the field, before any model is loaded.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

TINY_MODEL = "tiny-arith"  # the embedded default model, under trainers/assets/
LR_SCHEDULES = ("constant", "cosine", "linear")
DTYPES = ("auto", "float32", "bfloat16", "float16")
_FLOAT_STRING = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")  # YAML 1.1 reads "1e-3" as a string


def _f(default, help: str):
    """A field with a default and its documentation."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # --- model and data
    model: str = _f(TINY_MODEL, "Hugging Face causal LM: a Hub name, a local directory, or 'tiny-arith' (embedded).")
    ref_model: str | None = _f(None, "Reference model for the KL term (loss.beta > 0); null: a frozen copy of `model`.")
    dataset: str = _f("addition", "A generated task, 'addition' (multi-operand addition with a scratchpad, the "
                                  "default) or 'arithmetic' (a+b, 2 digits), or a JSONL file of {prompt, answer} rows.")
    eval_dataset: str | None = _f(None, "JSONL of held-out rows; null: the generated task's held-out split (none for JSONL).")
    arithmetic_digits: int = _f(2, "Operand digits of the 'arithmetic' task.")
    num_eval_prompts: int = _f(1000, "Held-out prompts evaluated (the generated task's split size; a cap for eval_dataset).")
    answer_format: str = _f("boxed", "Final-answer format of completions: 'boxed', 'gsm8k' (#### 42) or 'last_number'.")
    rewards: dict[str, float] = _f({"correctness": 1.0},
                                   "Reward functions and weights: correctness, format, length, or 'module:function'.")
    # --- algorithm and loss
    algo: str = _f("grpo", "Algorithm: grpo, dr-grpo, rloo, or any registered plug-in.")
    algo_options: dict[str, Any] = _f({}, "The algorithm's own options (e.g. {eps: 1.0e-6} for grpo).")
    loss: dict[str, Any] = _f({}, "PolicyLossConfig overrides on top of the algorithm's preset (eps_high, beta, ...).")
    dynamic_sampling: bool = _f(False, "Drop groups whose rewards are all equal before the update (DAPO).")
    # --- rollout
    num_prompts: int = _f(8, "Prompts per step.")
    group_size: int = _f(8, "Completions sampled per prompt (G >= 2).")
    max_new_tokens: int = _f(48, "Longest completion, in tokens.")
    temperature: float = _f(1.0, "Sampling temperature; the loss scores tokens at the same temperature.")
    top_p: float = _f(1.0, "Nucleus sampling threshold (1: off).")
    top_k: int = _f(0, "Top-k sampling (0: off).")
    rollout_engine: str = _f("hf", "Sampling engine: 'hf' (transformers generate) or 'vllm' (colocated, extra [vllm]).")
    rollout_engine_options: dict[str, Any] = _f({}, "The engine's options (vllm: gpu_memory_utilization, max_model_len, ...).")
    # --- optimization
    learning_rate: float | None = _f(None, "AdamW learning rate (peak, after warm-up); null: the algorithm's "
                                           "measured default (1e-4 for the reward-driven ones, lower for EM).")
    lr_schedule: str = _f("constant", "After warm-up: 'constant', 'cosine' or 'linear' decay to 0 at max_steps.")
    warmup_steps: int = _f(0, "Linear learning-rate warm-up steps.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.999, "AdamW beta2.")
    max_grad_norm: float = _f(1.0, "Gradient clipping by global norm (0: off).")
    num_iterations: int = _f(1, "Optimizer passes over each rollout batch (PPO epochs).")
    micro_batch_size: int = _f(64, "Completions per forward/backward; gradients accumulate over the batch.")
    max_steps: int = _f(40, "Training steps (one rollout batch each).")
    # --- evaluation and logging
    eval_every: int = _f(40, "Evaluate on held-out prompts every N steps (0: only before and after training).")
    eval_at_start: bool = _f(True, "Evaluate before the first step (false: skip it, e.g. when runs share one base evaluation).")
    eval_samples: int = _f(2, "Sampled completions per held-out prompt (plus one greedy).")
    log_every: int = _f(10, "Print a metrics line every N steps (the JSONL log gets every step).")
    plot: bool = _f(True, "Write reward and entropy over steps to OUTPUT_DIR/metrics.png at the end.")
    # --- checkpoints
    output_dir: str | None = _f(None, "Where logs and checkpoints go; null: runs/<algo>-<date>-<time>.")
    save_every: int = _f(100, "Save a checkpoint every N steps (0: only at the end and on Ctrl-C).")
    keep_checkpoints: int = _f(2, "Checkpoints of this run kept on disk (its oldest are deleted; never another run's).")
    resume: bool = _f(False, "Continue from the last checkpoint in output_dir.")
    overwrite: bool = _f(False, "Start afresh in an output_dir that holds a run: the old run is moved into "
                                "output_dir/previous-<time>/ (nothing is deleted).")
    # --- system
    seed: int = _f(0, "Seed of prompt order, sampling and initialization.")
    device: str = _f("auto", "'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'.")
    dtype: str = _f("auto", "Model dtype: 'auto' (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16. "
                            "Weights are updated in this dtype (no fp32 master copy): prefer float32 at tiny lr.")
    attn_implementation: str = _f("auto", "'auto' (flash_attention_2 when installed on CUDA, else sdpa), or any transformers name.")
    torch_threads: int = _f(0, "CPU threads for torch; 0: auto (1 for a model under 10M parameters on CPU, "
                               "else torch's default of one per physical core).")
    backend: str = _f("auto", "Fused-op backend: 'auto', 'triton' or 'torch'.")
    parallelism: str = _f("ddp", "Under torchrun: 'ddp' (every rank holds the whole model and optimizer) or 'fsdp' "
                                 "(FSDP2: parameters, gradients and optimizer state sharded over ranks; docs/distributed.md).")
    fsdp_generation: str = _f("full", "parallelism 'fsdp', sampling: 'full' (all-gather the whole model once per generate "
                                      "call: fast, needs the full parameters on each device) or 'blockwise' (one block "
                                      "at a time, at every token: the model's traffic per token, a block's memory).")
    fsdp_compute_dtype: str | None = _f(None, "parallelism 'fsdp': compute in this dtype ('bfloat16', 'float16') while "
                                               "shards, gradients and AdamW state keep `dtype` (float32: fp32 master "
                                               "weights); null: compute in `dtype`.")

    # ------------------------------------------------------------ construction
    @classmethod
    def fields_help(cls) -> dict[str, str]:
        return {f.name: f.metadata["help"] for f in dataclasses.fields(cls)}

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """Build from a mapping; unknown keys and wrong types raise before anything is loaded."""
        if not isinstance(values, dict):
            raise TypeError(f"config must be a mapping of field names to values, got {type(values).__name__}")
        config = cls()
        for key, value in values.items():
            config.set(key, value)
        return config

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "TrainConfig":
        import yaml

        if not os.path.isfile(path):
            raise ValueError(f"config file {str(path)!r} does not exist")
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}
        try:
            return cls.from_dict(values)
        except (ValueError, TypeError) as e:
            raise type(e)(f"{path}: {e}") from None

    def set(self, key: str, value: Any) -> None:
        """Set one field (``loss.eps_high`` sets one entry of a mapping field), type-checked."""
        key = key.replace("-", "_")
        name, _, sub = key.partition(".")
        hints = typing.get_type_hints(type(self))
        if name not in hints:
            close = difflib.get_close_matches(name, hints, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown config key {name!r}{hint} (entropy-ops train --print-config lists them)")
        if sub:
            if typing.get_origin(hints[name]) is not dict:
                raise ValueError(f"config key {key!r}: {name!r} is not a mapping, it takes no '.{sub}'")
            value = {**getattr(self, name), sub: value}
        setattr(self, name, _check_type(name, value, hints[name]))

    def apply_overrides(self, overrides: list[str]) -> "TrainConfig":
        """Apply ``key=value`` strings; values are parsed as YAML (``true``, ``3``, ``{a: 1}``)."""
        import yaml

        for item in overrides:
            key, sep, raw = item.partition("=")
            if not sep or not key:
                raise ValueError(f"override {item!r} must look like key=value")
            self.set(key.strip(), yaml.safe_load(raw) if raw.strip() else "")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # -------------------------------------------------------------- validation
    def validate(self) -> "TrainConfig":
        """Check every value; raise ``ValueError`` naming the field. Loads no model."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, _check_type(f.name, getattr(self, f.name), hints[f.name]))
        _at_least(self, group_size=2, num_prompts=1, max_new_tokens=1, num_iterations=1, micro_batch_size=1,
                  arithmetic_digits=1, num_eval_prompts=1, eval_samples=1, log_every=1, keep_checkpoints=1,
                  max_steps=0, eval_every=0, save_every=0, warmup_steps=0, top_k=0, torch_threads=0)
        if self.learning_rate is None:
            from .algorithms import algorithm_class

            self.learning_rate = algorithm_class(self.algo).default_learning_rate
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"learning_rate must be a finite number > 0, got {self.learning_rate}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        for name in ("weight_decay", "max_grad_norm"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.resume and self.output_dir is None:
            raise ValueError("resume needs output_dir: the run directory to continue")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other: resume continues the run in output_dir, "
                             "overwrite moves it aside and starts afresh")
        _one_of("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _one_of("dtype", self.dtype, DTYPES)
        _one_of("backend", self.backend, ("auto", "triton", "torch"))
        _one_of("parallelism", self.parallelism, ("ddp", "fsdp"))
        from .fsdp import check_config as check_parallelism

        check_parallelism(self)
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        self._validate_plugins()
        self._validate_paths()
        from .rollout import check_engine_options

        check_engine_options(self.rollout_engine, self.rollout_engine_options)
        return self

    def _validate_plugins(self) -> None:
        from .algorithms import get_algorithm
        from .rewards import ANSWER_FORMATS, check_reward_name

        _one_of("answer_format", self.answer_format, ANSWER_FORMATS)
        algorithm = get_algorithm(self.algo, **self.algo_options)  # raises on unknown options
        if algorithm.uses_rewards and not self.rewards:
            raise ValueError(f"rewards must name at least one reward function for algo {self.algo!r}")
        for name, weight in self.rewards.items():
            check_reward_name(name)
            if not math.isfinite(weight):
                raise ValueError(f"rewards.{name} must be a finite weight, got {weight}")
        if "temperature" in self.loss:
            raise ValueError("loss.temperature: set `temperature` instead (it is used for sampling and the loss)")
        self.loss_config(algorithm.loss_preset, dict(algorithm.loss_overrides))  # raises on unknown keys or bad values

    def loss_config(self, preset: str, algorithm_overrides: dict | None = None):
        """The ``PolicyLossConfig``: the algorithm's ``preset`` with ``loss`` overrides and our temperature."""
        from entropy_ops.policy_loss import PolicyLossConfig

        known = {f.name for f in dataclasses.fields(PolicyLossConfig)}
        unknown = sorted(set(self.loss) - known)
        if unknown:
            raise ValueError(f"loss: unknown key(s) {unknown}; PolicyLossConfig fields are {sorted(known)}")
        options = {"max_completion_length": self.max_new_tokens, **(algorithm_overrides or {}), **self.loss,
                   "temperature": self.temperature}
        try:
            return PolicyLossConfig.preset(preset, **options)
        except (TypeError, ValueError) as e:
            raise ValueError(f"loss: {e}") from None

    def _validate_paths(self) -> None:
        from .tasks import TASKS

        if self.dataset not in TASKS and not os.path.isfile(self.dataset):
            raise ValueError(f"dataset must be 'arithmetic', 'addition' or an existing JSONL file, got {self.dataset!r}")
        if self.eval_dataset is not None and not os.path.isfile(self.eval_dataset):
            raise ValueError(f"eval_dataset {self.eval_dataset!r} does not exist")
        from .model import check_model_reference

        check_model_reference("model", self.model)
        if self.ref_model is not None:
            check_model_reference("ref_model", self.ref_model)


# ------------------------------------------------------------------ type checks
def _check_type(name: str, value: Any, hint: Any) -> Any:
    """``value`` converted to ``hint`` (int -> float, numeric strings -> float), else ``TypeError``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise TypeError(f"{name} must be a mapping with string keys, got {value!r}")
        if args and args[1] is float:
            return {k: _check_type(f"{name}.{k}", v, float) for k, v in value.items()}
        return dict(value)
    if hint is float:
        if isinstance(value, str) and _FLOAT_STRING.match(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be true or false, got {type(value).__name__} {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a string, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"{name}: unsupported field type {hint}")  # a new field with a type we do not check yet


def _at_least(config: TrainConfig, **minimums: int) -> None:
    for name, low in minimums.items():
        if getattr(config, name) < low:
            raise ValueError(f"{name} must be >= {low}, got {getattr(config, name)}")


def _one_of(name: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")

"""What :class:`~entropy_ops.integrations.trl.FusedGRPOTrainer` fuses for a ``GRPOConfig``, decided before TRL
builds anything.

:func:`plan_fused_grpo` validates the entropy-ops arguments and the ``GRPOConfig`` fields the fused loss
reads (bad values raise ``ValueError``/``TypeError`` naming the field), then picks one of three paths:

``"fused"``          entropy-ops computes the per-token log-probs/entropies (no logits) and the loss
                     (:mod:`entropy_ops.integrations.trl_compute`), equal to TRL's for every
                     ``loss_type`` and option.
``"fused_logprobs"`` entropy-ops log-probs/entropies, TRL's own ``_compute_loss`` on them: asked for
                     with ``fused_loss=False``, or chosen (with a :class:`FusedFallbackWarning`) for a
                     ``delta`` below ``1 + epsilon_high``, where TRL's ratio cap also caps the positive
                     side and entropy-ops' dual clip does not.
``"trl"``            TRL unchanged (with a :class:`FusedFallbackWarning`): DeepSpeed ZeRO-3 (the fused
                     backward reads the whole ``lm_head`` weight outside the hooks that gather its
                     shards), or an output layer entropy-ops cannot express.

On the ``"fused"`` path, ``fused_one_pass=True`` asks for the one-pass loss (:mod:`.trl_onepass`); a
configuration that needs two passes (:func:`one_pass_reason`) gets them, with a warning saying why.
"""
from __future__ import annotations

import dataclasses
import warnings

from ..policy_loss import PolicyLossConfig
from .trl_losses import CLIPPED_LOSS_TYPES, LOSS_TYPES

BACKENDS = ("auto", "triton", "torch")
IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
PATHS = ("fused", "fused_logprobs", "trl")


class FusedFallbackWarning(UserWarning):
    """A configuration that FusedGRPOTrainer trains with TRL's own code for part of the step (message says why)."""


@dataclasses.dataclass(frozen=True)
class FusedGRPOPlan:
    """``path`` (one of :data:`PATHS`), ``backend`` of the fused op, the clipped-surrogate config
    (``None`` unless ``path == "fused"``) and why a path below ``"fused"`` was taken."""

    path: str
    backend: str
    surrogate_config: PolicyLossConfig | None = None
    reasons: tuple[str, ...] = ()
    one_pass: bool = False  # the loss's gradient formed during the forward (trl_onepass)
    token_chunk: int | None = None  # one-pass rows per chunk (None: the default)

    @property
    def fused_head(self) -> bool:
        return self.path != "trl"

    @property
    def fused_loss(self) -> bool:
        return self.path == "fused"


def surrogate_config_from_grpo_args(args) -> PolicyLossConfig:
    """The :class:`~entropy_ops.PolicyLossConfig` of TRL's clipped surrogate ``-min(w A, clip(w) A)`` for ``args``.

    Only the surrogate: ``eps_low = epsilon``, ``eps_high = epsilon_high`` (``None``: ``epsilon``),
    ``dual_clip = delta``, token-level ratio (the sequence ratio is passed as the token log-ratio),
    ``token-mean`` aggregation, no KL, no entropy term, no entropy mask (the caller applies TRL's
    weights, KL and masks). TRL's ``delta`` caps the ratio before the ``min``; for ``delta >= 1 + eps_high``
    that is exactly the dual clip ``min(pg, -delta A)`` where ``A < 0`` (and changes nothing where
    ``A > 0``); a smaller ``delta`` raises ``ValueError``.
    """
    eps_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    if args.delta is not None and not args.delta >= 1.0 + eps_high:
        raise ValueError(f"GRPOConfig.delta={args.delta} equals a dual clip only when delta >= 1 + epsilon_high "
                         f"= {1.0 + eps_high}")
    return PolicyLossConfig(importance_sampling_level="token", eps_low=args.epsilon, eps_high=eps_high,
                            dual_clip=args.delta, beta=0.0, top_entropy_quantile=1.0, aggregation="token-mean",
                            temperature=args.temperature)


def plan_fused_grpo(args, *, fused_loss=True, fused_backend="auto", fused_one_pass=False, fused_token_chunk=None,
                    model=None, warn=True) -> FusedGRPOPlan:
    """Validate and choose the path for ``args`` (a ``trl.GRPOConfig``); warns once per fallback reason.

    ``model``: the policy instance when known (a model name is checked after TRL loads it).
    ``fused_one_pass``: form the gradient during the forward when the configuration allows it
    (:func:`one_pass_reason`), else two passes with a warning saying why.
    """
    from trl import GRPOConfig

    if not isinstance(args, GRPOConfig):
        raise TypeError(f"args must be a trl.GRPOConfig, got {type(args).__name__}")
    if fused_backend not in BACKENDS:
        raise ValueError(f"fused_backend must be one of {BACKENDS}, got {fused_backend!r}")
    for name, value in (("fused_loss", fused_loss), ("fused_one_pass", fused_one_pass)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    if fused_token_chunk is not None and (isinstance(fused_token_chunk, bool) or not isinstance(fused_token_chunk, int)
                                          or fused_token_chunk < 1):
        raise ValueError(f"fused_token_chunk must be an int >= 1 or None, got {fused_token_chunk!r}")
    _check_fields(args)
    reasons = []
    head_problem = zero3_reason() or (None if model is None else head_reason(model))
    if head_problem:
        reasons.append(head_problem)
        path, config = "trl", None
    elif not fused_loss:
        path, config = "fused_logprobs", None
    else:
        path, config = "fused", None
        if args.loss_type in CLIPPED_LOSS_TYPES:
            try:
                config = surrogate_config_from_grpo_args(args)
            except ValueError as err:
                reasons.append(f"{err}: TRL's cap then also bounds the ratio where A > 0; TRL's loss runs on the "
                               "fused log-probs")
                path = "fused_logprobs"
    one_pass = False
    if fused_one_pass:
        why = one_pass_reason(args) if path == "fused" else f"the loss is not entropy-ops' (path {path!r})"
        if why is None:
            one_pass = True
        else:
            reasons.append(f"fused_one_pass: {why}; the loss runs in two passes")
    if warn:
        for reason in reasons:
            warnings.warn(f"FusedGRPOTrainer: {reason}", FusedFallbackWarning, stacklevel=3)
    return FusedGRPOPlan(path=path, backend=fused_backend, surrogate_config=config, reasons=tuple(reasons),
                         one_pass=one_pass, token_chunk=fused_token_chunk)


def one_pass_reason(args) -> str | None:
    """Why TRL's loss for ``args`` needs two passes, or ``None``: the one-pass form needs every token's
    gradient to depend only on its own log-prob and entropy and on constants known before the forward."""
    if args.importance_sampling_level != "token":
        return "a sequence-level ratio needs the whole response's log-probs before any token's gradient"
    if args.top_entropy_quantile < 1.0:
        return "the entropy mask's quantile needs every token's entropy before any gradient"
    if args.off_policy_mask_threshold is not None:
        return "the off-policy mask needs each response's mean log-prob before any gradient"
    if args.loss_type == "vespo":
        return "VESPO's weight needs each response's summed log-ratio before any gradient"
    return None


def _check_fields(args) -> None:
    """The GRPOConfig fields TRL itself checks only when it first uses them (at the first loss or generation)."""
    if args.loss_type not in LOSS_TYPES:
        raise ValueError(f"GRPOConfig.loss_type must be one of {LOSS_TYPES}, got {args.loss_type!r}")
    if args.importance_sampling_level not in ("token", "sequence"):
        raise ValueError("GRPOConfig.importance_sampling_level must be 'token' or 'sequence', "
                         f"got {args.importance_sampling_level!r}")
    is_on = args.use_vllm and args.vllm_importance_sampling_correction
    if is_on and args.vllm_importance_sampling_mode not in IS_MODES:
        raise ValueError(f"GRPOConfig.vllm_importance_sampling_mode must be one of {IS_MODES}, "
                         f"got {args.vllm_importance_sampling_mode!r}")
    if args.loss_type == "dr_grpo" and not args.max_completion_length:
        raise ValueError("GRPOConfig.max_completion_length must be set for loss_type='dr_grpo' (its normalizer)")


def zero3_reason() -> str | None:
    """Why the fused head cannot run under the current DeepSpeed setting, or ``None``."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        return ("DeepSpeed ZeRO-3 shards lm_head's weight and gathers it only around the module's own forward; "
                "the fused backward reads the whole weight outside those hooks, so TRL's own log-probs and loss "
                "are used")
    return None


def head_reason(model) -> str | None:
    """Why the fused head cannot reproduce ``model``'s output layer, or ``None``.

    Reads the head (:func:`entropy_ops.output_head.output_head`), then runs the model once on one token
    (in eval mode, no gradient) with the output layer captured and checks that the model post-processes its
    logits as the head
    says (:meth:`~entropy_ops.output_head.HeadCapture.check_transform`). A one-token forward that fails
    for another reason is left to training to report.
    """
    import torch
    from accelerate.utils import is_peft_model

    from ..output_head import capture_head, output_head

    model = model.get_base_model() if is_peft_model(model) else model
    try:
        head = output_head(model)
    except (NotImplementedError, TypeError, ValueError) as err:
        return f"{err}; TRL's own log-probs and loss are used"
    training = model.training
    try:
        token = torch.zeros(1, 1, dtype=torch.long, device=head.weight.device)
        model.eval()  # no dropout: the check draws no random numbers
        with torch.no_grad(), capture_head(model, head) as record:
            outputs = model(input_ids=token, use_cache=False)
    except Exception:  # noqa: BLE001  (not this check's business: training will raise it)
        return None
    finally:
        model.train(training)
    try:
        record.check_transform(outputs["logits"])
    except TypeError as err:
        return f"{err}; TRL's own log-probs and loss are used"
    return None

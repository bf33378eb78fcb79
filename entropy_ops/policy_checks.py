"""Input checks of ``policy_loss`` / ``policy_loss_from_logprobs`` (shapes, dtypes, devices, exactly one input
path) and the resolution of its ``one_pass`` switch; every message names the argument."""
import torch

from ._validation import check_bool_mask, check_float_tensor, widen_targets


def one_pass_eligible(config) -> bool:
    """Whether ``config`` (a ``PolicyLossConfig``) allows the one-pass loss: a token-level ratio and no
    entropy mask, so that every token's upstream gradient is a function of its own ``logp``, ``H`` and
    constants (``entropy_ops.policy_onepass``)."""
    return config.importance_sampling_level == "token" and config.top_entropy_quantile >= 1.0


def check_policy_inputs(targets, mask, advantages, logits, hidden, weight, bias, old_logprobs, ref_logprobs, cfg,
                        ignore_index: int = -100):
    """Shapes, dtypes and devices of the O(tokens) inputs, and exactly one input path. Returns bool mask."""
    if not isinstance(targets, torch.Tensor) or targets.dim() != 2:
        raise ValueError(f"targets must be a [B, T] integer tensor, got "
                         f"{tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"targets must have an integer dtype, got {targets.dtype}")
    if targets.numel() == 0:
        raise ValueError(f"targets must be a non-empty [B, T] tensor, got shape {tuple(targets.shape)}")
    mask = check_token_inputs(targets.shape, targets.device, mask, advantages, old_logprobs, ref_logprobs, cfg,
                              targets=targets, ignore_index=ignore_index)
    check_input_path(targets.shape, logits, hidden, weight, bias)
    return mask


def check_token_inputs(shape, device, mask, advantages, old_logprobs, ref_logprobs, cfg, *, targets=None,
                       ignore_index=None):
    """The per-token tensors (mask, advantages, old / ref log-probs) against ``shape``; returns a bool mask.

    Value checks on the tokens the mask keeps, in one host sync: finite advantages, finite old / ref
    log-probs (a sampled token's log-prob is never NaN or infinite), and (with ``targets``) no target
    equal to ``ignore_index`` (it would reach the fused op as an ignored token: log-prob 0, no gradient)."""
    mask = check_bool_mask("mask", mask, shape, device, "the targets'")
    check_float_tensor("advantages", advantages)
    if advantages.shape not in (shape[:1], shape) or advantages.device != device:
        raise ValueError(f"advantages must have shape ({shape[0]},) or {tuple(shape)} on {device}, "
                         f"got {tuple(advantages.shape)} on {advantages.device}")
    for name, x in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs)):
        if x is not None:
            check_float_tensor(name, x)
            if x.shape != shape or x.device != device:
                raise ValueError(f"{name} must have the targets' shape {tuple(shape)} on {device}, "
                                 f"got {tuple(x.shape)} on {x.device}")
    if cfg.beta > 0 and ref_logprobs is None:
        raise ValueError(f"ref_logprobs is required when beta > 0 (beta={cfg.beta})")
    # The checks that read values, one host sync for all of them.
    flags = [("advantages", ~torch.isfinite(advantages) & (mask if advantages.dim() == 2 else mask.any(-1)))]
    for name, x in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs)):
        if x is not None:
            flags.append((name, ~torch.isfinite(x) & mask))
    if targets is not None:
        flags.append(("targets", (widen_targets(targets).view(targets.shape) == ignore_index) & mask))
    hits = torch.stack([bad.any() for _, bad in flags]).tolist()
    for (name, bad), hit in zip(flags, hits):
        if not hit:
            continue
        idx = tuple(int(i) for i in bad.nonzero()[0])
        if name == "advantages":
            raise ValueError(f"advantages must be finite on valid tokens; found {advantages[idx].item()} at index {idx}")
        if name == "targets":
            raise ValueError(f"targets must not equal ignore_index ({ignore_index}) on tokens the mask keeps; found "
                             f"one at index {idx} (mask that token out, or pass another ignore_index)")
        value = (old_logprobs if name == "old_logprobs" else ref_logprobs)[idx].item()
        raise ValueError(f"{name} must be finite on valid tokens; found {value} at index {idx}")
    return mask


def check_input_path(shape, logits, hidden, weight, bias):
    """Exactly one of: logits ``[B, T, V]``, or hidden ``[B, T, D]`` with weight (+ bias)."""
    if logits is not None:
        if hidden is not None or weight is not None or bias is not None:
            raise ValueError("pass either logits or hidden + weight (+ bias), not both")
        if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[:2] != shape:
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"logits must have shape [{shape[0]}, {shape[1]}, V], got {got}")
    elif hidden is not None or weight is not None:
        if hidden is None or weight is None:
            raise ValueError("the hidden-state path needs both hidden [B, T, D] and weight [V, D]")
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or hidden.shape[:2] != shape:
            got = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
            raise ValueError(f"hidden must have shape [{shape[0]}, {shape[1]}, D], got {got}")
    else:
        if bias is not None:
            raise ValueError("bias given without hidden and weight")
        raise ValueError("pass logits [B, T, V], or hidden [B, T, D] with weight [V, D]")


def use_one_pass(one_pass, cfg, logits, hidden, weight, bias, *, token_chunk=None, vocab_chunk=None) -> bool:
    """Resolve ``policy_loss``'s ``one_pass`` (see its docstring): whether this call runs the one-pass loss.

    An explicit choice refuses the other form's chunk argument (``token_chunk`` is the one-pass loss's,
    ``vocab_chunk`` the two-pass op's); with ``one_pass=None`` the one that does not apply is unused."""
    if one_pass is not None and not isinstance(one_pass, bool):
        raise TypeError(f"one_pass must be None, True or False, got {type(one_pass).__name__}")
    if one_pass is False and token_chunk is not None:
        raise ValueError(f"token_chunk ({token_chunk!r}) applies to the one-pass loss, but one_pass=False; "
                         "vocab_chunk sets the two-pass op's chunks")
    if one_pass is True and vocab_chunk is not None:
        raise ValueError(f"vocab_chunk ({vocab_chunk!r}) applies to the two-pass form, but one_pass=True; "
                         "token_chunk sets the one-pass loss's chunks")
    if one_pass is False:
        return False
    if one_pass is True:
        if logits is not None:
            raise ValueError("one_pass=True needs the hidden-state path (hidden + weight), got logits")
        if not one_pass_eligible(cfg):
            raise ValueError("one_pass=True needs importance_sampling_level='token' and top_entropy_quantile=1.0 "
                             f"(got {cfg.importance_sampling_level!r}, {cfg.top_entropy_quantile}): a sequence "
                             "ratio or the entropy mask's quantile needs every token before any gradient")
        return True
    needs_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (hidden, weight, bias))
    return logits is None and needs_grad and one_pass_eligible(cfg)

"""One-pass TRL loss: the gradient of TRL's loss is formed during the fused head's forward.

With a token-level ratio and neither the entropy mask nor the off-policy mask (and not VESPO), every
completion token's upstream gradient ``(d loss / d logp_t, d loss / d H_t)`` is a function of that
token's own ``logp_t``, ``H_t`` and constants known before the forward (advantages, old/ref
log-probs, vLLM's importance ratio, TRL's aggregation weights, the entropy-bonus weights). Then
entropy-ops' one-pass loop (:class:`entropy_ops.policy_onepass.OnePassLinearGradients`) computes,
per token chunk, the logits once, the statistics, TRL's per-token gradient
(``trl_compute._chunk_grad_fn``: autograd on the same per-token terms as the two-pass loss) and
``d hidden``/``d W`` from them (``6 N D V`` FLOPs instead of ``8 N D V``). The loss value and the
metrics come from the pass's log-probs and entropies by the same function as the two-pass loss; a
0-valued *anchor* added to the loss carries the precomputed gradient into the model's backward.
"""
from __future__ import annotations

import torch

from ..output_head import head_operands


def one_pass_head(head, rows, targets, grad_fn, *, temperature, backend="auto", dtype=None, token_chunk=None):
    """``(anchor, logp [N], H [N])`` of the hidden ``rows`` ``[N, D]`` and ``targets`` ``[N]`` under ``head``.

    ``grad_fn(r0, r1, logp, H)`` gives the upstream gradients of the rows ``[r0, r1)``; ``logp``/``H``
    are detached; ``anchor`` (0-dim zero) carries ``d loss`` into ``rows`` and the head's parameters.
    ``token_chunk``: rows per chunk (``None``: the one-pass default; all rows on the CPU path).
    """
    from ..linear_ops import linear_op_params
    from ..policy_onepass import OnePassLinearGradients, OnePassParams

    hidden, weight, bias = head_operands(head, rows, dtype)
    targets = targets.to(device=weight.device, dtype=torch.int64)
    with torch.autocast(weight.device.type, enabled=False):
        op = linear_op_params(hidden, weight, bias, targets, temperature=head.op_temperature(temperature),
                              ignore_index=-100, logit_softcap=head.softcap, allow_tf32=False, backend=backend)
        return OnePassLinearGradients.apply(hidden, weight, bias, targets, grad_fn, OnePassParams(op, token_chunk))


def one_pass_logprobs(trainer, model, input_ids, attention_mask, logits_to_keep, grad_fn):
    """``(logp, H, aux_loss, anchor)`` of the completion (``[B, logits_to_keep]``, detached) in one pass.

    Calls the model as TRL's ``_get_per_token_logps_and_entropies`` does (same labels, autocast and
    router-logit request, text inputs only), plus ``fused_token_grads=grad_fn`` for the patched forward
    (:func:`entropy_ops.integrations.trl.add_fused_lm_head`); the flat rows ``grad_fn`` sees are the
    completion tokens with ``attention_mask`` 1, row-major.
    """
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :-logits_to_keep] = -100
    extra = {"output_router_logits": True} if trainer.aux_loss_enabled else {}
    with trainer.accelerator.autocast():
        outputs = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True,
                        fused_token_grads=grad_fn, **extra)
    return (outputs.log_probs[:, -logits_to_keep:], outputs.entropy[:, -logits_to_keep:],
            outputs.aux_loss if trainer.aux_loss_enabled else None, outputs.loss)

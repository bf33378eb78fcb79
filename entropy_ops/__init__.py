"""entropy-ops: fused per-token log-probs, entropy and policy losses for RL fine-tuning of LLMs.

Public API (documented in README.md):

- :func:`token_logprobs_and_entropy`, :func:`token_logprobs`, :func:`token_entropy`: from logits ``[..., V]``.
- :func:`linear_logprobs_and_entropy`: from hidden states ``[..., D]`` and ``lm_head.weight`` ``[V, D]``;
  the ``[N, V]`` logits never exist.
- :func:`policy_loss`, :class:`PolicyLoss`, :class:`PolicyLossConfig`: the clipped policy loss of
  GRPO / DAPO / Dr.GRPO / GSPO / BNPO on top of either op.
- :func:`em_inf`, :func:`adaptive_temperature`: entropy minimization at inference time (EM-INF).
- :func:`linear_cross_entropy`, :class:`LinearCrossEntropy`: supervised cross-entropy (label
  smoothing, z-loss) from hidden states and ``lm_head.weight``, on the same fused op.
- :func:`patch` / :func:`unpatch`: a Hugging Face causal LM (or vision-language model) whose
  ``model(input_ids, labels=...)`` loss runs on the fused op and returns ``logits=None``.

Every op takes ``backend="auto" | "triton" | "torch"``: Triton kernels for CUDA tensors,
a memory-bounded chunked PyTorch path for CPU tensors (``ENTROPY_OPS_BACKEND`` overrides ``auto``).
"""
from .cross_entropy import LinearCrossEntropy, linear_cross_entropy
from .em_inf import adaptive_temperature, em_inf
from .linear_ops import linear_logprobs_and_entropy
from .policy_loss import PolicyLoss, PolicyLossConfig, policy_loss, policy_loss_from_logprobs
from .patch import patch, unpatch
from .token_ops import token_entropy, token_logprobs, token_logprobs_and_entropy

__all__ = [
    "token_logprobs_and_entropy",
    "token_logprobs",
    "token_entropy",
    "linear_logprobs_and_entropy",
    "policy_loss",
    "policy_loss_from_logprobs",
    "PolicyLoss",
    "PolicyLossConfig",
    "em_inf",
    "adaptive_temperature",
    "linear_cross_entropy",
    "LinearCrossEntropy",
    "patch",
    "unpatch",
]
__version__ = "0.1.0"

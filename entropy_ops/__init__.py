"""entropy-ops: fused per-token log-probs, entropy and policy losses for RL fine-tuning of LLMs.

Public API (see README.md):

- :func:`token_logprobs_and_entropy`, :func:`token_logprobs`, :func:`token_entropy`: from logits.
"""
from .token_ops import token_entropy, token_logprobs, token_logprobs_and_entropy

__all__ = [
    "token_logprobs_and_entropy",
    "token_logprobs",
    "token_entropy",
]
__version__ = "0.1.0"

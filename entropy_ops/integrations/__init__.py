"""Drop-in use of the fused ops in other stacks; each submodule is imported on demand.

- :mod:`entropy_ops.integrations.hf`: per-token log-probs and entropies of a Hugging Face causal
  LM from its body and output layer, without the ``[B, T, V]`` logits
  (``compute_logprobs_and_entropy``). Needs only torch at import.
- :mod:`entropy_ops.integrations.trl`: ``FusedGRPOTrainer``, a ``trl.GRPOTrainer`` on the fused
  op and ``policy_loss``, and ``add_fused_lm_head`` for TRL's fused-LM-head protocol. Imports trl.
- :mod:`entropy_ops.integrations.verl`: verl's fused-kernel entry points
  (``linear_cross_entropy``, ``FusedLinearForPPO``, ``forward_for_ppo``) and ``install()``.
  Needs only torch at import; verl is imported by ``install()``.

Nothing here is imported by ``import entropy_ops``, and no module patches anything on import.
"""

"""Drop-in use of the fused ops in other stacks; each submodule is imported on demand.

- :func:`entropy_ops.patch` (module :mod:`entropy_ops.patch`): a Hugging Face causal LM or
  vision-language model whose ``model(..., labels=...)`` loss runs on the fused op.
- :mod:`entropy_ops.integrations.hf`: ``compute_logprobs_and_entropy``, per-token log-probs and
  entropies of a Hugging Face model (patched or not) without the ``[B, T, V]`` logits (the RL path).
  Needs only torch at import.
- :mod:`entropy_ops.integrations.trl`: TRL's GRPO on the fused op. Imports trl.
- :mod:`entropy_ops.integrations.verl`: drop-ins for verl's fused-kernel and logits entry points
  (``linear_cross_entropy`` with ``dist_process_group``, ``FusedLinearForPPO``,
  ``logprobs_from_logits``, ``entropy_from_logits``, ``forward_for_ppo``) and ``install()``.
  Needs only torch at import; verl is imported by ``install()``.
- :mod:`entropy_ops.integrations.verl_loss` (re-exported by ``verl``): ``fused_policy_loss``, verl's vanilla
  PPO actor loss and ``actor/*`` metrics from the response hidden states and ``lm_head.weight``, its
  gradient formed in the forward (one pass). Needs only torch.
- :mod:`entropy_ops.integrations.verl_plugin`: importing it calls ``verl.install()``; named in
  verl's ``actor_rollout_ref.model.external_lib`` it is the config switch.

Output heads are read by one module, :mod:`entropy_ops.output_head`. Nothing here is imported by
``import entropy_ops``, and no module other than ``verl_plugin`` changes anything on import.
"""

"""Thin entropy-aware RL trainers (installed as ``entropy_ops.trainers``).

``entropy-ops train`` (``cli.py``) builds a :class:`~entropy_ops.trainers.config.TrainConfig`
and runs :class:`~entropy_ops.trainers.grpo_trainer.Trainer`: rollout with
transformers ``generate`` (``rollout.py``), rewards (``rewards.py``), an
algorithm plug-in for the advantages (``algorithms/``, plain estimators in
``advantages.py``), and the fused ``entropy_ops.policy_loss`` on the last hidden
states and ``lm_head.weight``. ``assets/tiny-arith`` is the embedded default
model (built by ``make_tiny_model.py``) for the generated task of ``tasks.py``.
Nothing is imported here: ``import entropy_ops.trainers`` stays cheap.
"""

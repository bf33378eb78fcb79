"""Importing this module installs entropy-ops into verl: name it in verl's config as the switch.

    actor_rollout_ref.model.external_lib=entropy_ops.integrations.verl_plugin

verl imports ``external_lib`` in every worker process before it builds the model; this import runs
:func:`entropy_ops.integrations.verl.install` there (fused-kernel entry points, the model-level
forward, the logits functions; see that module). It is the one module of entropy-ops whose import
changes anything, and only verl's, by design: nothing in entropy-ops imports it.
"""
from .verl import install

install()

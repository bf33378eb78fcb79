"""entropy-ops behind verl's fused-kernel switch.

Needs the ``train`` extra (transformers) for this script; verl itself is optional here:

    pip install -e ".[train]"        # from a clone; or: pip install "entropy-ops[train]"
    python examples/verl_fused_kernels.py

In a verl run, the switch is three config keys (no code of your own; see docs/integrations.md)::

    python -m verl.trainer.main_ppo ... \\
        actor_rollout_ref.model.use_fused_kernels=True \\
        actor_rollout_ref.model.fused_kernel_options.impl_backend=triton \\
        actor_rollout_ref.model.external_lib=entropy_ops.integrations.verl_plugin

verl imports ``external_lib`` in every worker; that import calls
``entropy_ops.integrations.verl.install()``. This script (CPU, seconds) shows what the workers then
compute: verl's kernel call ``linear_cross_entropy(hidden, weight, labels, temperature, "none")`` on
its remove-padding layout ``[1, total_nnz, D]``, and the model-level ``forward_for_ppo`` on a tiny
random Gemma 2, whose final soft-cap verl's own fused forward would drop.
"""
import importlib.util

import torch
from transformers import AutoModelForCausalLM, Gemma2Config

from entropy_ops.integrations import verl as entropy_ops_verl


def kernel_call():
    g = torch.Generator().manual_seed(0)
    total_nnz, D, V = 37, 64, 500
    hidden = torch.randn(1, total_nnz, D, generator=g, requires_grad=True)
    weight = (torch.randn(V, D, generator=g) / 8).requires_grad_()
    labels = torch.randint(0, V, (1, total_nnz), generator=g)  # verl: input_ids rolled left by one
    log_probs, entropy = entropy_ops_verl.linear_cross_entropy(hidden, weight, labels, 0.7, "none")
    (log_probs.sum() - 0.01 * entropy.sum()).backward()
    print(f"kernel: log_probs {tuple(log_probs.shape)}, mean entropy {entropy.mean().item():.3f} nats, "
          f"|dW| {weight.grad.norm().item():.3f}")


def model_forward():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Gemma2Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, final_logit_softcapping=3.0)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)  # large logits, so that the soft-cap matters
    # verl's packed batch: two sequences in one row, positions restarting at the second.
    input_ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(1))
    position_ids = torch.cat([torch.arange(8), torch.arange(12)]).unsqueeze(0)
    out = entropy_ops_verl.forward_for_ppo(model, input_ids=input_ids, position_ids=position_ids, temperature=1.0)
    logits = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits  # soft-capped
    labels = torch.roll(input_ids, -1, -1)
    ref = torch.log_softmax(logits.double(), -1).gather(-1, labels[..., None]).squeeze(-1)
    uncapped = torch.log_softmax((model.model(input_ids=input_ids, position_ids=position_ids, use_cache=False)
                                  .last_hidden_state @ model.lm_head.weight.t()).double(), -1)
    uncapped = uncapped.gather(-1, labels[..., None]).squeeze(-1)
    err, err_uncapped = (out.log_probs.double() - ref).abs().max().item(), (uncapped - ref).abs().max().item()
    print(f"model forward: max |ours - model logits| {err:.1e}; "
          f"without the soft-cap (verl's own fused forward) it would be {err_uncapped:.2f}")
    return err, err_uncapped


def main():
    kernel_call()
    errors = model_forward()
    if importlib.util.find_spec("verl") is not None:
        entropy_ops_verl.install()
        print("verl is installed here: its fused-kernel entry points now point at entropy-ops")
    else:
        print("verl is not installed here: nothing to patch (see this file's docstring for a real run)")
    return errors


if __name__ == "__main__":
    main()

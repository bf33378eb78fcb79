"""``FusedGRPOTrainer(fused_one_pass=True)``: TRL's loss with its gradient formed during the fused head's forward,
against stock TRL (loss, gradients, metrics) for the configurations that allow it, several token chunks
included; the configurations that do not allow it train in two passes with a warning saying why."""
import pytest

pytest.importorskip("trl", reason="the TRL integration needs trl")
from entropy_ops.integrations import trl as fused_trl  # noqa: E402
from entropy_ops.integrations.trl_onepass import one_pass_head  # noqa: E402
from test_integration_trl import compare, make_trainer, setup  # noqa: E402

__all__ = ["setup"]  # the module-scoped fixture, shared

ONE_PASS = dict(fused_one_pass=True, fused_token_chunk=4)  # the batch has 21 completion tokens: six chunks
CASES = {  # config, inputs, use_vllm
    "dapo, bias-corrected kl, entropy bonus, vLLM token ratio": (
        dict(loss_type="dapo", beta=0.04, entropy_coef=0.03, vllm_importance_sampling_mode="token_truncate"),
        dict(is_mode="token_truncate"), True),
    "grpo, sequence-mask vLLM ratio, tool mask, per-token advantages": (
        dict(loss_type="grpo", vllm_importance_sampling_mode="sequence_mask", vllm_importance_sampling_clip_max=1.5),
        dict(is_mode="sequence_mask", tool_mask=True, per_token_advantages=True), True),
    "bnpo, delta, clip-higher, plain kl": (
        dict(loss_type="bnpo", delta=1.4, epsilon_high=0.28, beta=0.05, use_bias_correction_kl=False), {}, False),
    "dr_grpo, adaptive entropy": (dict(loss_type="dr_grpo", use_adaptive_entropy=True, entropy_target=50.0), {}, False),
    "cispo": (dict(loss_type="cispo", epsilon_high=1.2), {}, False),
    "sapo, kl": (dict(loss_type="sapo", beta=0.02), {}, False),
    "luspo, token ratio": (dict(loss_type="luspo"), {}, False),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_one_pass_matches_trl(setup, case, monkeypatch):
    config, inputs, use_vllm = CASES[case]
    calls = []

    def counted(*args, **kwargs):
        calls.append(kwargs["token_chunk"])
        return one_pass_head(*args, **kwargs)

    monkeypatch.setattr(fused_trl, "one_pass_head", counted)
    compare(setup, 80 + sorted(CASES).index(case), inputs, use_vllm=use_vllm, fused=ONE_PASS, calls=2, **config)
    assert calls == [4, 4]  # each loss call went through the one-pass head


def test_one_pass_triton_interpreter(setup):
    compare(setup, 90, dict(is_mode="token_mask"), use_vllm=True, fused_backend="triton",
            fused=dict(fused_one_pass=True), beta=0.04, vllm_importance_sampling_mode="token_mask",
            vllm_importance_sampling_clip_min=0.6)


@pytest.mark.parametrize("config, match", [
    (dict(importance_sampling_level="sequence"), "sequence-level ratio"),
    (dict(top_entropy_quantile=0.5), "entropy mask"),
    (dict(off_policy_mask_threshold=0.1), "off-policy mask"),
    (dict(loss_type="vespo"), "VESPO"),
])
def test_two_passes_where_one_pass_cannot_apply(setup, config, match):
    with pytest.warns(fused_trl.FusedFallbackWarning, match=match):
        ours = make_trainer(fused_trl.FusedGRPOTrainer, setup, fused=dict(fused_one_pass=True), **config)
    assert ours.fused_plan.path == "fused" and not ours.fused_plan.one_pass


def even_words(completions, **_):
    """Fraction of the words ``w<k>`` with an even ``k``: varies within every group, so advantages are non-zero."""
    return [sum(int(w[1:]) % 2 == 0 for w in c.split() if w[1:].isdigit()) / max(1, len(c.split()))
            for c in completions]


def test_training_steps_match_trl():
    """Two optimizer steps of ``train()`` (generation, TRL's scoring, loss, AdamW) from the same seed: stock
    TRL, FusedGRPOTrainer in two passes and in one pass log the same losses and end with the same weights (SGD:
the update is linear in the gradient, so the weights compare at the gradients' precision)."""
    import tempfile

    import torch
    from datasets import Dataset
    from integration_utils import load_example
    from oracle import assert_close
    from trl import GRPOConfig, GRPOTrainer

    example = load_example("trl_grpo")
    dataset = Dataset.from_dict({"prompt": ["w1 w2 w3", "w4 w5", "w6 w8 w9", "w10"] * 2})
    results = []
    for cls, fused in ((GRPOTrainer, {}), (fused_trl.FusedGRPOTrainer, {}),
                       (fused_trl.FusedGRPOTrainer, dict(fused_one_pass=True, fused_token_chunk=5))):
        args = GRPOConfig(output_dir=tempfile.mkdtemp(), max_steps=2, per_device_train_batch_size=4, num_generations=4,
                          gradient_accumulation_steps=2, max_completion_length=6, optim="sgd", learning_rate=1.0,
                          lr_scheduler_type="constant",
                          logging_steps=1, epsilon_high=0.28, entropy_coef=0.01, temperature=0.9, seed=3,
                          report_to=[], use_cpu=True, bf16=False, save_strategy="no", gradient_checkpointing=False)
        trainer = cls(model=example.tiny_model(), reward_funcs=even_words, args=args, train_dataset=dataset,
                      processing_class=example.tiny_tokenizer(), **fused)
        trainer.train()
        history = [h for h in trainer.state.log_history if "loss" in h]
        assert all(h["reward_std"] > 0 for h in history)  # non-zero advantages: the policy term acts
        results.append((torch.tensor([h["loss"] for h in history]), trainer.model.lm_head.weight.detach().clone()))
    (ref_loss, ref_w), *ours = results
    assert len(ref_loss) == 2 and ref_loss.abs().min() > 1e-3  # it trained
    assert (ref_w - example.tiny_model().lm_head.weight).abs().max() > 1e-3
    for loss, w in ours:
        assert_close(loss, ref_loss, 1e-4, "logged losses")
        assert_close(w, ref_w, 1e-5, "lm_head after two steps", rowwise=True)


def test_bf16_autocast(setup):
    """``bf16=True`` (autocast on the CPU): the head reads bf16 as ``lm_head`` would. On-policy (no old log-probs:
    clipping, discontinuous in the ratio, would turn bf16 rounding into different clip decisions), loss and
    gradients within 1e-2 of the fp32 run (measured: TRL's own bf16 run is 8e-3 away from it)."""
    import torch
    from test_integration_trl import loss_and_grads, make_inputs
    from trl import GRPOTrainer

    config = dict(beta=0.04, entropy_coef=0.01)
    exact = make_trainer(GRPOTrainer, setup, **config)
    inputs = make_inputs(exact, 91)
    del inputs["old_per_token_logps"]
    ref_loss, ref_grads = loss_and_grads(exact, inputs)
    for fused in ({}, dict(fused_one_pass=True)):
        ours = make_trainer(fused_trl.FusedGRPOTrainer, setup, fused=fused, bf16=True, **config)
        our_loss, our_grads = loss_and_grads(ours, inputs)
        assert abs(our_loss - ref_loss) <= 1e-2 * abs(ref_loss)
        for name, want in ref_grads.items():
            assert torch.isfinite(our_grads[name]).all()
            assert (our_grads[name] - want).abs().max() <= 1e-2 * want.abs().max(), name

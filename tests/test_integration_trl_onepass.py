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

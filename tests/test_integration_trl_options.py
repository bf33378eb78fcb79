"""TRL's ``GRPOConfig`` defaults and options on ``FusedGRPOTrainer``, each against stock TRL on the same tiny
model and batch (loss, gradients and logged metrics): vLLM importance-sampling correction (all four modes;
vLLM cannot run here, so the batch carries the sampler's log-probs and TRL's ratio as TRL hands them to
``_compute_loss``, and one test drives TRL's own scoring with a stand-in generator), bias-corrected KL,
entropy bonus (static and adaptive), off-policy mask, cispo / sapo / vespo, sequence ratio with the entropy
mask; the fallbacks; validation before ``GRPOTrainer.__init__``; the per-token formulas against TRL's."""
import copy
import warnings

import pytest
import torch

pytest.importorskip("trl", reason="the TRL integration needs trl")
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from entropy_ops.integrations import trl as fused_trl  # noqa: E402
from entropy_ops.integrations import trl_losses  # noqa: E402
from oracle import assert_close  # noqa: E402
from test_integration_trl import (B, C, REL, assert_same_metrics, compare, loss_and_grads, make_inputs,  # noqa: E402
                                  make_trainer, setup)

__all__ = ["setup"]  # the module-scoped fixture, shared

IS_CASES = {  # loss_type, vllm_importance_sampling_mode, extra config
    "dapo+sequence_mask (TRL default)": ("dapo", "sequence_mask", {}),
    "grpo+token_truncate": ("grpo", "token_truncate", {}),
    "bnpo+token_mask+clip_min": ("bnpo", "token_mask", dict(vllm_importance_sampling_clip_min=0.8,
                                                             vllm_importance_sampling_clip_max=1.3)),
    "dr_grpo+sequence_truncate": ("dr_grpo", "sequence_truncate", dict(vllm_importance_sampling_clip_min=0.5)),
    "gspo+token_mask": ("grpo", "token_mask", dict(importance_sampling_level="sequence")),
}


@pytest.mark.parametrize("case", sorted(IS_CASES))
def test_vllm_importance_sampling_correction(setup, case):
    loss_type, mode, extra = IS_CASES[case]
    _, _, inputs = compare(setup, 31 + sorted(IS_CASES).index(case), dict(is_mode=mode), use_vllm=True,
                           loss_type=loss_type, vllm_importance_sampling_mode=mode, **extra)
    ratio = inputs["importance_sampling_ratio"]
    assert ratio.shape == ((B, 1) if mode.startswith("sequence") else (B, C))
    assert not torch.allclose(ratio, torch.ones_like(ratio))  # the correction changes the loss
    if mode.endswith("mask"):
        assert (ratio == 0).any()  # and the mask fires


OPTION_CASES = {
    "kl with bias correction (TRL default)": dict(loss_type="dapo", beta=0.04),
    "kl with bias correction, sequence ratio": dict(loss_type="grpo", beta=0.1, importance_sampling_level="sequence"),
    "entropy_coef": dict(loss_type="dapo", entropy_coef=0.05),
    "entropy_coef + entropy mask": dict(loss_type="grpo", entropy_coef=0.05, top_entropy_quantile=0.6),
    "off-policy mask": dict(loss_type="dapo", off_policy_mask_threshold=0.05),
    "sequence ratio + entropy mask": dict(loss_type="grpo", importance_sampling_level="sequence",
                                          top_entropy_quantile=0.5),
    "luspo + entropy mask + kl": dict(loss_type="luspo", importance_sampling_level="sequence",
                                      top_entropy_quantile=0.7, beta=0.05),
    "cispo": dict(loss_type="cispo", epsilon_high=1.3),
    "cispo sequence": dict(loss_type="cispo", epsilon_high=1.1, importance_sampling_level="sequence"),
    "sapo": dict(loss_type="sapo"),
    "sapo + kl + entropy mask": dict(loss_type="sapo", beta=0.04, top_entropy_quantile=0.5,
                                     sapo_temperature_pos=0.7),
    "vespo": dict(loss_type="vespo"),
    "vespo sequence ratio, small drift": dict(loss_type="vespo", importance_sampling_level="sequence"),
}
INPUTS = {"vespo sequence ratio, small drift": dict(old_noise=0.1)}


@pytest.mark.parametrize("case", sorted(OPTION_CASES))
def test_option_matches_trl(setup, case):
    compare(setup, 50 + sorted(OPTION_CASES).index(case), INPUTS.get(case), **OPTION_CASES[case])


def test_off_policy_mask_uses_sampler_logprobs_and_drops_a_response(setup):
    ours, _, inputs = compare(setup, 61, dict(sampling=True, is_mode="token_truncate"), use_vllm=True,
                              loss_type="grpo", off_policy_mask_threshold=0.02,
                              vllm_importance_sampling_mode="token_truncate")
    with torch.no_grad():
        logp = ours._get_per_token_logps_and_entropies(
            ours.model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1), C)[0]
    keep = trl_losses.off_policy_sequence_mask(inputs["advantages"][:, None], logp,
                                               inputs["sampling_per_token_logps"], inputs["completion_mask"], 0.02)
    assert (keep == 0).any() and (keep == 1).any()


def test_vespo_with_token_importance_ratio(setup):
    """VESPO folds the token IS ratio into its sequence weight (and skips the per-token IS factor)."""
    ours, _, _ = compare(setup, 62, dict(is_mode="token_truncate", old_noise=0.1), use_vllm=True, loss_type="vespo",
                         vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_clip_min=0.7)
    assert ours._metrics["train"]["vespo/phi_seq_mean"][-1] > 0.05  # weights of order 1, not underflowed


def test_per_token_advantages_sequence_ratio_entropy_mask_kl(setup):
    compare(setup, 63, dict(per_token_advantages=True, tool_mask=True), loss_type="grpo",
            importance_sampling_level="sequence", top_entropy_quantile=0.6, beta=0.02, entropy_coef=0.01)


def test_adaptive_entropy_controller(setup):
    """Three optimizer steps: no bonus on the first (no measurement yet), then the coefficient moves as TRL's."""
    ours, reference, _ = compare(setup, 64, calls=3, loss_type="dapo", use_adaptive_entropy=True, entropy_coef=0.02,
                                 entropy_target=50.0, entropy_coef_delta=0.01)
    assert ours.entropy_coef == reference.entropy_coef == pytest.approx(0.05)
    assert ours._last_world_entropy == pytest.approx(reference._last_world_entropy, rel=REL)


def test_eval_mode_matches_trl(setup):
    reference = make_trainer(GRPOTrainer, setup, loss_type="dapo", beta=0.04, entropy_coef=0.01)
    ours = make_trainer(fused_trl.FusedGRPOTrainer, setup, loss_type="dapo", beta=0.04, entropy_coef=0.01)
    for trainer in (reference, ours):
        trainer.model.eval()
    inputs = make_inputs(reference, 65)
    with torch.no_grad():
        assert_close(ours._compute_loss(ours.model, inputs), reference._compute_loss(reference.model, inputs), REL,
                     "eval loss")
    got, want = ours._metrics["eval"], reference._metrics["eval"]
    assert sorted(got) == sorted(want)


def test_triton_interpreter_backend(setup):
    """The fused head on the Triton kernels (interpreted on the CPU), TRL's default loss with KL and IS."""
    compare(setup, 66, dict(is_mode="sequence_mask"), use_vllm=True, fused_backend="triton", beta=0.04)


# ---------------------------------------------------------------- TRL's own scoring, with a stand-in for vLLM
class StandInVLLM:
    """Returns fixed completions and sampler log-probs in the shape ``VLLMGeneration.generate`` returns them."""

    def __init__(self, completions, logprobs):
        self.completions, self.logprobs = completions, logprobs

    def sync_weights(self):
        pass

    def generate(self, prompts, images, num_generations, profiler):
        n = len(prompts) * num_generations
        return None, self.completions[:n], [[[lp] for lp in seq] for seq in self.logprobs[:n]], None


def length_reward(completions, **_):
    return [float(len(c.split())) for c in completions]


def test_trl_scoring_with_vllm_sampler_logprobs(setup):
    """``_generate_and_score_completions`` (TRL's code: old and reference log-probs through our head, the IS
    ratio from the sampler's log-probs) then the loss, with TRL's defaults (bias-corrected KL, dapo)."""
    g = torch.Generator().manual_seed(67)
    completions = [torch.randint(2, 90, (int(n),), generator=g).tolist() + [1] for n in (6, 2, 4, 8)]
    logprobs = [(-3.0 + 0.5 * torch.randn(len(c), generator=g)).tolist() for c in completions]
    trainers = []
    for cls in (GRPOTrainer, fused_trl.FusedGRPOTrainer):
        trainer = make_trainer(cls, setup, beta=0.04, vllm_importance_sampling_mode="token_truncate")
        trainer.reward_funcs, trainer.reward_func_names = [length_reward], ["length_reward"]
        trainer.use_vllm, trainer._last_loaded_step = True, -1
        trainer.vllm_generation = StandInVLLM(completions, logprobs)
        noise = torch.Generator().manual_seed(68)
        with torch.no_grad():  # the policy a step away from the reference, as in training (KL far from its minimum)
            for p in trainer.model.parameters():
                p.add_(0.05 * p.abs().mean() * torch.randn(p.shape, generator=noise))
        trainers.append(trainer)
    batch = [{"prompt": "w1 w2 w3"}] * 4
    scored = [t._generate_and_score_completions(batch) for t in trainers]
    assert_close(scored[1]["old_per_token_logps"], scored[0]["old_per_token_logps"], REL, "old logp")
    assert_close(scored[1]["importance_sampling_ratio"], scored[0]["importance_sampling_ratio"], REL, "IS ratio")
    assert_close(scored[1]["ref_per_token_logps"], scored[0]["ref_per_token_logps"], REL, "ref logp")
    (ref_loss, ref_grads), (our_loss, our_grads) = (loss_and_grads(t, scored[0]) for t in trainers)
    assert_close(our_loss, ref_loss, REL, "loss")
    assert_close(our_grads["lm_head"], ref_grads["lm_head"], REL, "d loss / d lm_head", rowwise=True)
    assert ref_grads["lm_head"].abs().max() > 0
    assert_same_metrics(trainers[1], trainers[0])


# ---------------------------------------------------------------- fallbacks and validation
def test_small_delta_falls_back_to_trl_loss_on_fused_logprobs(setup):
    config = dict(loss_type="dapo", epsilon_high=0.28, delta=1.1)
    with pytest.warns(fused_trl.FusedFallbackWarning, match="delta"):
        ours = make_trainer(fused_trl.FusedGRPOTrainer, setup, **config)
    assert ours.fused_plan.path == "fused_logprobs"
    reference = make_trainer(GRPOTrainer, setup, **config)
    inputs = make_inputs(reference, 68)
    (ref_loss, ref_grads), (our_loss, our_grads) = loss_and_grads(reference, inputs), loss_and_grads(ours, inputs)
    assert_close(our_loss, ref_loss, REL, "loss")
    assert_close(our_grads["lm_head"], ref_grads["lm_head"], REL, "d loss / d lm_head", rowwise=True)


def test_zero3_falls_back_to_trl(setup, monkeypatch):
    import transformers.integrations.deepspeed as ds

    monkeypatch.setattr(ds, "is_deepspeed_zero3_enabled", lambda: True)  # what a ZeRO-3 DeepSpeed config sets
    with pytest.warns(fused_trl.FusedFallbackWarning, match="ZeRO-3"):
        ours = make_trainer(fused_trl.FusedGRPOTrainer, setup, beta=0.04)
    assert ours.fused_plan.path == "trl" and not ours.fused_plan.fused_head
    monkeypatch.undo()
    reference = make_trainer(GRPOTrainer, setup, beta=0.04)
    inputs = make_inputs(reference, 69)
    (ref_loss, ref_grads), (our_loss, our_grads) = loss_and_grads(reference, inputs), loss_and_grads(ours, inputs)
    assert torch.equal(our_loss, ref_loss) and torch.equal(our_grads["lm_head"], ref_grads["lm_head"])


class ShiftedHead(torch.nn.Linear):
    """An output layer that computes more than ``h W^T``: entropy-ops' fused head cannot read it from its weight."""

    def forward(self, hidden):
        return super().forward(hidden) + 0.5


def test_inexpressible_output_layer_falls_back_to_trl(setup):
    """An output layer the fused head cannot reproduce: TRL's own head and loss, with the head's reason."""
    tokenizer, model, dataset = setup
    model = copy.deepcopy(model)
    head = ShiftedHead(model.lm_head.in_features, model.lm_head.out_features, bias=False)
    head.weight = model.lm_head.weight
    model.lm_head = head
    with pytest.warns(fused_trl.FusedFallbackWarning, match="ShiftedHead"):
        ours = make_trainer(fused_trl.FusedGRPOTrainer, (tokenizer, model, dataset), loss_type="sapo")
    assert ours.fused_plan.path == "trl"
    reference = make_trainer(GRPOTrainer, (tokenizer, model, dataset), loss_type="sapo")
    inputs = make_inputs(reference, 71)
    (ref_loss, ref_grads), (our_loss, our_grads) = loss_and_grads(reference, inputs), loss_and_grads(ours, inputs)
    assert torch.equal(our_loss, ref_loss) and torch.equal(our_grads["lm_head"], ref_grads["lm_head"])


def test_unknown_logit_post_processing_falls_back_to_trl(setup):
    """A forward that rescales its logits in a way the config does not say: found before training starts."""
    import transformers

    class RescaledLlama(transformers.LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            outputs = super().forward(*args, **kwargs)
            outputs.logits = outputs.logits * 2.0
            return outputs

    tokenizer, model, dataset = setup
    rescaled = RescaledLlama(model.config)
    rescaled.load_state_dict(model.state_dict())
    with pytest.warns(fused_trl.FusedFallbackWarning, match="post-processes its logits"):
        ours = make_trainer(fused_trl.FusedGRPOTrainer, (tokenizer, rescaled, dataset))
    assert ours.fused_plan.path == "trl"


def test_no_warning_for_fused_defaults(setup):
    with warnings.catch_warnings():
        warnings.simplefilter("error", fused_trl.FusedFallbackWarning)
        ours = make_trainer(fused_trl.FusedGRPOTrainer, setup, beta=0.04, entropy_coef=0.01)
    assert ours.fused_plan.path == "fused" and ours.fused_plan.reasons == ()


def _refuse_parent(monkeypatch):
    def parent_init(self, *args, **kwargs):
        raise AssertionError("GRPOTrainer.__init__ reached")

    monkeypatch.setattr(GRPOTrainer, "__init__", parent_init)


@pytest.mark.parametrize("kwargs, config, error, match", [
    (dict(fused_backend="cuda"), {}, ValueError, "fused_backend"),
    (dict(fused_loss="yes"), {}, TypeError, "fused_loss"),
    ({}, dict(loss_type="ppo"), ValueError, "loss_type"),
    ({}, dict(vllm_importance_sampling_mode="per_token"), ValueError, "vllm_importance_sampling_mode"),
])
def test_validation_before_trl_builds_anything(setup, monkeypatch, kwargs, config, error, match):
    """Refusals come before ``GRPOTrainer.__init__`` (which would build the vLLM client with use_vllm=True)."""
    _refuse_parent(monkeypatch)
    tokenizer, model, dataset = setup
    args = GRPOConfig(output_dir="unused", use_vllm=True, report_to=[], use_cpu=True, **config)
    with pytest.raises(error, match=match):
        fused_trl.FusedGRPOTrainer(model=model, reward_funcs=[], args=args, train_dataset=dataset, **kwargs)
    with pytest.raises(TypeError, match="GRPOConfig"):
        fused_trl.FusedGRPOTrainer(model=model, args=object())


def test_vllm_defaults_are_accepted(setup, monkeypatch):
    """use_vllm with TRL's default correction is planned as fused (the parent constructor is reached)."""
    _refuse_parent(monkeypatch)
    args = GRPOConfig(output_dir="unused", use_vllm=True, beta=0.04, report_to=[], use_cpu=True)
    plan = fused_trl.plan_fused_grpo(args, model=setup[1])
    assert plan.path == "fused" and plan.surrogate_config.eps_high == 0.2
    with pytest.raises(AssertionError, match="reached"):
        fused_trl.FusedGRPOTrainer(model=setup[1], reward_funcs=[], args=args)


# ---------------------------------------------------------------- the per-token formulas against TRL's code
def test_formulas_against_trl_static_methods():
    g = torch.Generator().manual_seed(70)
    mask = (torch.rand(6, 9, generator=g) > 0.3).float()
    logp = -2.0 * torch.rand(6, 9, generator=g)
    old = logp + 0.4 * torch.randn(6, 9, generator=g)
    sampling = old + 0.3 * torch.randn(6, 9, generator=g)
    sampling[0, 2] = float("nan")  # a token the sampler could not score
    for adv in (torch.randn(6, 1, generator=g), torch.randn(6, 9, generator=g)):
        for threshold in (0.0, 0.1):
            want = GRPOTrainer.get_off_policy_mask(adv, logp, sampling, mask, threshold)
            got = trl_losses.off_policy_sequence_mask(adv, logp, sampling, mask, threshold)
            assert torch.equal(got, want)
        ratio = torch.exp(0.3 * torch.randn(6, 9, generator=g)).masked_fill(torch.rand(6, 9, generator=g) > 0.8, 0.0)
        for is_ratio in (None, ratio):
            kw = dict(k_pos=1.5, lambda_pos=2.5, k_neg=3.0, lambda_neg=2.0)
            want = GRPOTrainer.get_gamma_weights(adv, 0.2 * (logp - old), mask, is_ratio, **kw)
            got = trl_losses.vespo_gamma_weights(0.2 * (logp - old), mask, adv, is_ratio, **kw)
            assert_close(got, want, 1e-6, "phi")


# ---------------------------------------------------------------- other families (the generic output head), MoE
def _family_model(family):
    import transformers

    torch.manual_seed(1)
    if family == "gpt2":  # tied embeddings, a different body layout
        config = transformers.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                         bos_token_id=1, eos_token_id=1, pad_token_id=0)
    elif family == "mixtral":  # mixture of experts: TRL adds the router's load-balancing loss
        config = transformers.MixtralConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                            num_experts_per_tok=2, router_aux_loss_coef=0.1, pad_token_id=0,
                                            bos_token_id=1, eos_token_id=1, attn_implementation="eager")
    else:  # gemma2: final logit soft-cap
        config = transformers.Gemma2Config(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                           final_logit_softcapping=3.0, pad_token_id=0, bos_token_id=1,
                                           eos_token_id=1, attn_implementation="eager")
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(10.0)
    return model


@pytest.mark.parametrize("family", ["gpt2", "gemma2", "mixtral"])
def test_other_families_match_trl(setup, family):
    tokenizer, _, dataset = setup
    family_setup = (tokenizer, _family_model(family), dataset)
    config = dict(loss_type="grpo", entropy_coef=0.02, top_entropy_quantile=0.7, temperature=0.8,
                  disable_dropout=True)  # GPT-2 has dropout
    reference = make_trainer(GRPOTrainer, family_setup, **config)
    ours = make_trainer(fused_trl.FusedGRPOTrainer, family_setup, **config)
    assert ours.fused_plan.path == "fused"
    inputs = make_inputs(reference, 72)
    losses, grads = [], []
    for trainer in (reference, ours):
        trainer.model.zero_grad(set_to_none=True)
        loss = trainer._compute_loss(trainer.model, inputs)
        loss.backward()
        losses.append(loss.detach())
        grads.append(trainer.model.get_output_embeddings().weight.grad.clone())
    assert_close(losses[1], losses[0], REL, "loss")
    assert_close(grads[1], grads[0], REL, "d loss / d output layer", rowwise=True)
    assert grads[0].abs().max() > 1e-4
    assert_same_metrics(ours, reference)
    assert ("aux_loss" in ours._metrics["train"]) == (family == "mixtral")

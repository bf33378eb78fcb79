"""``entropy_ops.integrations.trl``: ``FusedGRPOTrainer`` against TRL's own ``GRPOTrainer`` on the same
tiny model and the same hand-built batch: per-token log-probs, loss, parameter gradients and logged metrics.
The helpers here are shared with ``test_integration_trl_options.py`` (TRL's other options)."""
import copy
import math
import tempfile

import pytest
import torch

pytest.importorskip("trl", reason="the TRL integration needs trl")
transformers = pytest.importorskip("transformers")
from datasets import Dataset  # noqa: E402  (a trl dependency)
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from entropy_ops.integrations import trl as fused_trl  # noqa: E402
from oracle import assert_close  # noqa: E402

VOCAB, P, C, B = 97, 4, 7, 5  # vocab, prompt and completion columns, rows
REL = 1e-5  # fp32 on both sides: our head against TRL's (different summation order through the body)
REL_SAME_HEAD = 2e-6  # our loss against TRL's loss code on the same fused log-probs


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A word-level tokenizer, a one-column prompt dataset and a tiny random Llama (built once)."""
    words = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i + 2 for i in range(VOCAB - 2)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                                      eos_token_id=1, attn_implementation="eager")
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # logits of several units: clipping and the entropy mask both bite
    # beta > 0 makes TRL load a reference model from config._name_or_path: a local copy, offline
    model.save_pretrained(tmp_path_factory.mktemp("tiny_llama"))
    model.config._name_or_path = str(tmp_path_factory.getbasetemp() / "tiny_llama0")
    dataset = Dataset.from_dict({"prompt": ["w1 w2 w3", "w4 w5"] * 4})
    return tokenizer, model, dataset


def zero_reward(completions, **_):
    return [0.0] * len(completions)


def make_trainer(cls, setup, *, fused_backend=None, fused=None, **config):
    tokenizer, model, dataset = setup
    config = {"bf16": False, **config}
    args = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=C + 3, report_to=[], use_cpu=True, save_strategy="no",
                      gradient_checkpointing=False, **config)
    extra = dict(fused or {}, **({} if fused_backend is None else dict(fused_backend=fused_backend)))
    trainer = cls(model=copy.deepcopy(model), reward_funcs=zero_reward, args=args, train_dataset=dataset,
                  processing_class=tokenizer, **extra)
    trainer.current_gradient_accumulation_steps = 2  # set by train(); the normalizers read it
    trainer.model.train()  # "train" mode normalizers; the tiny model has no dropout
    return trainer


def trl_importance_ratio(old, sampling, mask, mode, clip_min, clip_max):
    """The vLLM importance-sampling ratio TRL puts in ``inputs["importance_sampling_ratio"]`` when it scores a
    batch (``GRPOConfig.vllm_importance_sampling_mode``): ``exp(old - sampling)`` per token or ``exp`` of its
    per-response sum, truncated into ``[clip_min, clip_max]`` or set to 0 outside it."""
    diff = torch.nan_to_num((old - sampling) * mask, nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        return ratio.clamp(min=clip_min, max=clip_max)
    low = -float("inf") if clip_min is None else clip_min
    high = float("inf") if clip_max is None else clip_max
    return ratio.masked_fill((ratio < low) | (ratio > high), 0.0)


def make_inputs(trainer, seed, *, per_token_advantages=False, tool_mask=False, sampling=False, is_mode=None,
                old_noise=0.6):
    """A batch as ``_generate_and_score_completions`` hands it to ``_compute_loss``: left-padded prompts,
    right-padded completions (one of them empty), old/ref log-probs off the current policy; with ``sampling``
    the sampler's (vLLM's) log-probs, with ``is_mode`` TRL's importance-sampling ratio from them."""
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(2, VOCAB, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[0, :2] = 0
    completion_ids = torch.randint(2, VOCAB, (B, C), generator=g)
    lengths = torch.tensor([C, 3, 0, 5, 6])
    completion_mask = (torch.arange(C)[None, :] < lengths[:, None]).long()
    inputs = dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                  completion_mask=completion_mask)
    with torch.no_grad():
        logp, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1),
            C)
    inputs["old_per_token_logps"] = logp + old_noise * torch.randn(B, C, generator=g)
    inputs["ref_per_token_logps"] = logp + 0.5 * torch.randn(B, C, generator=g)
    inputs["advantages"] = torch.randn((B, C) if per_token_advantages else (B,), generator=g)
    inputs["num_items_in_batch"] = completion_mask.sum().float() * 3  # the generation batch spans more steps
    if tool_mask:
        inputs["tool_mask"] = (torch.rand(B, C, generator=g) > 0.2).long()
    if sampling or is_mode:
        noise = 0.7 * torch.randn(B, C, generator=g)
        inputs["sampling_per_token_logps"] = (inputs["old_per_token_logps"] + noise) * completion_mask
    if is_mode:
        args = trainer.args
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        inputs["importance_sampling_ratio"] = trl_importance_ratio(
            inputs["old_per_token_logps"], inputs["sampling_per_token_logps"], mask, is_mode,
            args.vllm_importance_sampling_clip_min, args.vllm_importance_sampling_clip_max)
    return inputs


def loss_and_grads(trainer, inputs):
    model = trainer.model
    model.zero_grad(set_to_none=True)
    loss = trainer._compute_loss(model, inputs)
    loss.backward()
    body = model.get_decoder()
    params = {"lm_head": model.lm_head.weight, "embed": body.embed_tokens.weight,
              "layer 1 o_proj": body.layers[1].self_attn.o_proj.weight}
    return loss.detach(), {k: p.grad.clone() for k, p in params.items()}


def assert_same_metrics(ours, reference):
    """The same metric names as TRL, with the same values (TRL's counting), after each loss call."""
    got, want = ours._metrics["train"], reference._metrics["train"]
    assert sorted(got) == sorted(want)
    for name in want:
        assert len(got[name]) == len(want[name]), name
        for g, w in zip(got[name], want[name]):
            assert (math.isnan(g) and math.isnan(w)) or abs(g - w) <= REL * (abs(w) + 1e-3), (name, g, w)


def compare(setup, seed, inputs_kwargs=None, *, use_vllm=False, fused_backend=None, fused=None, calls=1, **config):
    """Stock TRL and FusedGRPOTrainer on the same batch: loss, gradients and logged metrics (``calls`` times).
    ``fused``: FusedGRPOTrainer's own arguments (e.g. ``fused_one_pass``)."""
    reference = make_trainer(GRPOTrainer, setup, **config)
    ours = make_trainer(fused_trl.FusedGRPOTrainer, setup, fused_backend=fused_backend, fused=fused, **config)
    assert ours.fused_plan.path == "fused"
    assert ours.fused_plan.one_pass == bool((fused or {}).get("fused_one_pass"))
    # TRL's own loss code on our fused log-probs: the loss composition alone, without the two heads' rounding
    trl_loss = make_trainer(fused_trl.FusedGRPOTrainer, setup, fused_backend=fused_backend,
                            fused=dict(fused or {}, fused_loss=False, fused_one_pass=False), **config)
    for trainer in (reference, ours, trl_loss):  # vLLM cannot run here: TRL's loss reads these two attributes
        trainer.use_vllm = use_vllm
    inputs = make_inputs(reference, seed, **(inputs_kwargs or {}))
    for _ in range(calls):
        ref_loss, ref_grads = loss_and_grads(reference, inputs)
        our_loss, our_grads = loss_and_grads(ours, inputs)
        assert_close(our_loss, ref_loss, REL, "loss")
        for name in ref_grads:
            assert_close(our_grads[name], ref_grads[name], REL, f"d loss / d {name}", rowwise=True)
        assert ref_grads["lm_head"].abs().max() > 1e-4  # the case is not vacuous
        same_head_loss, same_head_grads = loss_and_grads(trl_loss, inputs)
        assert_close(our_loss, same_head_loss, REL_SAME_HEAD, "loss (same head)")
        for name in ref_grads:
            assert_close(our_grads[name], same_head_grads[name], REL_SAME_HEAD, f"d loss / d {name} (same head)",
                         rowwise=True)
    assert_same_metrics(ours, reference)
    return ours, reference, inputs


CASES = {
    "grpo": dict(loss_type="grpo"),
    "bnpo+kl": dict(loss_type="bnpo", beta=0.04, use_bias_correction_kl=False, temperature=0.7),
    "dr_grpo+entropy_mask": dict(loss_type="dr_grpo", top_entropy_quantile=0.5),
    "dapo+clip_higher+delta": dict(loss_type="dapo", epsilon_high=0.28, delta=1.5),
    "gspo": dict(loss_type="grpo", importance_sampling_level="sequence", epsilon=3e-4, epsilon_high=4e-4),
    "bnpo+sequence": dict(loss_type="bnpo", importance_sampling_level="sequence", beta=0.1,
                          use_bias_correction_kl=False),
    "luspo": dict(loss_type="luspo", importance_sampling_level="sequence"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_loss_and_grads_match_trl(setup, case):
    ours, _, inputs = compare(setup, sorted(CASES).index(case), **CASES[case])
    if "delta" in CASES[case]:  # the fixture reaches the dual-clip branch: A < 0 and ratio > delta
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
        with torch.no_grad():
            logp = ours._get_per_token_logps_and_entropies(ours.model, ids, mask, C)[0]
        ratio = torch.exp(logp - inputs["old_per_token_logps"])
        fired = (ratio > CASES[case]["delta"]) & (inputs["advantages"][:, None] < 0) & (inputs["completion_mask"] > 0)
        assert fired.any()


def test_per_token_advantages_and_tool_mask(setup):
    compare(setup, 21, dict(per_token_advantages=True, tool_mask=True), loss_type="dapo", beta=0.02,
            use_bias_correction_kl=False)


def test_logprobs_and_entropy_match_trl_head(setup):
    """Our fused head through TRL's own ``_get_per_token_logps_and_entropies`` equals TRL's fused head."""
    reference = make_trainer(GRPOTrainer, setup, temperature=0.8)
    ours = make_trainer(fused_trl.FusedGRPOTrainer, setup, temperature=0.8)
    inputs = make_inputs(reference, 5)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    ref = reference._get_per_token_logps_and_entropies(reference.model, ids, mask, C, compute_entropy=True)
    got = ours._get_per_token_logps_and_entropies(ours.model, ids, mask, C, compute_entropy=True)
    assert_close(got[0], ref[0], REL, "logp")
    assert_close(got[1], ref[1], REL, "entropy")
    assert (got[0][inputs["completion_mask"] == 0] == 0).all()
    # generation is untouched: a plain call still returns logits
    assert ours.model(input_ids=ids, attention_mask=mask).logits.shape == (B, P + C, VOCAB)


def test_trl_loss_on_our_logprobs(setup):
    """fused_loss=False keeps TRL's own loss code on our fused log-probs."""
    reference = make_trainer(GRPOTrainer, setup, loss_type="cispo")
    ours = make_trainer(lambda **kw: fused_trl.FusedGRPOTrainer(fused_loss=False, **kw), setup, loss_type="cispo")
    assert ours.fused_plan.path == "fused_logprobs" and ours.fused_plan.reasons == ()
    inputs = make_inputs(reference, 8)
    ref_loss, ref_grads = loss_and_grads(reference, inputs)
    our_loss, our_grads = loss_and_grads(ours, inputs)
    assert_close(our_loss, ref_loss, REL, "loss")
    assert_close(our_grads["lm_head"], ref_grads["lm_head"], REL, "d/d lm_head", rowwise=True)


def test_metrics_logged_under_trl_names(setup):
    """Every metric TRL logs for the loss, under its name and counting, the per-response extremes included."""
    ours, _, _ = compare(setup, 9, loss_type="bnpo", beta=0.04)
    names = set(ours._metrics["train"])
    assert {"entropy", "kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
            "clip_ratio/low_min", "clip_ratio/high_max"} <= names


def test_gspo_clip_metrics_count_responses(setup):
    """With a sequence-level ratio TRL counts a clipped response once, not once per token: the fixture's responses
    have different lengths, so the per-token count would differ."""
    ours, _, inputs = compare(setup, 4, loss_type="grpo", importance_sampling_level="sequence", epsilon=3e-4,
                              epsilon_high=4e-4)
    high = ours._metrics["train"]["clip_ratio/high_mean"][-1]
    low = ours._metrics["train"]["clip_ratio/low_mean"][-1]
    assert high + low > 0
    assert (high * B) == pytest.approx(round(high * B)) and (low * B) == pytest.approx(round(low * B))


def test_sequence_level_with_per_token_advantages(setup):
    """TRL broadcasts the sequence ratio over per-token advantages; so do we."""
    compare(setup, 3, dict(per_token_advantages=True), loss_type="grpo", importance_sampling_level="sequence")


def test_add_fused_lm_head_rejects_unknown_outputs(setup):
    model = copy.deepcopy(setup[1])
    with pytest.raises(ValueError, match="outputs"):
        fused_trl.add_fused_lm_head(model, outputs=("log_probs", "is_top1"))


def test_example_trains_one_step():
    """The example end to end: generation, scoring through our fused head, our loss, one optimizer step."""
    from integration_utils import load_example

    for one_pass in (True, False):
        history = load_example("trl_grpo").main(max_steps=1, one_pass=one_pass)
        assert len(history) == 1
        assert torch.isfinite(torch.tensor(history[0]["loss"])) and history[0]["entropy"] > 0

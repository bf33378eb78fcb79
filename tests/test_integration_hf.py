"""``entropy_ops.integrations.hf`` on tiny random models of each supported family, against the
float64 log-softmax of the model's own logits at the same alignment, values and parameter gradients."""
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the Hugging Face integration needs transformers")

from entropy_ops.integrations import hf  # noqa: E402
from oracle import TOL, assert_close, logprobs_entropy_reference  # noqa: E402

B, T = 3, 11
COMMON = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, attn_implementation="eager")
# family -> (config class, config overrides, multiplier of the output weight). The multiplier makes
# the logits large enough (|z| of several units) that a missing soft-cap or logit scale shows.
FAMILIES = {
    "llama": ("LlamaConfig", dict(vocab_size=97), 1.0),
    "mistral": ("MistralConfig", dict(vocab_size=101, sliding_window=None), 1.0),
    "qwen2": ("Qwen2Config", dict(vocab_size=103, tie_word_embeddings=True), 1.0),  # tied
    "qwen3": ("Qwen3Config", dict(vocab_size=107, head_dim=8), 1.0),
    "gemma": ("GemmaConfig", dict(vocab_size=109, head_dim=8), 1.0),  # tied by default
    "gemma2": ("Gemma2Config", dict(vocab_size=113, head_dim=8, final_logit_softcapping=2.0,
                                    query_pre_attn_scalar=8, sliding_window=4), 40.0),
    "gemma3_text": ("Gemma3TextConfig", dict(vocab_size=127, head_dim=8, final_logit_softcapping=3.0,
                                             query_pre_attn_scalar=8, sliding_window=4), 40.0),
    "cohere": ("CohereConfig", dict(vocab_size=131, logit_scale=0.25, bos_token_id=1, eos_token_id=2), 40.0),
    "granite": ("GraniteConfig", dict(vocab_size=137, logits_scaling=4.0), 40.0),
    "phi3": ("Phi3Config", dict(vocab_size=139, pad_token_id=0, bos_token_id=1, eos_token_id=2), 1.0),
    "mixtral": ("MixtralConfig", dict(vocab_size=149, num_local_experts=4, num_experts_per_tok=2), 1.0),
}


def make_model(family, seed, dtype=torch.float32):
    config_cls, overrides, head_mult = FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**{**COMMON, **overrides})
    model = transformers.AutoModelForCausalLM.from_config(config).to(dtype).eval()
    assert model.config.model_type == family
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(head_mult)
    return model


def make_batch(vocab, seed):
    """Left-padded prompts (3-5 tokens) and completions with right padding; one empty completion row."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (B, T), generator=g)
    attention_mask = torch.ones(B, T, dtype=torch.long)
    attention_mask[0, :2] = 0  # left padding
    completion = torch.zeros(B, T, dtype=torch.bool)
    completion[0, 5:] = True
    completion[1, 4:9] = True  # right padding after it
    completion[2, 6:] = True
    completion[2, 8] = False  # a hole (e.g. a tool-output token)
    return input_ids, attention_mask, completion


def reference(model, input_ids, attention_mask, completion, temperature):
    """float64 ``(logp, H)`` ``[B, T]`` from ``model(...).logits`` at position ``t - 1`` for token ``t``."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.double()
    targets = torch.where(completion[:, 1:], input_ids[:, 1:], -100)
    logp, H = logprobs_entropy_reference(logits[:, :-1], targets, temperature)
    pad = torch.zeros(input_ids.shape[0], 1, dtype=torch.float64)
    return torch.cat((pad, logp), 1), torch.cat((pad, H), 1)


def grad_params(model):
    """The output weight (the embedding when tied), one attention projection and the final norm."""
    body = model.get_decoder()
    return {"output weight": model.get_output_embeddings().weight,
            "layer 0 o_proj": body.layers[0].self_attn.o_proj.weight,
            "final norm": body.norm.weight}


def value_and_grads(fn, model, g_logp, g_H):
    model.zero_grad(set_to_none=True)
    logp, H = fn()
    ((logp * g_logp).sum() + (H * g_H).sum()).backward()
    return logp.detach(), H.detach(), {k: p.grad.clone() for k, p in grad_params(model).items()}


def check_against_reference(model, seed, temperature, backend, tol=TOL[torch.float32]):
    vocab = model.config.vocab_size
    input_ids, attention_mask, completion = make_batch(vocab, seed)
    g = torch.Generator().manual_seed(seed + 1)
    g_logp, g_H = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    ours = value_and_grads(lambda: hf.compute_logprobs_and_entropy(
        model, input_ids, attention_mask, completion, temperature=temperature, backend=backend), model, g_logp, g_H)
    ref = value_and_grads(lambda: reference(model, input_ids, attention_mask, completion, temperature),
                          model, g_logp.double(), g_H.double())
    assert ours[0].dtype == torch.float32 and ours[0].shape == (B, T)
    assert_close(ours[0], ref[0], tol["fwd"], "logp")
    assert_close(ours[1], ref[1], tol["fwd"], "entropy")
    assert (ours[0][~completion] == 0).all() and (ours[1][~completion] == 0).all()
    for name in ours[2]:
        assert_close(ours[2][name], ref[2][name], tol["grad"], f"d/d {name}", rowwise=True)
    return ref


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_matches_model_logits(family):
    seed = sorted(FAMILIES).index(family)
    model = make_model(family, seed)
    ref = check_against_reference(model, seed, temperature=0.7, backend="torch")
    assert ref[0].abs().max() > 0.5  # the fixture is not degenerate


@pytest.mark.parametrize("family", ["gemma2", "cohere", "granite"])
def test_logit_transform_matters(family):
    """The fixtures make the soft-cap / scale change the result, so the test above would catch dropping it."""
    model = make_model(family, 3)
    head = hf.output_head(model)
    assert (head.softcap is not None) != (head.scale != 1.0)
    input_ids, attention_mask, completion = make_batch(model.config.vocab_size, 3)
    ours, _ = hf.compute_logprobs_and_entropy(model, input_ids, attention_mask, completion, backend="torch")
    plain = hf.OutputHead(head.weight, head.bias)  # the head without its transform
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    rows = completion[:, 1:]
    wrong, _ = hf.head_logprobs_and_entropy(plain, hidden[:, :-1][rows], input_ids[:, 1:][rows], backend="torch")
    assert (ours[:, 1:][rows] - wrong).abs().max() > 0.1


def test_triton_backend_llama():
    """The real kernels (Triton interpreter) behind the same helper."""
    check_against_reference(make_model("llama", 11), 11, temperature=1.3, backend="triton")


def test_bf16_model_within_tolerance():
    """bf16 body and head: our fp32-accumulated result vs the float64 log-softmax of the model's bf16 logits."""
    model = make_model("qwen2", 5, dtype=torch.bfloat16)
    input_ids, attention_mask, completion = make_batch(model.config.vocab_size, 5)
    logp, H = hf.compute_logprobs_and_entropy(model, input_ids, attention_mask, completion, backend="torch")
    ref_logp, ref_H = reference(model, input_ids, attention_mask, completion, 1.0)
    assert_close(logp, ref_logp, 1e-2, "logp (bf16)")
    assert_close(H, ref_H, 1e-2, "entropy (bf16)")


def test_autocast_follows_lm_head(monkeypatch):
    """Under autocast the head reads the autocast dtype (as ``lm_head`` would) with fp32 master weights."""
    from entropy_ops import output_head as head_module

    model = make_model("llama", 12)
    seen = []
    op = head_module.linear_logprobs_and_entropy

    def spy(hidden, weight, *args, **kwargs):
        seen.append((hidden.dtype, weight.dtype, torch.is_autocast_enabled("cpu")))
        return op(hidden, weight, *args, **kwargs)

    monkeypatch.setattr(head_module, "linear_logprobs_and_entropy", spy)
    input_ids, attention_mask, completion = make_batch(model.config.vocab_size, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp, H = hf.compute_logprobs_and_entropy(model, input_ids, attention_mask, completion, backend="torch")
        ref_logp, ref_H = reference(model, input_ids, attention_mask, completion, 1.0)
    assert seen == [(torch.bfloat16, torch.bfloat16, False)]  # the op itself runs with autocast off
    assert_close(logp, ref_logp, 1e-2, "logp (autocast bf16)")
    assert_close(H, ref_H, 1e-2, "entropy (autocast bf16)")
    logp.sum().backward()
    assert model.lm_head.weight.grad.dtype == torch.float32


def test_tied_embeddings_share_gradient():
    """With tied weights the output layer's gradient lands on the input embedding (one tensor)."""
    model = make_model("qwen2", 7)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    input_ids, attention_mask, completion = make_batch(model.config.vocab_size, 7)
    logp, H = hf.compute_logprobs_and_entropy(model, input_ids, attention_mask, completion, backend="torch")
    (logp.sum() + H.sum()).backward()
    grad = model.get_input_embeddings().weight.grad
    assert grad is not None and grad.abs().sum() > 0 and not torch.isnan(grad).any()


def test_never_builds_logits():
    """The output layer's own forward (which would build [B, T, V]) is never called."""
    model = make_model("llama", 2)

    def forbid(*_):
        raise AssertionError("lm_head.forward was called: logits were materialized")

    model.get_output_embeddings().register_forward_hook(forbid)
    input_ids, attention_mask, completion = make_batch(model.config.vocab_size, 2)
    logp, _ = hf.compute_logprobs_and_entropy(model, input_ids, attention_mask, completion, backend="torch")
    logp.sum().backward()


def test_no_completion_tokens_gives_zeros_and_a_graph():
    model = make_model("llama", 4)
    input_ids, attention_mask, _ = make_batch(model.config.vocab_size, 4)
    none = torch.zeros(B, T, dtype=torch.bool)
    logp, H = hf.compute_logprobs_and_entropy(model, input_ids, attention_mask, none, backend="torch")
    assert (logp == 0).all() and (H == 0).all()
    (logp.sum() + H.sum()).backward()  # a differentiable zero, not an error


def test_position_ids_are_forwarded():
    """kwargs reach the body: explicit position ids change the result exactly as they change the logits."""
    model = make_model("llama", 6)
    input_ids, attention_mask, completion = make_batch(model.config.vocab_size, 6)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logp, _ = hf.compute_logprobs_and_entropy(model, input_ids, attention_mask, completion, backend="torch",
                                              position_ids=position_ids)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   use_cache=False).logits.double()
    targets = torch.where(completion[:, 1:], input_ids[:, 1:], -100)
    ref, _ = logprobs_entropy_reference(logits[:, :-1], targets)
    assert_close(logp[:, 1:], ref, 1e-5, "logp with position_ids")


def test_bad_inputs_raise():
    model = make_model("llama", 8)
    input_ids, attention_mask, completion = make_batch(model.config.vocab_size, 8)
    first = completion.clone()
    first[0, 0] = True
    with pytest.raises(ValueError, match=r"completion_mask\[:, 0\]"):
        hf.compute_logprobs_and_entropy(model, input_ids, attention_mask, first)
    padded = completion.clone()
    padded[0, 1] = True  # attention_mask[0, 1] is 0
    with pytest.raises(ValueError, match="attention_mask is 0"):
        hf.compute_logprobs_and_entropy(model, input_ids, attention_mask, padded)
    with pytest.raises(ValueError, match="completion_mask must be a tensor"):
        hf.compute_logprobs_and_entropy(model, input_ids, attention_mask, completion[:, 1:])
    with pytest.raises(ValueError, match="0/1"):
        hf.compute_logprobs_and_entropy(model, input_ids, attention_mask, completion.long() * 2)
    with pytest.raises(TypeError, match="input_ids must have an integer dtype"):
        hf.compute_logprobs_and_entropy(model, input_ids.float(), attention_mask, completion)
    with pytest.raises(ValueError, match="temperature"):
        hf.compute_logprobs_and_entropy(model, input_ids, attention_mask, completion, temperature=0.0)


def test_unsupported_heads_raise():
    model = make_model("llama", 9)
    model.lm_head = torch.nn.Sequential(model.lm_head)  # e.g. an adapter wrapping the head
    with pytest.raises(TypeError, match="'llama'.*plain torch.nn.Linear"):
        hf.output_head(model)
    cohere = make_model("cohere", 9)
    cohere.config.logit_scale = -1.0
    with pytest.raises(ValueError, match="'cohere'.*logit_scale must be a finite number > 0"):
        hf.output_head(cohere)
    bert = transformers.BertModel(transformers.BertConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2,
                                                          intermediate_size=16, vocab_size=50))
    with pytest.raises(TypeError, match="'bert'.*no output layer"):
        hf.output_head(bert)
    with pytest.raises(ValueError, match="not both"):
        hf.OutputHead(cohere.lm_head.weight, scale=2.0, softcap=30.0)


def test_example_runs():
    from integration_utils import load_example

    assert load_example("hf_logprobs").main() < 1e-5

"""``entropy_ops.patch(model)`` on tiny random models of 15 families (13 causal LMs, LLaVA and Qwen2-VL fed
images), in float64: loss and every parameter gradient against the unpatched model's
``ForCausalLMLoss`` recomputed in float64 from its logits, the output layer never called."""
import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers", reason="entropy_ops.patch needs transformers")

import entropy_ops  # noqa: E402
from entropy_ops.integrations import hf  # noqa: E402
from entropy_ops.output_head import output_head  # noqa: E402
from oracle import assert_close, logprobs_entropy_reference  # noqa: E402

B, T = 2, 9
TOL64 = 1e-9
# Gradients: the linear op keeps its per-row statistics (max, log-sum, entropy) and the upstream
# gradient in fp32 also for fp64 inputs, so fp64 gradients agree to about fp32 precision, relative
# to each gradient's largest entry (a key bias's exactly-zero gradient then passes as ~1e-19).
GRAD_TOL64 = 1e-6
COMMON = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
# family -> (config class, overrides, multiplier of the output weight). The multiplier makes the
# logits large (|z| of several units), so a dropped soft-cap or logit scale changes the loss.
FAMILIES = {
    "llama": ("LlamaConfig", dict(COMMON, vocab_size=97), 1.0),
    "mistral": ("MistralConfig", dict(COMMON, vocab_size=101, sliding_window=None), 1.0),
    "qwen2": ("Qwen2Config", dict(COMMON, vocab_size=103, tie_word_embeddings=True), 1.0),  # tied
    "qwen3": ("Qwen3Config", dict(COMMON, vocab_size=107, head_dim=8), 1.0),
    "gemma2": ("Gemma2Config", dict(COMMON, vocab_size=109, head_dim=8, final_logit_softcapping=2.0,
                                    query_pre_attn_scalar=8, sliding_window=4), 40.0),
    "gemma3_text": ("Gemma3TextConfig", dict(COMMON, vocab_size=113, head_dim=8, final_logit_softcapping=3.0,
                                             query_pre_attn_scalar=8, sliding_window=4), 40.0),
    "phi3": ("Phi3Config", dict(COMMON, vocab_size=127, pad_token_id=0, bos_token_id=1, eos_token_id=2), 1.0),
    "cohere": ("CohereConfig", dict(COMMON, vocab_size=131, logit_scale=0.25, bos_token_id=1, eos_token_id=2), 40.0),
    "granite": ("GraniteConfig", dict(COMMON, vocab_size=137, logits_scaling=4.0), 40.0),
    "gpt2": ("GPT2Config", dict(vocab_size=139, n_embd=32, n_layer=1, n_head=4, n_positions=64,
                                bos_token_id=0, eos_token_id=0), 1.0),
    "gpt_neox": ("GPTNeoXConfig", dict(vocab_size=149, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                       num_attention_heads=4, max_position_embeddings=64), 1.0),
    "olmo": ("OlmoConfig", dict(COMMON, vocab_size=151, eos_token_id=0), 1.0),
    "llama_bias": ("LlamaConfig", dict(COMMON, vocab_size=157), 1.0),  # an output layer with a bias
}
VLM = "llava"  # LlavaForConditionalGeneration with a 1-layer CLIP tower and a llama text model
QWEN2_VL = "qwen2_vl"  # Qwen2VLForConditionalGeneration: its own vision tower, M-RoPE
VLMS = (VLM, QWEN2_VL)
IMAGE_TOKEN = 119
QWEN_IMAGE, QWEN_START, QWEN_END = 140, 142, 143


def make_vlm(seed):
    torch.manual_seed(seed)
    vision = transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=8, patch_size=4, projection_dim=16)
    text = transformers.LlamaConfig(**dict(COMMON, vocab_size=120))
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
                                      vision_feature_layer=-1)
    return transformers.LlavaForConditionalGeneration(config).double().eval()


def make_qwen2_vl(seed):
    torch.manual_seed(seed)
    text = dict(vocab_size=150, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, rope_parameters=dict(rope_type="default", mrope_section=[1, 1, 2],
                                                            rope_theta=10000.0))
    vision = dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=2, spatial_merge_size=2,
                  temporal_patch_size=2, in_channels=3)
    config = transformers.Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=QWEN_IMAGE,
                                        video_token_id=141, vision_start_token_id=QWEN_START,
                                        vision_end_token_id=QWEN_END, bos_token_id=0, eos_token_id=1)
    return transformers.Qwen2VLForConditionalGeneration(config).double().eval()


def make_model(family, seed):
    if family == VLM:
        return make_vlm(seed)
    if family == QWEN2_VL:
        return make_qwen2_vl(seed)
    config_cls, overrides, head_mult = FAMILIES[family]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, config_cls)(**overrides))
    if family == "llama_bias":
        old = model.lm_head
        model.lm_head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    model = model.double().eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(head_mult)
    return model


def make_inputs(model, family, seed):
    """input_ids, labels (prompt and one hole ignored) and extra forward kwargs (the image for the VLM)."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.get_output_embeddings().weight.shape[0]
    input_ids = torch.randint(2, min(vocab, IMAGE_TOKEN), (B, T), generator=g)  # no special ids
    extra = {}
    if family == VLM:
        input_ids[:, 1:5] = IMAGE_TOKEN  # 8x8 image, 4x4 patches: 4 image tokens per row
        extra["pixel_values"] = torch.randn(B, 3, 8, 8, generator=g, dtype=torch.float64)
    if family == QWEN2_VL:  # per row: <start> 4 image tokens <end>; a 1x4x4 patch grid merged 2x2
        input_ids[:, 1], input_ids[:, 2:6], input_ids[:, 6] = QWEN_START, QWEN_IMAGE, QWEN_END
        extra["pixel_values"] = torch.randn(B * 16, 3 * 2 * 2 * 2, generator=g, dtype=torch.float64)
        extra["image_grid_thw"] = torch.tensor([[1, 4, 4]] * B)
        extra["mm_token_type_ids"] = (input_ids == QWEN_IMAGE).long()
    labels = input_ids.clone()
    labels[:, :5] = -100
    labels[1, 7] = -100
    return input_ids, labels, extra


def reference_loss(logits, labels, num_items_in_batch=None):
    """transformers' ForCausalLMLoss in float64: shift, ignore -100, mean (or sum / num_items_in_batch)."""
    targets = F.pad(labels, (0, 1), value=-100)[:, 1:].reshape(-1)
    flat = logits.double().reshape(-1, logits.shape[-1])
    if num_items_in_batch is None:
        return F.cross_entropy(flat, targets, ignore_index=-100)
    return F.cross_entropy(flat, targets, ignore_index=-100, reduction="sum") / num_items_in_batch


def grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params, allow_unused=True)


def count_calls(module):
    calls = []
    module.register_forward_hook(lambda *args: calls.append(1))
    return calls


def assert_grads_close(ours, ref, model):
    """Each parameter's gradient within GRAD_TOL64 of the reference, relative to that gradient's max-norm."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for name, a, e in zip(names, ours, ref):
        assert (a is None) == (e is None), name
        if a is None:
            continue
        assert not torch.isnan(a).any(), f"d loss / d {name}: NaN"
        err, scale = (a - e).abs(), e.abs().max()
        worst = int(err.flatten().argmax())
        assert err.max() <= GRAD_TOL64 * scale + 1e-15, (
            f"d loss / d {name}: worst at flat index {worst}: got {a.flatten()[worst]:.10g}, "
            f"expected {e.flatten()[worst]:.10g}, max |expected| {scale:.3g}")


@pytest.mark.parametrize("family", sorted(FAMILIES) + list(VLMS))
def test_patched_loss_and_grads_match_unpatched(family):
    seed = (sorted(FAMILIES) + list(VLMS)).index(family)
    model = make_model(family, seed)
    input_ids, labels, extra = make_inputs(model, family, seed)
    out = model(input_ids=input_ids, **extra)
    ref = reference_loss(out.logits, labels)
    ref_grads = grads(model, ref)
    stock_loss = model(input_ids=input_ids, labels=labels, **extra).loss  # transformers' own (fp32 logits)

    assert entropy_ops.patch(model) is model
    calls = count_calls(model.get_output_embeddings())
    patched = model(input_ids=input_ids, labels=labels, **extra)
    assert patched.logits is None and calls == []
    assert patched.loss.dtype == torch.float64
    assert_close(patched.loss, ref, TOL64, "loss")
    assert_close(patched.loss, stock_loss, 1e-6, "loss vs transformers' fp32 loss")
    assert_grads_close(grads(model, patched.loss), ref_grads, model)
    assert calls == []
    assert ref > 1.0  # not degenerate


@pytest.mark.parametrize("family", ["gemma2", "cohere", "granite"])
def test_logit_transform_changes_the_loss(family):
    """The fixtures make the soft-cap / scale matter, so the test above would catch dropping it."""
    model = make_model(family, 0)
    input_ids, labels, _ = make_inputs(model, family, 0)
    head = output_head(model)
    assert head.scale != 1.0 or head.softcap is not None
    hidden, _, _ = hf.captured_hidden(model, input_ids=input_ids)
    plain_logits = torch.nn.functional.linear(hidden, head.weight)
    real = reference_loss(model(input_ids=input_ids).logits, labels)
    assert (reference_loss(plain_logits, labels) - real).abs() > 0.1


def test_num_items_in_batch_shift_labels_and_return_options():
    model = make_model("qwen2", 3)
    input_ids, labels, _ = make_inputs(model, "qwen2", 3)
    n_items = torch.tensor(11)
    logits = model(input_ids=input_ids).logits
    shift = F.pad(labels, (0, 1), value=-100)[:, 1:]
    entropy_ops.patch(model)
    out = model(input_ids=input_ids, labels=labels, num_items_in_batch=n_items)
    assert_close(out.loss, reference_loss(logits, labels, n_items), TOL64, "loss / num_items_in_batch")
    # shift_labels (already shifted) take precedence over labels, as in ForCausalLMLoss
    by_shift = model(input_ids=input_ids, labels=torch.zeros_like(labels), shift_labels=shift)
    assert_close(by_shift.loss, reference_loss(logits, labels), TOL64, "loss from shift_labels")
    with_logits = model(input_ids=input_ids, labels=labels, return_logits=True)
    assert_close(with_logits.logits, logits, TOL64, "returned logits")
    as_tuple = model(input_ids, None, None, None, None, labels, return_dict=False)  # labels positional
    assert isinstance(as_tuple, tuple) and as_tuple[0].dim() == 0  # (loss, cache): no logits in the tuple
    assert not any(isinstance(x, torch.Tensor) and x.dim() == 3 for x in as_tuple)
    assert_close(as_tuple[0], reference_loss(logits, labels), TOL64, "loss, tuple output")
    entropy_ops.patch(model, return_logits=True)  # patching again updates the options
    assert model(input_ids=input_ids, labels=labels).logits is not None
    plain = model(input_ids=input_ids)  # no labels: the model's own forward, logits as usual
    assert plain.loss is None and torch.equal(plain.logits, logits)


def test_patch_is_per_instance_copyable_and_undone():
    model = make_model("llama", 4)
    other = make_model("llama", 4)
    input_ids, labels, _ = make_inputs(model, "llama", 4)
    stock = model(input_ids=input_ids, labels=labels)
    entropy_ops.patch(model)
    assert other(input_ids=input_ids, labels=labels).logits is not None  # the class is untouched
    clone = copy.deepcopy(model)
    assert clone(input_ids=input_ids, labels=labels).logits is None
    assert clone.forward.model is clone
    restored = pickle.loads(pickle.dumps(model))
    assert restored(input_ids=input_ids, labels=labels).logits is None
    entropy_ops.unpatch(model)
    again = model(input_ids=input_ids, labels=labels)
    assert again.logits is not None and torch.equal(again.loss, stock.loss)
    assert "forward" not in model.__dict__


def test_rl_path_on_patched_vlm_with_image():
    """compute_logprobs_and_entropy on a patched vision-language model, image included, at a temperature."""
    model = make_vlm(5)
    input_ids, _, extra = make_inputs(model, VLM, 5)
    completion = torch.zeros(B, T, dtype=torch.bool)
    completion[:, 5:] = True
    completion[1, 7] = False
    logits = model(input_ids=input_ids, **extra).logits
    targets = torch.where(completion[:, 1:], input_ids[:, 1:], -100)
    ref_logp, ref_H = logprobs_entropy_reference(logits[:, :-1], targets, 0.7)
    g = torch.Generator().manual_seed(5)
    w_logp, w_H = torch.randn(B, T - 1, generator=g, dtype=torch.float64), torch.randn(B, T - 1, generator=g,
                                                                                         dtype=torch.float64)
    ref_grads = grads(model, (ref_logp * w_logp).sum() + (ref_H * w_H).sum())
    entropy_ops.patch(model)
    calls = count_calls(model.lm_head)
    logp, H = hf.compute_logprobs_and_entropy(model, input_ids, None, completion, temperature=0.7, **extra)
    assert calls == []
    assert_close(logp[:, 1:], ref_logp, TOL64, "logp")
    assert_close(H[:, 1:], ref_H, TOL64, "entropy")
    ours = grads(model, (logp[:, 1:] * w_logp).sum() + (H[:, 1:] * w_H).sum())
    assert_grads_close(ours, ref_grads, model)


def test_refusals_name_the_family():
    cohere = make_model("cohere", 6)
    input_ids, labels, _ = make_inputs(cohere, "cohere", 6)
    entropy_ops.patch(cohere)
    cohere.config.logit_scale = 0.5  # the forward still multiplies by the 0.25 it read at construction
    with pytest.raises(TypeError, match="'cohere'.*post-processes its logits"):
        cohere(input_ids=input_ids, labels=labels)
    with pytest.raises(TypeError, match="'cohere'.*post-processes its logits"):
        hf.compute_logprobs_and_entropy(cohere, input_ids, None, torch.zeros_like(input_ids, dtype=torch.bool))
    assert isinstance(cohere.lm_head, torch.nn.Linear)  # the swap was undone after the error

    llama = make_model("llama", 7)
    llama.lm_head = torch.nn.Sequential(llama.lm_head)
    with pytest.raises(TypeError, match="'llama'.*Sequential, not a plain torch.nn.Linear"):
        entropy_ops.patch(llama)
    qwen = make_model("qwen3", 8)
    qwen.loss_function = lambda logits, labels, **kwargs: logits.sum()
    with pytest.raises(TypeError, match="'qwen3'.*not transformers' ForCausalLMLoss"):
        entropy_ops.patch(qwen)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        entropy_ops.patch("llama")
    with pytest.raises(ValueError, match="backend"):
        entropy_ops.patch(make_model("llama", 9), backend="cuda")


def test_triton_backend_and_bf16_model():
    """The real kernels (Triton interpreter) behind the patch, and a bf16 model against its own stock loss."""
    model = make_model("gemma2", 10).float()
    input_ids, labels, _ = make_inputs(model, "gemma2", 10)
    ref = reference_loss(model(input_ids=input_ids).logits, labels)
    entropy_ops.patch(model, backend="triton")
    assert_close(model(input_ids=input_ids, labels=labels).loss, ref, 1e-5, "loss (triton, fp32)")

    bf16 = make_model("llama", 11).to(torch.bfloat16)
    input_ids, labels, _ = make_inputs(bf16, "llama", 11)
    stock = bf16(input_ids=input_ids, labels=labels).loss
    entropy_ops.patch(bf16)
    loss = bf16(input_ids=input_ids, labels=labels).loss
    assert loss.dtype == torch.float32  # as transformers' loss: fp32 from bf16 logits
    assert_close(loss, stock, 1e-2, "loss (bf16 model)")


def test_every_label_ignored_gives_nan_like_transformers():
    model = make_model("llama", 12)
    input_ids, _, _ = make_inputs(model, "llama", 12)
    labels = torch.full_like(input_ids, -100)
    stock = model(input_ids=input_ids, labels=labels).loss
    entropy_ops.patch(model)
    assert torch.isnan(stock) and torch.isnan(model(input_ids=input_ids, labels=labels).loss)


def test_docs_code_blocks_run_as_written():
    """docs/integrations.md opens with the one-line patch; every python block there runs as written."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "integrations.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 2 and "entropy_ops.patch(" in blocks[0]
    for block in blocks:
        exec(compile(block, "docs/integrations.md", "exec"), {})


def test_transformers_trainer_with_gradient_accumulation(tmp_path, monkeypatch):
    """A patched model in transformers' Trainer (2 steps, gradient accumulation: the Trainer passes
    num_items_in_batch) ends with the parameters of the stock run."""
    import sys

    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    patch_module = sys.modules["entropy_ops.patch"]  # the module (entropy_ops.patch is the function)
    seen, loss_fn = [], patch_module.causal_lm_loss

    def spy(*args, **kwargs):
        seen.append(kwargs["num_items_in_batch"])
        return loss_fn(*args, **kwargs)

    monkeypatch.setattr(patch_module, "causal_lm_loss", spy)

    def train(patched):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**dict(COMMON, vocab_size=97)))
        if patched:
            entropy_ops.patch(model)
        g = torch.Generator().manual_seed(1)
        data = []
        for i in range(8):
            ids = torch.randint(0, 97, (12,), generator=g)
            data.append(dict(input_ids=ids, labels=torch.where(torch.arange(12) < 3 + i % 4, -100, ids)))
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / str(patched)), per_device_train_batch_size=2, gradient_accumulation_steps=2,
            max_steps=2, learning_rate=1e-2, report_to=[], logging_steps=1, save_strategy="no", use_cpu=True,
            seed=0, disable_tqdm=True)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
        trainer.train()
        return model, [x["loss"] for x in trainer.state.log_history if "loss" in x]

    stock, stock_losses = train(False)
    fused, fused_losses = train(True)
    assert len(fused_losses) == 2 and len(seen) == 4 and all(n is not None for n in seen)
    for a, e in zip(fused_losses, stock_losses):
        assert abs(float(a) - float(e)) <= 1e-5 * abs(float(e))
    for (name, p), q in zip(fused.named_parameters(), stock.parameters()):
        assert (p - q).abs().max() <= 1e-5, name

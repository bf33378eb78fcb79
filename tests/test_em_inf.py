"""EM-INF and the adaptive-temperature baseline (entropy_ops/em_inf.py), and their generate() processors."""
import pickle

import pytest
import torch

from entropy_ops import em_inf as em_inf_module
from entropy_ops.em_inf import adaptive_temperature, em_inf, generate_with_em_inf

F64 = torch.float64


def entropy64(z):
    z = z.double()
    return -torch.special.xlogy(torch.softmax(z, -1), torch.softmax(z, -1)).sum(-1)


def em_inf_oracle(z, n_steps, lr, delta, kl_weight, betas=(0.9, 0.999), adam_eps=1e-8):
    """One row at a time, float64: autograd of the written-out entropy (+ KL), then Adam as
    ``torch.optim.Adam`` defines it (bias-corrected moments, eps outside the square root)."""
    b1, b2 = betas
    out, steps = [], []
    for row in z.double():
        finite = torch.isfinite(row)
        p0 = torch.softmax(row, -1)
        x, m, v = row.clone(), torch.zeros_like(row), torch.zeros_like(row)
        taken = 0
        for k in range(1, n_steps + 1):
            xg = x.clone().requires_grad_(True)
            p, logp = torch.softmax(xg, -1), torch.log_softmax(xg, -1)
            H = -(p[finite] * logp[finite]).sum()
            if H.item() < delta:
                break
            kl = (p0[finite] * (p0[finite].log() - logp[finite])).sum()
            (g,) = torch.autograd.grad(H + kl_weight * kl, xg)
            g = torch.where(finite, g, 0.0)
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            x_new = x - lr * (m / (1 - b1 ** k)) / ((v / (1 - b2 ** k)).sqrt() + adam_eps)
            if int(x_new.argmax()) != int(row.argmax()):
                break
            x, taken = x_new, taken + 1
        out.append(x)
        steps.append(taken)
    return torch.stack(out), torch.tensor(steps)


def assert_close(actual, expected, rtol, atol):
    actual, expected = actual.double(), expected.double()
    assert not torch.isnan(actual).any(), "NaN in the result"
    same_inf = torch.isinf(expected) & (actual == expected)
    scale = expected.abs().nan_to_num(posinf=0.0, neginf=0.0)
    err = torch.where(same_inf, 0.0, (actual - expected).abs() - rtol * scale)
    worst = int(err.flatten().argmax())
    assert err.flatten()[worst] <= atol, (
        f"worst index {worst}: got {actual.flatten()[worst].item()!r}, expected {expected.flatten()[worst].item()!r}"
    )


def random_logits(seed, B=6, V=53, scale=3.0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, V, generator=gen) * scale).to(dtype)


@pytest.mark.parametrize("kl_weight", [0.0, 0.05])
def test_em_inf_matches_float64_adam_oracle(kl_weight):
    z = random_logits(0, B=7)
    z[1, :5] = float("-inf")  # masked by an earlier processor
    z[2, 0] = z[2].max() + 20.0  # starts below delta: untouched
    out, steps = em_inf(z, n_steps=6, lr=0.1, delta=0.3, kl_weight=kl_weight, backend="torch", return_steps=True)
    ref, ref_steps = em_inf_oracle(z, 6, 0.1, 0.3, kl_weight)
    assert out.dtype == torch.float32 and out.shape == z.shape
    assert steps.tolist() == ref_steps.tolist()
    assert steps[2] == 0 and steps.max() == 6
    assert_close(out, ref, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("scale", [0.5, 2.0, 6.0])
def test_em_inf_never_changes_the_argmax(scale):
    z = random_logits(1, B=64, V=97, scale=scale)
    top = z.max(-1).values
    z[:16, 3] = top[:16] - torch.rand(16, generator=torch.Generator().manual_seed(2)) * 1e-3  # near ties
    z[16:20, 7] = top[16:20]  # exact ties: argmax is the first maximal index
    delta = 0.01
    out, steps = em_inf(z, n_steps=25, delta=delta, kl_weight=0.0, backend="torch", return_steps=True)
    assert torch.equal(out.argmax(-1), z.argmax(-1))
    H0, H1 = entropy64(z), entropy64(out)
    assert ((steps > 0) == (H0 >= delta)).all()
    assert (H1[H0 >= delta] < H0[H0 >= delta]).all()
    # every early stop was the entropy floor, not the argmax guard: the invariant held by itself
    assert (H1[(steps > 0) & (steps < 25)] < delta).all()


def test_em_inf_stops_below_delta_and_leaves_low_entropy_rows_alone():
    z = random_logits(3, B=32, V=41, scale=2.5)
    delta = 0.8
    H0 = entropy64(z)
    out, steps = em_inf(z, n_steps=30, delta=delta, kl_weight=0.0, backend="torch", return_steps=True)
    untouched = H0 < delta
    assert untouched.any() and (~untouched).any()
    assert torch.equal(out[untouched], z[untouched]) and (steps[untouched] == 0).all()
    stopped = (steps > 0) & (steps < 30)
    assert stopped.any()
    assert (entropy64(out[stopped]) < delta).all()  # a row stops only once below delta
    # a row that stopped takes no more steps when allowed more
    longer, longer_steps = em_inf(z, n_steps=45, delta=delta, kl_weight=0.0, backend="torch", return_steps=True)
    assert torch.equal(longer[stopped], out[stopped]) and torch.equal(longer_steps[stopped], steps[stopped])
    # rows still running after 30 steps were above delta at every step they took
    assert (entropy64(out[steps == 30]) >= 0).all()


def test_em_inf_batched_equals_per_row():
    z = random_logits(4, B=5, V=64, scale=2.0)
    z[1] = 0.0  # a flat row (e.g. a finished / padding row of a batched generate)
    z[2, 10:40] = float("-inf")
    z[3] *= 10  # below delta
    out, steps = em_inf(z, n_steps=5, backend="torch", return_steps=True)
    for i in range(z.shape[0]):
        row, row_steps = em_inf(z[i:i + 1], n_steps=5, backend="torch", return_steps=True)
        assert_close(out[i], row[0], rtol=1e-6, atol=1e-6)
        assert steps[i] == row_steps[0]


def test_em_inf_with_neg_inf_and_low_precision():
    z = random_logits(5, B=4, V=50, dtype=torch.bfloat16)
    z[:, ::3] = float("-inf")
    out = em_inf(z, n_steps=5, backend="torch")
    assert not torch.isnan(out).any()
    assert torch.equal(torch.isneginf(out), torch.isneginf(z))
    assert torch.isfinite(out[~torch.isneginf(z)]).all()
    assert torch.equal(out.argmax(-1), z.float().argmax(-1))


def test_em_inf_under_no_grad_and_inference_mode():
    z = random_logits(6)
    expected = em_inf(z, backend="torch")
    with torch.no_grad():
        assert torch.equal(em_inf(z, backend="torch"), expected)
    with torch.inference_mode():
        zi = z.clone()
        assert torch.equal(em_inf(zi, backend="torch"), expected)
    assert torch.equal(em_inf(z, n_steps=0), z)


def test_em_inf_triton_interpreter_matches_torch_path():
    z = random_logits(7, B=3, V=40)
    out_torch = em_inf(z, n_steps=3, backend="torch")
    out_triton = em_inf(z, n_steps=3, backend="triton")
    assert_close(out_triton, out_torch, rtol=1e-5, atol=1e-5)


def test_em_inf_bad_arguments():
    z = random_logits(8)
    with pytest.raises(ValueError, match="logits must have shape"):
        em_inf(z.unsqueeze(0))
    with pytest.raises(TypeError, match="logits must have dtype"):
        em_inf(z.long())
    with pytest.raises(ValueError, match="lr"):
        em_inf(z, lr=0.0)
    with pytest.raises(ValueError, match="n_steps"):
        em_inf(z, n_steps=-1)
    with pytest.raises(ValueError, match="delta"):
        em_inf(z, delta=float("nan"))
    with pytest.raises(TypeError, match="betas"):
        em_inf(z, betas=0.9)


def test_adaptive_temperature():
    z = random_logits(9, B=8, V=61, scale=1.5)
    z[0, :20] = float("-inf")
    alpha, delta = 0.5, 0.2
    out, tau = adaptive_temperature(z, alpha, delta, n_iter=40, backend="torch", return_temperature=True)
    H0, H1 = entropy64(z), entropy64(out)
    target = torch.clamp_min(alpha * H0, delta)
    assert_close(H1, target, rtol=1e-6, atol=1e-6)
    assert_close(out, z.double() / tau.double().unsqueeze(1), rtol=1e-6, atol=1e-6)
    assert torch.equal(out.argmax(-1), z.argmax(-1)) and torch.equal(torch.isneginf(out), torch.isneginf(z))
    # at or below the target already: unchanged (tau = 1); unreachable target: tau_min
    out, tau = adaptive_temperature(z, 1.0, 0.0, backend="torch", return_temperature=True)
    assert torch.equal(out, z) and (tau == 1).all()
    flat = torch.zeros(2, 10)
    flat[1, 0] = 0.01
    out, tau = adaptive_temperature(flat, 0.1, 0.0, backend="torch", return_temperature=True)
    assert tau[0] == 0.01 and tau[1] == 0.01
    with pytest.raises(ValueError, match="alpha"):
        adaptive_temperature(z, 1.5, 0.1)
    with pytest.raises(ValueError, match="tau_max"):
        adaptive_temperature(z, 0.5, 0.1, tau_min=0.5, tau_max=0.2)


# ---------------------------------------------------------------- transformers generate()
@pytest.fixture
def tiny_lm():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                      pad_token_id=0, bos_token_id=2, eos_token_id=1)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture
def tiny_tokenizer():
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[EOS]": 1, "[BOS]": 2, **{f"w{i}": i + 3 for i in range(29)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[PAD]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]")


def test_processors_in_generate(tiny_lm):
    from entropy_ops.em_inf import AdaptiveTemperatureLogitsProcessor, EMInfLogitsProcessor
    from transformers import LogitsProcessor

    assert issubclass(EMInfLogitsProcessor, LogitsProcessor)
    input_ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])  # left-padded batch
    attention_mask = (input_ids != 0).long()
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=4, pad_token_id=0,
                  return_dict_in_generate=True, output_scores=True)
    plain = tiny_lm.generate(**kwargs, do_sample=False)
    em = tiny_lm.generate(**kwargs, do_sample=False, logits_processor=[EMInfLogitsProcessor(backend="torch")])
    at = tiny_lm.generate(**kwargs, do_sample=False,
                          logits_processor=[AdaptiveTemperatureLogitsProcessor(0.5, 0.1, backend="torch")])
    assert torch.equal(em.sequences, plain.sequences) and torch.equal(at.sequences, plain.sequences)
    # the processors did change the distributions (random init: near-uniform, above delta)
    assert (entropy64(em.scores[0]) < entropy64(plain.scores[0]) - 1e-3).all()
    assert (entropy64(at.scores[0]) < entropy64(plain.scores[0]) - 1e-3).all()
    torch.manual_seed(1)
    sampled = tiny_lm.generate(**kwargs, do_sample=True, top_k=5, temperature=0.7,
                               logits_processor=[EMInfLogitsProcessor(n_steps=3, kl_weight=0.05, backend="torch")])
    assert sampled.sequences.shape == (2, 9) and not any(torch.isnan(s).any() for s in sampled.scores)
    restored = pickle.loads(pickle.dumps(EMInfLogitsProcessor(delta=0.2)))
    assert restored.options["delta"] == 0.2
    with pytest.raises(ValueError, match="delta"):
        EMInfLogitsProcessor(delta=-1.0)
    with pytest.raises(AttributeError):
        em_inf_module.NoSuchProcessor


def test_generate_with_em_inf(tiny_lm, tiny_tokenizer):
    prompts = ["w1 w2 w3", "w4"]
    texts = generate_with_em_inf(tiny_lm, tiny_tokenizer, prompts, backend="torch", max_new_tokens=3,
                                 do_sample=False, pad_token_id=0)
    enc = tiny_tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    plain = tiny_lm.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert texts == tiny_tokenizer.batch_decode(plain[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    with pytest.raises(TypeError, match="list of strings"):
        generate_with_em_inf(tiny_lm, tiny_tokenizer, "w1")

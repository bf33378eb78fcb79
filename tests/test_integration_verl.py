"""``entropy_ops.integrations.verl``: verl's fused-kernel signatures against a float64 reference,
and ``install`` on stand-in verl modules (verl itself is not installed here)."""
import subprocess
import sys
import types

import pytest
import torch

from entropy_ops.integrations import verl as everl
from oracle import TOL, assert_close, logprobs_entropy_reference

D, V = 24, 67


def make_inputs(lead, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(*lead, D, generator=g) * 2).to(dtype).requires_grad_()
    weight = (torch.randn(V, D, generator=g) / 2).to(dtype).requires_grad_()
    labels = torch.randint(0, V, lead, generator=g)
    labels.view(-1)[::5] = -100  # verl's SFT labels may carry -100: 0 and no gradient
    return hidden, weight, labels


def reference(hidden, weight, labels, temperature):
    """float64 from the formulas; ``temperature`` a float or a per-token tensor of ``labels``' shape."""
    logits = hidden.double() @ weight.double().t()
    t = temperature.double().unsqueeze(-1) if isinstance(temperature, torch.Tensor) else temperature
    return logprobs_entropy_reference(logits / t, labels)


def check(fn, lead, seed, temperature, backend="torch"):
    hidden, weight, labels = make_inputs(lead, seed)
    g = torch.Generator().manual_seed(seed + 100)
    g_logp, g_H = torch.randn(lead, generator=g), torch.randn(lead, generator=g)
    logp, H = fn(hidden, weight, labels, temperature, backend)
    assert logp.shape == lead and H.shape == lead and logp.dtype == torch.float32
    ours = torch.autograd.grad((logp * g_logp).sum() + (H * g_H).sum(), (hidden, weight))
    ref_logp, ref_H = reference(hidden, weight, labels, temperature)
    refs = torch.autograd.grad((ref_logp * g_logp.double()).sum() + (ref_H * g_H.double()).sum(), (hidden, weight))
    tol = TOL[torch.float32]
    assert_close(logp, ref_logp, tol["fwd"], "log_probs")
    assert_close(H, ref_H, tol["fwd"], "entropy")
    assert (logp[labels == -100] == 0).all()
    assert_close(ours[0], refs[0], tol["grad"], "d/d hidden", rowwise=True)
    assert_close(ours[1], refs[1], tol["grad"], "d/d weight", rowwise=True)


ENTRY_POINTS = {
    "linear_cross_entropy": lambda h, w, y, t, b: everl.linear_cross_entropy(h, w, y, t, "none", backend=b),
    "FusedLinearForPPO": lambda h, w, y, t, b: everl.FusedLinearForPPO(chunk_size=512, backend=b).forward(
        hidden_states=h, vocab_weights=w, input_ids=y, temperature=t),
}


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("lead", [(1, 37), (29,)])  # verl's rmpad [1, total_nnz] layout, and flat
def test_entry_points_match_reference(entry, lead):
    check(ENTRY_POINTS[entry], lead, 1 + len(lead), temperature=0.6)


def test_per_token_temperature():
    """Recent verl passes one temperature per token: ``h W^T / t_n = (h_n / t_n) W^T``."""
    g = torch.Generator().manual_seed(3)
    temperature = 0.5 + torch.rand(1, 31, generator=g)
    check(ENTRY_POINTS["linear_cross_entropy"], (1, 31), 3, temperature)
    check(ENTRY_POINTS["FusedLinearForPPO"], (1, 31), 4, torch.tensor([0.7]))  # one-element tensor


def test_triton_backend():
    check(ENTRY_POINTS["linear_cross_entropy"], (1, 19), 5, temperature=1.4, backend="triton")


def test_bad_arguments():
    hidden, weight, labels = make_inputs((1, 9), 6)
    with pytest.raises(ValueError, match="reduction"):
        everl.linear_cross_entropy(hidden, weight, labels, 1.0, "mean")
    with pytest.raises(NotImplementedError, match="dist_process_group"):
        everl.linear_cross_entropy(hidden, weight, labels, 1.0, "none", object())
    with pytest.raises(ValueError, match="one value per token"):
        everl.fused_linear_for_ppo(hidden, weight, labels, torch.ones(4))
    with pytest.raises(ValueError, match="> 0 for every token"):
        everl.fused_linear_for_ppo(hidden, weight, labels, torch.zeros(1, 9))
    with pytest.raises(ValueError, match="temperature"):
        everl.fused_linear_for_ppo(hidden, weight, labels, -1.0)


# ---------------------------------------------------------------- model-level forward
def tiny(config_cls, seed, head_mult=30.0, **overrides):
    transformers = pytest.importorskip("transformers", reason="the model-level forward needs transformers")
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, attn_implementation="eager", **overrides)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(head_mult)  # logits large enough for the soft-cap to matter
    return model


def packed_batch(seed, n=23):
    """verl's remove-padding layout: one row of packed sequences, positions restarting per sequence."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, V, (1, n), generator=g)
    position_ids = torch.cat([torch.arange(9), torch.arange(n - 9)]).unsqueeze(0)
    return input_ids, position_ids


@pytest.mark.parametrize("config_cls, overrides", [
    ("Gemma2Config", dict(final_logit_softcapping=2.0, query_pre_attn_scalar=8)),
    ("CohereConfig", dict(logit_scale=0.25)),
])
def test_forward_for_ppo_applies_the_family_head(config_cls, overrides):
    model = tiny(config_cls, 7, **overrides)
    input_ids, position_ids = packed_batch(7)
    out = everl.forward_for_ppo(model, input_ids=input_ids, attention_mask=None, position_ids=position_ids,
                                temperature=0.8, return_dict=True, use_cache=False)
    logits = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits.double()
    ref_logp, ref_H = logprobs_entropy_reference(logits / 0.8, torch.roll(input_ids, -1, -1))
    assert_close(out.log_probs, ref_logp, 1e-5, "log_probs")
    assert_close(out.entropy, ref_H, 1e-5, "entropy")
    (g,) = torch.autograd.grad(out.log_probs.sum() + out.entropy.sum(), model.get_output_embeddings().weight)
    (ref_g,) = torch.autograd.grad(ref_logp.sum() + ref_H.sum(), model.get_output_embeddings().weight)
    assert_close(g, ref_g, 1e-5, "d/d output weight", rowwise=True)


def test_forward_for_ppo_per_token_temperature():
    model = tiny("LlamaConfig", 8, head_mult=5.0)
    input_ids, position_ids = packed_batch(8)
    t = 0.5 + torch.rand(1, input_ids.shape[1], generator=torch.Generator().manual_seed(8))
    out = everl.forward_for_ppo(model, input_ids=input_ids, position_ids=position_ids, temperature=t)
    logits = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits.double()
    ref_logp, _ = logprobs_entropy_reference(logits / t.double().unsqueeze(-1), torch.roll(input_ids, -1, -1))
    assert_close(out.log_probs, ref_logp, 1e-5, "log_probs (per-token temperature)")
    capped = tiny("Gemma2Config", 8, final_logit_softcapping=2.0, query_pre_attn_scalar=8)
    with pytest.raises(NotImplementedError, match="per-token temperature"):
        everl.forward_for_ppo(capped, input_ids=input_ids, position_ids=position_ids, temperature=t)


# ---------------------------------------------------------------- install (stand-in verl modules)
@pytest.fixture
def fake_verl(monkeypatch):
    """The three verl modules ``install`` touches, with sentinels in place of verl's functions."""
    mods = {name: types.ModuleType(name) for name in (everl._TRITON_MODULE, everl._TORCH_MODULE, everl._PATCH_MODULE)}
    mods[everl._TRITON_MODULE].linear_cross_entropy = "verl's kernel"
    mods[everl._TORCH_MODULE].FusedLinearForPPO = "verl's module"
    calls = []
    mods[everl._PATCH_MODULE].patch_forward_with_backends = lambda model, **kw: calls.append(kw)
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return mods, calls


def test_install_points_verl_at_ours(fake_verl, monkeypatch):
    mods, calls = fake_verl
    everl.install()
    assert mods[everl._TRITON_MODULE].linear_cross_entropy is everl.linear_cross_entropy
    assert mods[everl._TORCH_MODULE].FusedLinearForPPO is everl.FusedLinearForPPO
    everl.install(model_forward=True)
    everl.install(model_forward=True)  # idempotent: wraps once
    patch = mods[everl._PATCH_MODULE].patch_forward_with_backends
    model = tiny("LlamaConfig", 9)
    monkeypatch.setattr(type(model), "forward", type(model).forward)  # restored after the test
    patch(model, use_fused_kernels=False, fused_kernels_backend=None)
    assert calls == [dict(use_fused_kernels=False, fused_kernels_backend=None)]  # off: verl's own function
    patch(model, use_fused_kernels=True, fused_kernels_backend="triton")
    assert type(model).forward is everl.forward_for_ppo
    input_ids, position_ids = packed_batch(9)
    out = model(input_ids=input_ids, position_ids=position_ids, temperature=1.0, return_dict=True)
    assert out.log_probs.shape == input_ids.shape and torch.isfinite(out.entropy).all()


def test_install_without_verl_raises(monkeypatch):
    monkeypatch.setitem(sys.modules, everl._TRITON_MODULE, None)  # an import of it fails
    with pytest.raises(ImportError):
        everl.install()


def test_example_runs():
    from integration_utils import load_example

    err, err_uncapped = load_example("verl_fused_kernels").main()
    assert err < 1e-5 and err_uncapped > 1.0


def test_library_imports_stay_light():
    """``import entropy_ops`` and the hf/verl integrations import neither transformers, trl nor verl."""
    code = ("import sys, entropy_ops, entropy_ops.integrations, entropy_ops.integrations.hf, "
            "entropy_ops.integrations.verl; "
            "print(sorted(m for m in ('transformers', 'trl', 'verl') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout

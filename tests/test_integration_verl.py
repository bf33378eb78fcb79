"""``entropy_ops.integrations.verl``: verl's entry-point signatures against float64 references written
from verl's own definitions (verl does not import on this CPU-only machine: it needs ray and
tensordict, so its functions are re-derived here from its source, not called), the tensor-parallel
path on two gloo processes, the model-level forward on text and vision-language models, and
``install`` on stand-in verl modules."""
import os
import subprocess
import sys
import tempfile
import types
from datetime import timedelta

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
    # verl's kernel returns flattened [N] outputs; its FusedLinearForPPO the leading shape
    shape = (labels.numel(),) if fn is ENTRY_POINTS["linear_cross_entropy"] else lead
    assert logp.shape == shape and H.shape == shape and logp.dtype == torch.float32
    logp, H = logp.view(lead), H.view(lead)
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
        everl.linear_cross_entropy(hidden, weight, labels, 1.0, "avg")
    with pytest.raises(ValueError, match="not initialized"):
        everl.linear_cross_entropy(hidden, weight, labels, 1.0, "none", object())
    with pytest.raises(ValueError, match="one value per token"):
        everl.fused_linear_for_ppo(hidden, weight, labels, torch.ones(4))
    with pytest.raises(ValueError, match="> 0 for every token"):
        everl.fused_linear_for_ppo(hidden, weight, labels, torch.zeros(1, 9))
    with pytest.raises(ValueError, match="temperature"):
        everl.fused_linear_for_ppo(hidden, weight, labels, -1.0)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_reduction_reduces_log_probs_only(reduction):
    """verl's kernel: ``sum`` / ``mean`` of the per-token log-probs over all tokens; entropy stays per token."""
    hidden, weight, labels = make_inputs((1, 13), 9)
    labels = labels.clamp(min=0)  # verl's kernel has no ignore_index
    per_token, H = everl.linear_cross_entropy(hidden, weight, labels, 0.9, "none", backend="torch")
    reduced, H2 = everl.linear_cross_entropy(hidden, weight, labels, 0.9, reduction, backend="torch")
    expected = per_token.sum() if reduction == "sum" else per_token.mean()
    assert reduced.dim() == 0 and H2.shape == (13,)
    assert_close(reduced, expected, 1e-6, reduction)
    assert torch.equal(H, H2)


# ---------------------------------------------------------------- logits drop-ins
def verl_logprobs_from_logits(logits, labels):
    """verl's definition (torch_functional.logprobs_from_logits_naive): log_softmax, gather."""
    return torch.log_softmax(logits.double(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def verl_entropy_from_logits(logits):
    """verl's definition (torch_functional.entropy_from_logits): logsumexp - sum softmax * logits."""
    logits = logits.double()
    return torch.logsumexp(logits, -1) - (torch.softmax(logits, -1) * logits).sum(-1)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("inplace_backward", [True, False])
def test_logits_drop_ins_match_verl_definitions(backend, inplace_backward):
    g = torch.Generator().manual_seed(10)
    logits = (torch.randn(37, V, generator=g) * 3).requires_grad_()
    labels = torch.randint(0, V, (37,), generator=g)
    w = torch.randn(37, generator=g)
    ref_logp = verl_logprobs_from_logits(logits, labels)
    ref_H = verl_entropy_from_logits(logits)
    (ref_g_logp,) = torch.autograd.grad((ref_logp * w.double()).sum(), logits)
    (ref_g_H,) = torch.autograd.grad((ref_H * w.double()).sum(), logits)

    H = everl.entropy_from_logits(logits.detach().clone().requires_grad_(), backend=backend)
    assert H.dtype == torch.float32 and H.shape == (37,)
    assert_close(H, ref_H, 1e-5, "entropy_from_logits")
    assert_close(everl.entropy_from_logits_with_chunking(logits.detach(), 8, backend=backend), ref_H, 1e-5,
                 "entropy_from_logits_with_chunking")
    x = logits.detach().clone().requires_grad_()
    (g_H,) = torch.autograd.grad((everl.entropy_from_logits(x, backend=backend) * w).sum(), x)
    assert_close(g_H, ref_g_H, 1e-5, "d entropy / d logits", rowwise=True)

    x = logits.detach().clone().requires_grad_()
    logp = everl.logprobs_from_logits(x * 1.0, labels, inplace_backward=inplace_backward, backend=backend)
    assert logp.dtype == torch.float32 and logp.shape == (37,)
    assert_close(logp, ref_logp, 1e-5, "logprobs_from_logits")
    (g_logp,) = torch.autograd.grad((logp * w).sum(), x)
    assert_close(g_logp, ref_g_logp, 1e-5, "d logp / d logits", rowwise=True)


# ---------------------------------------------------------------- tensor parallel (2 gloo processes)
def _tp_worker(rank, world, init_file):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                         timeout=timedelta(seconds=120))
    try:
        hidden, weight, labels = make_inputs((1, 21), 11)
        labels = labels.clamp(min=0)
        shard = V // world + 1  # verl's layout: equal shards in rank order (V padded to a multiple of tp)
        full = torch.cat([weight.detach(), torch.zeros(shard * world - V, D)])  # padded rows: logit 0
        mine = full[rank * shard:(rank + 1) * shard].clone().requires_grad_()
        h = hidden.detach().clone().requires_grad_()
        # Megatron's layout: hidden [T, 1, D] (sequence first), labels [1, T]
        logp, H = everl.linear_cross_entropy(h.transpose(0, 1), mine, labels, 0.8, "none",
                                             torch.distributed.group.WORLD, backend="torch")
        logp, H = logp.view(1, 21), H.view(1, 21)
        g = torch.Generator().manual_seed(12)
        g_logp, g_H = torch.randn(1, 21, generator=g), torch.randn(1, 21, generator=g)
        ((logp * g_logp).sum() + (H * g_H).sum()).backward()
        dh = h.grad.clone()
        torch.distributed.all_reduce(dh)  # what verl's caller does with d hidden (a sum over the group)

        ref_h, ref_w = hidden.detach().double().requires_grad_(), full.double().requires_grad_()
        ref_logp, ref_H = logprobs_entropy_reference(ref_h @ ref_w.t() / 0.8, labels)
        ((ref_logp * g_logp.double()).sum() + (ref_H * g_H.double()).sum()).backward()
        assert_close(logp, ref_logp, 1e-5, f"rank {rank} log_probs")
        assert_close(H, ref_H, 1e-5, f"rank {rank} entropy")
        assert_close(dh, ref_h.grad, 1e-5, f"rank {rank} sum over ranks of d hidden", rowwise=True)
        # d weight: the shard's statistics are merged across ranks in fp32, so a row of tiny probabilities is
        # accurate relative to the whole gradient (max-norm), not to its own row
        ref_dw = ref_w.grad[rank * shard:(rank + 1) * shard]
        err = (mine.grad.double() - ref_dw).abs().max()
        assert err <= 1e-5 * ref_dw.abs().max(), f"rank {rank} d weight shard: max error {err:.3g}"
    finally:
        torch.distributed.destroy_process_group()


def test_tensor_parallel_two_ranks():
    """``dist_process_group``: each rank holds a vocab shard; outputs are the full-vocab values on every
    rank and the group's sum of ``d hidden`` is the true gradient, as with verl's kernel."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_tp_worker, args=(2, os.path.join(tmp, "init")), nprocs=2, join=True)


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


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_forward_for_ppo_vision_language_model(family):
    """Vision-language models with images: the model's own forward runs (verl's fused forward would call
    the text body alone, except for the few families it special-cases), the output layer is never called."""
    from test_patch import make_inputs, make_model

    model = make_model(family, 13).float()
    input_ids, _, extra = make_inputs(model, family, 13)
    extra = {k: v.float() if v.is_floating_point() else v for k, v in extra.items()}
    calls = []
    logits = model(input_ids=input_ids, **extra).logits.double()
    model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    out = everl.forward_for_ppo(model, input_ids=input_ids, **extra, temperature=0.9, return_dict=True,
                                use_cache=False)
    ref_logp, ref_H = logprobs_entropy_reference(logits / 0.9, torch.roll(input_ids, -1, -1))
    assert calls == []
    assert_close(out.log_probs, ref_logp, 1e-5, "log_probs (VLM)")
    assert_close(out.entropy, ref_H, 1e-5, "entropy (VLM)")


# ---------------------------------------------------------------- install (stand-in verl modules)
@pytest.fixture
def fake_verl(monkeypatch):
    """The verl modules ``install`` touches, with sentinels in place of verl's functions."""
    names = (everl._TRITON_MODULE, everl._TORCH_MODULE, everl._FUNCTIONAL_MODULE, everl._PATCH_MODULE,
             "verl.workers.actor.dp_actor")
    mods = {name: types.ModuleType(name) for name in names}
    mods[everl._TRITON_MODULE].linear_cross_entropy = "verl's kernel"
    mods[everl._TORCH_MODULE].FusedLinearForPPO = "verl's module"
    for name in ("logprobs_from_logits", "entropy_from_logits", "entropy_from_logits_with_chunking"):
        setattr(mods[everl._FUNCTIONAL_MODULE], name, f"verl's {name}")
    mods["verl.workers.actor.dp_actor"].logprobs_from_logits = "bound at dp_actor's import"
    calls = []
    mods[everl._PATCH_MODULE].patch_forward_with_backends = lambda model, **kw: calls.append(kw)
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return mods, calls


def test_install_points_verl_at_ours(fake_verl, monkeypatch):
    mods, calls = fake_verl
    everl.install(model_forward=False, logits_functions=False)
    assert mods[everl._TRITON_MODULE].linear_cross_entropy is everl.linear_cross_entropy
    assert mods[everl._TORCH_MODULE].FusedLinearForPPO is everl.FusedLinearForPPO
    assert mods[everl._FUNCTIONAL_MODULE].logprobs_from_logits == "verl's logprobs_from_logits"
    everl.install()
    everl.install()  # idempotent: wraps once
    functional = mods[everl._FUNCTIONAL_MODULE]
    assert functional.logprobs_from_logits is everl.logprobs_from_logits
    assert functional.entropy_from_logits is everl.entropy_from_logits
    assert functional.entropy_from_logits_with_chunking is everl.entropy_from_logits_with_chunking
    assert mods["verl.workers.actor.dp_actor"].logprobs_from_logits is everl.logprobs_from_logits
    patch = mods[everl._PATCH_MODULE].patch_forward_with_backends
    model = tiny("LlamaConfig", 9)
    original = type(model).forward
    monkeypatch.setattr(type(model), "forward", original)  # restored after the test
    patch(model, use_fused_kernels=False, fused_kernels_backend=None)
    assert calls == [dict(use_fused_kernels=False, fused_kernels_backend=None)]  # off: verl's own function
    patch(model, use_fused_kernels=True, fused_kernels_backend="triton")
    patch(model, use_fused_kernels=True, fused_kernels_backend="triton")  # actor and reference: same class
    assert type(model).forward._entropy_ops_original is original
    input_ids, position_ids = packed_batch(9)
    out = model(input_ids=input_ids, position_ids=position_ids, temperature=1.0, return_dict=True)
    logits = original(model, input_ids=input_ids, position_ids=position_ids, use_cache=False).logits.double()
    ref_logp, _ = logprobs_entropy_reference(logits, torch.roll(input_ids, -1, -1))
    assert_close(out.log_probs, ref_logp, 1e-5, "log_probs through the installed forward")


def test_plugin_module_is_the_config_switch(fake_verl, monkeypatch):
    """``external_lib=entropy_ops.integrations.verl_plugin``: verl's import of it installs everything."""
    import importlib

    mods, _ = fake_verl
    monkeypatch.delitem(sys.modules, "entropy_ops.integrations.verl_plugin", raising=False)
    importlib.import_module("entropy_ops.integrations.verl_plugin")
    assert mods[everl._TRITON_MODULE].linear_cross_entropy is everl.linear_cross_entropy
    assert mods[everl._FUNCTIONAL_MODULE].entropy_from_logits is everl.entropy_from_logits
    assert mods[everl._PATCH_MODULE].patch_forward_with_backends._entropy_ops


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
    code = ("import sys, entropy_ops, entropy_ops.integrations, entropy_ops.integrations.hf, entropy_ops.patch, "
            "entropy_ops.integrations.verl; "
            "print(sorted(m for m in ('transformers', 'trl', 'verl') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout

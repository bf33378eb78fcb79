"""Float64 ground truth, written from the formulas (docs/math.md section 1), and one tolerance table."""
import torch

# One tolerance table (DEVELOPERS.md): fp32 below 1e-5 relative; 16-bit inputs within 1e-2.
# Forward outputs are fp32 whatever the input dtype, so they keep the fp32 tolerance against a
# reference computed on the *same* (rounded) input; gradients are stored in the input dtype.
TOL = {
    torch.float32: dict(fwd=1e-5, grad=1e-5),
    torch.bfloat16: dict(fwd=1e-5, grad=1e-2),
    torch.float16: dict(fwd=1e-5, grad=1e-2),
    torch.float64: dict(fwd=1e-10, grad=1e-10),
}


def logprobs_entropy_reference(logits, targets, temperature=1.0, ignore_index=-100):
    """``(logp, H)`` in float64 via ``torch.log_softmax``; ignored rows give 0. Differentiable."""
    s = logits.double() / temperature
    logp_all = torch.log_softmax(s, dim=-1)
    p = logp_all.exp()
    plogp = p * torch.where(p > 0, logp_all, torch.zeros_like(p))  # 0 * -inf := 0, NaN-free gradient
    H = -plogp.sum(-1)
    keep = targets != ignore_index
    safe = torch.where(keep, targets, 0).long()
    logp = logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    zero = torch.zeros((), dtype=torch.float64)
    return torch.where(keep, logp, zero), torch.where(keep, H, zero)


def assert_close(actual, expected, rel, name="value", rowwise=False):
    """``|actual - expected| <= rel * (|expected| + scale)`` elementwise, no NaN anywhere.

    ``scale`` is ``mean|expected|`` (whole tensor), or with ``rowwise=True`` the max of
    ``|expected|`` over the last dim: a row-wise, max-norm relative error. Gradients use the
    latter: ``dz_i = -p_i (g_logp + g_H (log p_i + H))`` cancels inside the bracket where
    ``log p_i ~ -H``, so an fp32 entry is accurate relative to its row, not to itself.
    A failure prints the worst index and both values.
    """
    actual = actual.double()
    expected = expected.double()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert not torch.isnan(actual).any(), f"{name}: NaN at {torch.isnan(actual).nonzero()[:5].tolist()}"
    both_inf = torch.isinf(actual) & torch.isinf(expected) & (torch.sign(actual) == torch.sign(expected))
    a = torch.where(both_inf, 0.0, actual)
    e = torch.where(both_inf, 0.0, expected)
    finite_e = e[torch.isfinite(e)]
    scale = finite_e.abs().mean() if finite_e.numel() else torch.tensor(0.0, dtype=torch.float64)
    if rowwise and e.dim() >= 1 and e.numel():
        scale = torch.where(torch.isfinite(e), e, 0.0).abs().amax(dim=-1, keepdim=True)
    err = (a - e).abs()
    bound = rel * (e.abs() + scale) + 1e-30
    ratio = err / bound
    if ratio.numel() and not (ratio <= 1).all():
        worst = int(torch.nan_to_num(ratio, nan=float("inf")).flatten().argmax())
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), ratio.shape))
        raise AssertionError(
            f"{name}: worst at {idx}: got {a[idx].item():.10g}, expected {e[idx].item():.10g}, "
            f"|err| {err[idx].item():.3g} > bound {bound[idx].item():.3g} (rel {rel})"
        )


def assert_matches_hand_values(actual, expected, rtol, atol):
    """``|actual - expected| <= rtol |expected| + atol`` against hand-computed float64 values; no NaN."""
    actual, expected = actual.double(), torch.as_tensor(expected, dtype=torch.float64)
    assert not torch.isnan(actual).any(), "NaN in the result"
    err = (actual - expected).abs() - rtol * expected.abs()
    worst = int(err.flatten().argmax())
    assert err.flatten()[worst] <= atol, (
        f"worst index {worst}: got {actual.flatten()[worst].item()!r}, expected {expected.flatten()[worst].item()!r}"
    )

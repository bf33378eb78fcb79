"""Row layout: address ``[..., V]`` tensors as ``[outer, inner, V]`` without copying.

A tensor whose leading dims cannot be flattened into one (``logits[:, :-1]`` of
a ``[B, T, V]`` buffer, say) is still addressable with two row strides: row
``r`` lives at ``(r // inner) * stride_outer + (r % inner) * stride_inner``.
Only when even that is impossible (three or more leading dims that do not
merge) is a copy made.
"""
import torch


def as_rows3d(x: torch.Tensor) -> torch.Tensor:
    """Return a ``[outer, inner, last]`` view of ``x`` (a copy only when no such view exists)."""
    last = x.shape[-1]
    if x.dim() == 1:
        return x.view(1, 1, last)
    if x.dim() == 2:
        return x.unsqueeze(0)
    inner = x.shape[-2]
    try:
        return x.view(-1, inner, last)
    except RuntimeError:
        return x.reshape(-1, inner, last)


def may_overlap(x: torch.Tensor) -> bool:
    """True unless ``x``'s elements provably occupy distinct memory (``expand``-ed or overlapping strides).

    Sufficient test: sorted by stride, every dimension's stride must exceed the span of the smaller
    ones (``sum (size_k - 1) stride_k``); size-1 dimensions never overlap. Metadata only, no sync.
    """
    dims = sorted((st, sz) for sz, st in zip(x.shape, x.stride()) if sz > 1)
    span = 0
    for stride, size in dims:
        if stride <= span:
            return True
        span += (size - 1) * stride
    return False

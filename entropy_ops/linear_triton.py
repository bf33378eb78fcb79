"""Triton launches of the hidden-state op (``linear_logprobs_and_entropy``): forward, backward and the
one-pass form; the backward walks the vocabulary (one-pass: the tokens) in chunks.

Forward, two launches: one grid over (token block, vocab strip) pairs in grouped order
(``_linear_logprobs_entropy_fwd``: each program walks its strip's ``[BLOCK_N, BLOCK_V]`` tiles, folding
their statistics in registers), then ``_linear_stats_merge`` folds each row's strip statistics in order
and writes ``logp``, ``H`` and the saved ``(m, log S, H)``. :func:`forward_strips` picks the strips: at
least ``FORWARD_MIN_STRIPS`` per token block (the programs resident together share their ``W`` tiles
and ``h`` blocks in L2, as in a grouped matmul) and about ``FORWARD_PROGRAMS`` programs in all (several
waves on any GPU), so the partial statistics are ``12 R N`` bytes for ``R`` strips: at most
``max(12 FORWARD_MIN_STRIPS N, 12 FORWARD_PROGRAMS B_N)``: 0.8 MB at N=8192 (8 strips), 1.1 MB with the
statistics and outputs.

Backward, per vocab chunk: ``_linear_logit_grad`` recomputes the logits tiles and writes ``dz`` (fp32
math, stored in the gradient-matmul dtype) into one ``[N, Vc]`` buffer reused by every chunk, then::

    dW[v0:v0+Vc]  = dz^T h          one matmul over all tokens, written once in the weight's dtype
    dh           += dz W[v0:v0+Vc]  into one fp32 [N, D] accumulator, chunk after chunk
    db[v0:v0+Vc]  = sum over token blocks of the kernel's fp32 column sums (torch.sum: fixed order)

No atomics and no cross-chunk accumulation of ``dW``: the gradients are bitwise reproducible (cuBLAS
picks one algorithm per shape; the Triton matmul has no split-K). The matmuls run in cuBLAS
(``matmul="cublas"``, the default on CUDA: ``torch.mm``/``torch.addmm`` with ``out=``, and
``out_dtype=torch.float32`` where the output is fp32 and the operands 16-bit, fp32 accumulation inside
cuBLAS) or in ``kernels/linear_matmul.py`` (``matmul="triton"``); on CPU tensors (the interpreter) in
fp32 PyTorch.

fp16: ``dz ~ g p`` with an upstream gradient ``g ~ 1 / N`` and ``p ~ 1 / V`` is ~1e-9, below fp16's
smallest subnormal (6e-8): rounded to fp16 it would flush to zero. For fp16 inputs ``dz`` is therefore
stored in bf16 (fp32's exponent range) and the matmuls run on bf16 copies of ``h`` (once, ``N D 2``
bytes) and of each ``W`` chunk (``Vc D 2``), ``dW`` through an fp32 ``[Vc, D]`` block.

Memory (bytes beyond the inputs and the returned gradients; ``e`` the input's element size, ``e_g`` the
gradient-matmul dtype's (2 for 16-bit inputs, 4 for fp32), ``B_N = 128`` token rows per tile, ``B_V``
vocab columns per tile)::

    forward        N (36 + 12 R)                               statistics, outputs, the R strips' partials
    backward peak  N D 4 [16-bit hidden] + N D e_g + N Vc e_g + 4 Vc ceil(N / B_N) [bias]
                   + fp16 weight: Vc D 6

``N D 4`` is the fp32 ``dh`` accumulator (for fp32 ``hidden`` it is the gradient itself); ``N D e_g``
the ``h`` operand of the ``dW`` matmul (:func:`rows2d`: flattened, ignored rows zeroed); ``N Vc e_g``
the ``dz`` buffer; fp16 weights add a bf16 ``W`` chunk and an fp32 ``dW`` block. ``Vc``
(:func:`vocab_chunk_size`) defaults to the largest multiple of ``B_V`` with
``N Vc e_g <= max(N D, 16 MiB)``: for 16-bit inputs ``Vc = D / 2`` (the ``dz`` buffer is a quarter of
the ``dh`` accumulator), large enough that each chunk's ``dh`` matmul stays compute-bound (its fp32
read-modify-write of ``[N, D]`` is ``8 N D`` bytes per ``2 N Vc D`` FLOPs: ``Vc / 4`` FLOP per byte,
512 at ``Vc = 2048``, above an H100's ~300 FLOP per HBM byte).
"""
import torch

from ._dispatch import triton_interpreting

MATMULS = ("auto", "cublas", "triton")
DZ_BUDGET_MIN = 16 << 20
FORWARD_MIN_STRIPS = 8  # vocab strips per token block at least (see forward_strips)
FORWARD_PROGRAMS = 512  # forward programs to aim for: about 4 waves of 1 CTA on 132 SMs


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def gemm_dtype(dtype: torch.dtype) -> torch.dtype:
    """``dz`` and gradient-matmul operand dtype: bf16 for fp16 inputs (no underflow), else the input's."""
    return torch.bfloat16 if dtype == torch.float16 else dtype


def vocab_chunk_size(n_rows: int, dim: int, n_vocab: int, gemm_elem: int, block_v: int, chunk: int | None = None):
    """Vocab columns per backward/forward chunk: ``chunk`` rounded up to whole tiles, or the default
    (the largest multiple of ``block_v`` with ``n_rows chunk gemm_elem <= max(n_rows dim, 16 MiB)``),
    at least one tile, at most ``n_vocab`` rounded up to a tile."""
    top = _cdiv(n_vocab, block_v) * block_v
    if chunk is None:
        budget = max(n_rows * dim, DZ_BUDGET_MIN)
        chunk = budget // (max(n_rows, 1) * gemm_elem) // block_v * block_v
    return min(top, max(block_v, _cdiv(chunk, block_v) * block_v))


def backward_peak_bytes(n_rows: int, dim: int, n_vocab: int, dtype: torch.dtype, *, bias: bool = False,
                        vocab_chunk: int | None = None, block_n: int = 128, block_v: int = 128) -> int:
    """The backward's peak extra bytes (module docstring), the returned gradients and O(N) terms left out::

        N D 4 [16-bit hidden] + N D e_g + N Vc e_g + 4 Vc ceil(N / B_N) [bias] + Vc D 6 [fp16 weight]
    """
    gd = gemm_dtype(dtype)
    e_g = gd.itemsize
    vc = vocab_chunk_size(n_rows, dim, n_vocab, e_g, block_v, vocab_chunk)
    total = n_rows * dim * e_g + n_rows * vc * e_g
    if dtype != torch.float32:
        total += n_rows * dim * 4
    if bias:
        total += 4 * vc * _cdiv(n_rows, block_n)
    if dtype == torch.float16:
        total += vc * dim * 6
    return total


def _kernel_meta(dtype: torch.dtype, bias, params) -> dict:
    from .kernels.linear_logprobs_entropy import GROUP_N, input_precision

    elem = torch.empty((), dtype=dtype).element_size()
    return dict(
        HAS_BIAS=bias is not None,
        HAS_SOFTCAP=params.logit_softcap is not None,
        INPUT_PRECISION=input_precision(elem, params.allow_tf32),
        # interpreter only: its tl.dot cannot multiply bf16 (see kernels/linear_logprobs_entropy._dot)
        DOT_FP32=dtype == torch.bfloat16 and triton_interpreting(),
        GROUP=GROUP_N,
    )


def _configs(dtype, params, config):
    from .kernels import linear_logprobs_entropy as k

    return config or k.launch_config(torch.empty((), dtype=dtype).element_size(), params.allow_tf32)


def resolve_matmul(matmul: str, device: torch.device) -> str:
    """``"cublas"`` (CUDA) / ``"torch"`` (CPU tensors: fp32 PyTorch) / ``"triton"`` for ``matmul``."""
    if matmul not in MATMULS:
        raise ValueError(f"matmul must be one of {MATMULS}, got {matmul!r}")
    if matmul == "triton":
        return "triton"
    return "cublas" if device.type == "cuda" else "torch"


def matmul_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, accumulate: bool, method: str,
                allow_tf32: bool = False) -> torch.Tensor:
    """``out (+)= a @ b`` with fp32 accumulation; ``out`` is fp32 or the operands' dtype, any strides the
    method accepts (cuBLAS: one unit stride). Deterministic for a given shape and method. An fp32 ``out``
    with 16-bit operands uses ``torch.mm``/``torch.addmm`` with ``out_dtype=torch.float32`` (CUDA); where
    that overload is missing, the Triton matmul."""
    if method == "triton":
        from .kernels import linear_matmul as km

        M, K = a.shape
        N = b.shape[1]
        if M == 0 or N == 0:
            return out
        if K == 0:
            return out if accumulate else out.zero_()
        cfg = km.matmul_config(a.element_size())
        grid = (_cdiv(M, cfg["BLOCK_M"]) * _cdiv(N, cfg["BLOCK_N"]),)
        km._matmul[grid](a, b, out, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                         out.stride(0), out.stride(1), **cfg, ACCUMULATE=accumulate,
                         INPUT_PRECISION="tf32" if (a.dtype == torch.float32 and allow_tf32) else "ieee",
                         DOT_FP32=a.dtype == torch.bfloat16 and triton_interpreting(),
                         num_warps=km.MATMUL_WARPS, num_stages=km.MATMUL_STAGES)
    elif method == "cublas":
        if out.dtype == a.dtype:
            if accumulate:
                torch.addmm(out, a, b, out=out)
            else:
                torch.mm(a, b, out=out)
        else:  # fp32 out, 16-bit operands: cuBLAS writes (or adds to out) its fp32 accumulator
            try:
                if accumulate:
                    torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
                else:
                    torch.mm(a, b, out_dtype=torch.float32, out=out)
            except (RuntimeError, TypeError, NotImplementedError):
                # a torch build without the out_dtype overloads on this device: the same product in the
                # Triton matmul (fp32 accumulation, one fp32 store), never a rounded 16-bit intermediate
                return matmul_into(out, a, b, accumulate=accumulate, method="triton")
    else:  # CPU tensors (interpreter runs): the same product in fp32 PyTorch
        prod = a.to(torch.float32) @ b.to(torch.float32)
        if accumulate:
            out.add_(prod)
        else:
            out.copy_(prod)
    return out


def _round_into(dst: torch.Tensor, prod: torch.Tensor, *, add: bool) -> None:
    """An fp32 ``dW`` block into a 16-bit weight gradient block (fp16 weights, whose matmuls run on bf16
    operands): stored, or (``add``) summed in fp32 with what ``dst`` holds; one rounding either way."""
    if add:
        dst.add_(prod)
    else:
        dst.copy_(prod)


def rows2d(h3d: torch.Tensor, keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[A, B, D]`` rows as one contiguous ``[A B, D]`` matrix in ``dtype`` with ignored rows zeroed, the
    ``h`` operand of the ``dW`` matmul (``N D`` elements). A copy always: it flattens rows that do not
    (``hidden[:, :-1]``), converts fp16 to bf16, and keeps a non-finite ignored row out of ``dW``
    (its ``dz`` is 0, but ``0 * NaN`` is NaN)."""
    A, B, D = h3d.shape
    out = torch.empty(A * B, D, dtype=dtype, device=h3d.device)
    out.view(A, B, D).copy_(h3d)
    return out.masked_fill_(~keep.view(-1, 1), 0)


def _launch_tiles(kernel, n_rows, width, cfg, *args, **meta):
    grid = (_cdiv(n_rows, cfg.block_n) * _cdiv(width, cfg.block_v),)
    kernel[grid](*args, BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d, **meta,
                 num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def forward_strips(n_rows: int, n_tiles: int, block_n: int) -> int:
    """Vocab tiles per forward program: ``ceil(n_tiles / R)`` for ``R = clamp(ceil(FORWARD_PROGRAMS /
    token blocks), FORWARD_MIN_STRIPS, n_tiles)`` strips per token block."""
    strips = min(n_tiles, max(FORWARD_MIN_STRIPS, _cdiv(FORWARD_PROGRAMS, _cdiv(n_rows, block_n))))
    return _cdiv(n_tiles, max(strips, 1))


def forward_tiles(h3d, weight, bias, targets, params, *, config=None, workspace=None, tiles_per_prog=None):
    """The forward -> fp32 ``(logp [N], H [N], stats [3, N], part)``.

    ``stats`` = ``(m, log S, H)`` of every row (ignored rows included: their logits are the bias);
    ``logp``/``H`` are 0 on ignored rows. With ``workspace`` (``[N, V]``, the one-pass loss) every program
    is one tile that also stores ``s - m_tile`` there, and ``part`` (the tile statistics, ``[3, tiles, N]``)
    is returned for the one-pass ``dz`` kernel. ``tiles_per_prog``: tiles per program (``None``:
    :func:`forward_strips`; the tests set it to walk strips at small shapes).
    """
    from .kernels import linear_logprobs_entropy as k

    A, B, D = h3d.shape
    n_rows, V = A * B, weight.shape[0]
    dev = h3d.device
    logp, H = (torch.empty(n_rows, dtype=torch.float32, device=dev) for _ in range(2))
    stats = torch.empty(3, n_rows, dtype=torch.float32, device=dev)
    if n_rows == 0:
        return logp, H, stats, None
    cfg = _configs(h3d.dtype, params, config)[0]
    n_tiles = _cdiv(V, cfg.block_v)
    if workspace is not None:
        per_prog = 1
    else:
        per_prog = tiles_per_prog or forward_strips(n_rows, n_tiles, cfg.block_n)
    n_parts = _cdiv(n_tiles, per_prog)
    part = torch.empty(3, n_parts, n_rows, dtype=torch.float32, device=dev)
    s_y = torch.empty(n_rows, dtype=torch.float32, device=dev)
    meta = _kernel_meta(h3d.dtype, bias, params)
    ws = workspace if workspace is not None else part  # placeholder pointer, never written
    grid = (_cdiv(n_rows, cfg.block_n) * n_parts,)
    k._linear_logprobs_entropy_fwd[grid](
        h3d, weight, bias if bias is not None else weight, targets, part, s_y, ws,
        n_rows, B, D, 0, V, per_prog,
        h3d.stride(0), h3d.stride(1), weight.stride(0), part.stride(0), part.stride(1),
        ws.stride(0) if workspace is not None else 0,
        params.inv_tau, params.logit_softcap or 1.0, params.ignore_index,
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d, **meta, STORE_LOGITS=workspace is not None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    k._linear_stats_merge[(_cdiv(n_rows, k.MERGE_BLOCK),)](
        part, s_y, targets, logp, H, stats,
        n_rows, n_parts, V, part.stride(0), part.stride(1), params.ignore_index,
        BLOCK=k.MERGE_BLOCK, num_warps=k.MERGE_WARPS,
    )
    return logp, H, stats, part


def _upstream(g, n_rows, dev):
    return g if g is not None else torch.zeros(n_rows, dtype=torch.float32, device=dev)


def backward_chunks(h3d, weight, bias, targets, stats, g_logp, g_H, params, needs, *, config=None,
                    vocab_chunk=None, matmul="auto", dh_out=None, dw_out=None, db_out=None):
    """Backward over vocab chunks -> ``(dh fp32 [N, D], dW [V, D], db fp32 [V])``, ``None`` where not needed.

    ``dW`` is written once per chunk in the weight's dtype; ``dh_out`` / ``dw_out`` / ``db_out`` (fp32,
    contiguous ``dh_out``) are the caller's accumulators instead: this call's gradient is *added* into
    them and they are returned.
    """
    from .kernels import linear_logprobs_entropy as k

    A, B, D = h3d.shape
    n_rows, V = A * B, weight.shape[0]
    dev = h3d.device
    need_h, need_w, need_b = needs
    gd = gemm_dtype(h3d.dtype)
    method = resolve_matmul(matmul, dev)
    dh = (dh_out if dh_out is not None else torch.empty(n_rows, D, dtype=torch.float32, device=dev)) if need_h else None
    dw = (dw_out if dw_out is not None else torch.empty(V, D, dtype=weight.dtype, device=dev)) if need_w else None
    db = (db_out if db_out is not None else torch.empty(V, dtype=torch.float32, device=dev)) if need_b else None
    if n_rows == 0 or not any(needs):
        for x, given in ((dh, dh_out), (dw, dw_out), (db, db_out)):
            if x is not None and given is None:
                x.zero_()
        return dh, dw, db
    cfg = _configs(h3d.dtype, params, config)[1]
    vc = vocab_chunk_size(n_rows, D, V, gd.itemsize, cfg.block_v, vocab_chunk)
    dz = torch.empty(n_rows, vc, dtype=gd, device=dev)
    db_part = torch.empty(_cdiv(n_rows, cfg.block_n), vc, dtype=torch.float32, device=dev) if need_b else dz
    h2d = rows2d(h3d, targets != params.ignore_index, gd) if need_w else None
    dw_tmp = None
    if need_w and dw.dtype != gd and dw.dtype != torch.float32:  # fp16 weight: bf16 matmul through an fp32 block
        dw_tmp = torch.empty(vc, D, dtype=torch.float32, device=dev)
    g_logp, g_H = _upstream(g_logp, n_rows, dev), _upstream(g_H, n_rows, dev)
    meta = _kernel_meta(h3d.dtype, bias, params)
    for v0 in range(0, V, vc):
        v1 = min(V, v0 + vc)
        w = v1 - v0
        _launch_tiles(k._linear_logit_grad, n_rows, w, cfg,
                      h3d, weight, bias if bias is not None else weight, targets, stats, g_logp, g_H, dz, db_part,
                      n_rows, B, D, v0, v1,
                      h3d.stride(0), h3d.stride(1), weight.stride(0), dz.stride(0), db_part.stride(0),
                      params.inv_tau, params.logit_softcap or 1.0, params.ignore_index,
                      **meta, GRAD_BIAS=need_b)
        dz_c = dz[:, :w]
        if need_b:
            part_sum = db_part[:, :w].sum(dim=0)
            if db_out is not None:
                db[v0:v1] += part_sum
            else:
                db[v0:v1] = part_sum
        if need_w:
            if dw_tmp is not None:  # dw_out given: the caller's weight-dtype accumulator
                _round_into(dw[v0:v1], matmul_into(dw_tmp[:w], dz_c.t(), h2d, accumulate=False, method=method),
                            add=dw_out is not None)
            else:
                matmul_into(dw[v0:v1], dz_c.t(), h2d, accumulate=dw_out is not None, method=method,
                            allow_tf32=params.allow_tf32)
        if need_h:
            w_c = weight[v0:v1] if weight.dtype == gd else weight[v0:v1].to(gd)
            matmul_into(dh, dz_c, w_c, accumulate=dh_out is not None or v0 > 0, method=method,
                        allow_tf32=params.allow_tf32)
    return dh, dw, db


def onepass_chunk(h3d, weight, bias, targets, params, needs, grad_fn, *, config=None, matmul="auto",
                  dh_rows=None, dw_acc=None, dw_first=True, db_acc=None):
    """One token chunk of the one-pass loss: logits of all ``V`` columns once, statistics, the upstream
    gradients ``grad_fn(logp, H) -> (g_logp, g_H)`` (fp32 ``[n]``), ``dz`` in place, then
    ``dh_rows = dz W`` (written once in ``dh_rows``' dtype), ``dw_acc (+)= dz^T h`` and
    ``db_acc += sum_rows dz``.

    ``dw_acc`` is ``[V, D]`` in the weight's dtype: ``dw_first`` overwrites it, later chunks add into it
    (cuBLAS ``addmm`` with ``beta = 1`` / the Triton matmul's ``ACCUMULATE``: fp32 accumulation inside
    the matmul, ``C`` read in its epilogue, one rounding to the weight's dtype per chunk). fp16 weights
    (bf16 operands, no fp16 ``dz``): both products walk the vocabulary in blocks of ``Vc`` rows
    (the op's ``vocab_chunk``, default ``D / 2``): a bf16 copy of ``W[block]`` for ``dh``, accumulated
    in an fp32 ``[n, D]`` buffer then rounded once to fp16; ``dz[:, block]^T h`` into an fp32
    ``[Vc, D]`` block, then added into (first chunk: copied into) ``dw_acc[block]``, one rounding.

    Buffers (freed on return): the workspace ``[n, V]`` in the gradient-matmul dtype (``s - m_tile``,
    then ``dz``), the forward's tile statistics, the ``h`` operand of ``dW`` (``[n, D]``), with a bias
    the per-token-block column sums, for fp16 the blocks above. Returns ``(logp, H, stats)`` of the
    chunk, fp32.
    """
    from .kernels import linear_logprobs_entropy as k

    A, B, D = h3d.shape
    n_rows, V = A * B, weight.shape[0]
    dev = h3d.device
    need_h, need_w, need_b = needs
    gd = gemm_dtype(h3d.dtype)
    method = resolve_matmul(matmul, dev)
    cfg = _configs(h3d.dtype, params, config)[0]
    ws = torch.empty(n_rows, V, dtype=gd, device=dev)
    logp, H, stats, part = forward_tiles(h3d, weight, bias, targets, params, config=config, workspace=ws)
    g_logp, g_H = grad_fn(logp, H)
    db_part = torch.empty(_cdiv(n_rows, cfg.block_n), V, dtype=torch.float32, device=dev) if need_b else ws
    k._linear_onepass_grad[(_cdiv(n_rows, cfg.block_n), _cdiv(V, cfg.block_v))](
        ws, part, targets, stats, _upstream(g_logp, n_rows, dev), _upstream(g_H, n_rows, dev), db_part,
        n_rows, V, ws.stride(0), part.stride(1), db_part.stride(0),
        params.inv_tau, params.temperature / (params.logit_softcap or 1.0), params.ignore_index,
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, HAS_SOFTCAP=params.logit_softcap is not None, GRAD_BIAS=need_b,
        num_warps=k.ONEPASS_WARPS,
    )
    if need_b:
        db_acc += db_part.sum(dim=0)
    narrow = weight.dtype != gd  # fp16: bf16 operands through bounded fp32 blocks
    # Vc = D / 2 rows by default (the op's 16-bit vocab chunk at large N): each block's matmul keeps
    # Vc / 4 FLOP per byte of its fp32 read-modify-write
    vc = vocab_chunk_size(n_rows, D, V, gd.itemsize, cfg.block_v, params.vocab_chunk or D // 2) if narrow else V
    blocks = [(v0, min(V, v0 + vc)) for v0 in range(0, V, vc)]
    if need_h:
        if not narrow:  # one matmul over the whole vocabulary, one rounding to hidden's dtype
            matmul_into(dh_rows, ws, weight, accumulate=False, method=method, allow_tf32=params.allow_tf32)
        else:
            dh32 = torch.empty(n_rows, D, dtype=torch.float32, device=dev)
            w_blk = torch.empty(vc, D, dtype=gd, device=dev)
            for v0, v1 in blocks:
                w_c = w_blk[:v1 - v0].copy_(weight[v0:v1])
                matmul_into(dh32, ws[:, v0:v1], w_c, accumulate=v0 > 0, method=method)
            dh_rows.copy_(dh32)
    if need_w:
        h2d = rows2d(h3d, targets != params.ignore_index, gd)
        if not narrow:
            matmul_into(dw_acc, ws.t(), h2d, accumulate=not dw_first, method=method, allow_tf32=params.allow_tf32)
        else:
            dw_blk = torch.empty(vc, D, dtype=torch.float32, device=dev)
            for v0, v1 in blocks:
                _round_into(dw_acc[v0:v1],
                            matmul_into(dw_blk[:v1 - v0], ws[:, v0:v1].t(), h2d, accumulate=False, method=method),
                            add=not dw_first)
    return logp, H, stats

"""The Triton kernels of `--train.fused-rms-norm` (fdfo/fused.py): one kernel forward, one backward, on CUDA only.

Same arithmetic as `fdfo.fused._ReferenceRMSNorm` (the pure-torch reference), except the order in which a row's sums
are taken (Triton's block reduction). A row is the last dimension, which must be contiguous; the other dimensions may
be permuted in memory (the attention's q / k are `[B, S, H, D]` tensors viewed as `[B, H, S, D]`), so no copy is made
of them: the kernels walk the rows in memory order. Not yet run on a GPU (tests/test_fused.py, marked gpu).
"""

from __future__ import annotations

import functools

import torch

from fdfo.fused import HALF, output_dtype


@functools.cache
def available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def forward(X, W, Y, RSTD, n_rows, eps, D: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr,
                HAS_WEIGHT: tl.constexpr, ROUND_TO_WEIGHT: tl.constexpr):
        rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
        cols = tl.arange(0, BLOCK_D)
        mask = (rows[:, None] < n_rows) & (cols[None, :] < D)
        offsets = rows[:, None] * D + cols[None, :]
        x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
        y = x * rstd[:, None]
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=cols < D, other=0.0).to(tl.float32)
            if ROUND_TO_WEIGHT:  # diffusers rounds x * rstd to the 16-bit weight dtype before the product
                y = y.to(W.dtype.element_ty).to(tl.float32)
            y = y * w[None, :]
        tl.store(Y + offsets, y.to(Y.dtype.element_ty), mask=mask)
        tl.store(RSTD + rows, rstd, mask=rows < n_rows)

    @triton.jit
    def backward(DY, X, W, RSTD, DX, n_rows, D: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr,
                 HAS_WEIGHT: tl.constexpr):
        rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
        cols = tl.arange(0, BLOCK_D)
        mask = (rows[:, None] < n_rows) & (cols[None, :] < D)
        offsets = rows[:, None] * D + cols[None, :]
        gy = tl.load(DY + offsets, mask=mask, other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            gy = gy * tl.load(W + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
        x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=rows < n_rows, other=0.0)
        y = x * rstd[:, None]
        dx = rstd[:, None] * (gy - y * (tl.sum(gy * y, axis=1) / D)[:, None])
        tl.store(DX + offsets, dx.to(DX.dtype.element_ty), mask=mask)

    return forward, backward


def memory_order(t: torch.Tensor) -> tuple[int, ...] | None:
    """A permutation `p` with `t.permute(p)` contiguous and the last dimension kept last, or None."""
    if t.stride(-1) != 1:
        return None
    lead = sorted(range(t.ndim - 1), key=lambda d: -t.stride(d))
    order = (*lead, t.ndim - 1)
    return order if t.permute(order).is_contiguous() else None


def _inverse(order: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(sorted(range(len(order)), key=lambda d: order[d]))


def _launch_shape(t: torch.Tensor) -> tuple[int, int, int, int]:
    d = t.shape[-1]
    block_d = 1 << max(d - 1, 0).bit_length()
    rows_per_program = max(1, 2048 // block_d)
    n_rows = t.numel() // d
    return n_rows, d, block_d, rows_per_program


class TritonRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        order = memory_order(x) or tuple(range(x.ndim))
        xp = x.permute(order).contiguous()  # a no-op view unless x's rows are not laid out one after another
        out = torch.empty(xp.shape, dtype=output_dtype(x.dtype, weight), device=x.device)
        n_rows, d, block_d, rows = _launch_shape(xp)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        forward, _ = _kernels()
        w = weight.contiguous() if weight is not None else xp
        forward[(-(-n_rows // rows),)](xp, w, out, rstd, n_rows, eps, D=d, BLOCK_D=block_d, ROWS=rows,
                                       HAS_WEIGHT=weight is not None,
                                       ROUND_TO_WEIGHT=weight is not None and weight.dtype in HALF)
        ctx.save_for_backward(xp, weight, rstd)
        ctx.order = order
        return out.permute(_inverse(order))

    @staticmethod
    def backward(ctx, grad):
        xp, weight, rstd = ctx.saved_tensors
        gp = grad.permute(ctx.order).contiguous()
        dxp = torch.empty_like(xp)
        n_rows, d, block_d, rows = _launch_shape(xp)
        _, backward = _kernels()
        w = weight.contiguous() if weight is not None else xp
        backward[(-(-n_rows // rows),)](gp, xp, w, rstd, dxp, n_rows, D=d, BLOCK_D=block_d, ROWS=rows,
                                        HAS_WEIGHT=weight is not None)
        return dxp.permute(_inverse(ctx.order)), None, None

"""Counting the aten ops a GPU would run, on a CPU: a dispatch mode below autocast, and what CUDA autocast needs to run
on fake `cuda:0` tensors in a CPU-only build of torch (fdfo/bench/census.py uses them).

- `OpCounter` records every aten op that reaches it (below autocast, above the fake-tensor kernels): its name, the
  dtypes and shapes in and out, the bytes it reads and writes, its FLOPs (torch.utils.flop_counter's formulas) and
  whether it ran in a backward.
- `cuda_autocast(dtype)` turns on CUDA autocast's own kernels the way `torch.autocast("cuda").__enter__` does; the
  context manager itself switches off without a GPU. The cast cache is off: caching a cast of a weight that requires
  grad makes a gradient accumulator, which needs a CUDA device guard a CPU build lacks. Each LoRA weight is used once
  per forward, so the cache would not change the count.
- `CudaOnCpuBuild` keeps three calls away from the CUDA device guard a CPU build lacks: Python indexing and
  `.contiguous()` become the aten ops their bindings call (slice / select / unsqueeze / alias; clone), and
  scaled-dot-product attention, whose backend choice has no CUDA entry on a CPU build, becomes the cuDNN attention the
  H200 profile shows (after autocast's cast of q, k, v).
- `numerics_options_counted(amp, emulated)`: the options that move rounding (fdfo/fused.py) as a GPU runs them: the
  fused RMS norm's Triton kernels (which launch outside aten) as one recorded op each way, and on CPU fake tensors
  the compute-dtype LayerNorm under the emulated autocast (which real autocast's state does not show).
- `emulated_autocast(dtype)`: fdfo/memory.py's `AutocastEmulation` (CUDA autocast's op lists applied by a
  TorchFunctionMode) with the same cuDNN attention, for CPU fake tensors; autograd refuses a backward on fake CUDA
  tensors, so the backward is counted this way, and the census checks that its forward matches the real one op for op.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

# aten ops that launch no kernel on a GPU although their schema is not a view
NO_KERNEL = frozenset({"aten._unsafe_view.default", "aten.empty.memory_format", "aten.empty_strided.default",
                       "aten.empty_like.default", "aten.new_empty.default", "aten.detach.default",
                       "aten.lift_fresh.default"})
MATMUL = frozenset({"mm", "addmm", "bmm", "baddbmm", "convolution", "convolution_backward"})
ATTENTION = frozenset({"_scaled_dot_product_cudnn_attention", "_scaled_dot_product_cudnn_attention_backward"})
NORM = frozenset({"native_layer_norm", "native_layer_norm_backward", "native_group_norm",
                  "native_group_norm_backward", "triton_rms_norm_forward", "triton_rms_norm_backward"})
REDUCTION = frozenset({"mean", "sum", "amax", "amin", "max", "min", "var_mean", "norm"})
COPY = frozenset({"clone", "copy_", "_to_copy", "slice_backward", "select_backward", "index", "index_put_",
                  "slice_scatter", "select_scatter"})
FILL = frozenset({"zeros_like", "ones_like", "zero_", "fill_", "zeros", "ones", "full", "new_zeros", "new_ones",
                  "full_like", "arange"})
KINDS = ("matmul", "attention", "cast", "copy", "cat", "norm", "reduction", "elementwise", "elementwise_mixed", "fill")


class Op(NamedTuple):
    """One aten op as it reached the counter."""

    name: str  # e.g. "aten.mm.default"
    kernel: bool  # launches a kernel on a GPU (not a view, not an allocation)
    kind: str  # one of KINDS ("view" for ops that launch none)
    inputs: tuple  # ((dtype, shape), ...) of the tensor arguments
    outputs: tuple
    nbytes: int  # bytes read (tensor arguments) plus bytes written (outputs)
    flops: int  # matrix products and attention (torch.utils.flop_counter), else 0
    backward: bool  # ran inside autograd's backward


def _meta(tensors) -> tuple:
    return tuple((t.dtype, tuple(t.shape)) for t in tensors)


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def kind_of(packet: str, inputs: tuple, outputs: tuple) -> str:
    """The kernel class of a non-view op (the classes of the cost model, fdfo/bench/cost.py)."""
    floats_in = {d for d, _ in inputs if d.is_floating_point}
    if packet in ("_to_copy", "copy_") and outputs and inputs and inputs[-1][0] != outputs[0][0]:
        return "cast"  # _to_copy(src) or copy_(dst, src) into another dtype
    for kind, names in (("matmul", MATMUL), ("attention", ATTENTION), ("norm", NORM), ("reduction", REDUCTION),
                        ("copy", COPY), ("fill", FILL)):
        if packet in names:
            return kind
    if packet in ("cat", "stack"):
        return "cat"
    return "elementwise_mixed" if len(floats_in) > 1 else "elementwise"


class OpCounter(TorchDispatchMode):
    """Records every aten op below autocast as an `Op` (prim ops, which ask a tensor's device, are left out)."""

    def __init__(self):
        super().__init__()
        self.ops: list[Op] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.namespace == "prim":
            return out
        ins = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        name, packet = str(func), func.overloadpacket.__name__
        kernel = not func.is_view and name not in NO_KERNEL
        inputs, outputs = _meta(ins), _meta(outs)
        counter = flop_registry.get(func.overloadpacket)
        flops = int(counter(*args, **kwargs, out_val=out)) if counter is not None else 0
        self.ops.append(Op(name, kernel, kind_of(packet, inputs, outputs) if kernel else "view", inputs, outputs,
                           _bytes(ins) + _bytes(outs), flops, torch._C._current_graph_task_id() != -1))
        return out


def to_fake(module: torch.nn.Module, fake: FakeTensorMode, device: torch.device) -> torch.nn.Module:
    """`module` (built on the meta device) with fake parameters and buffers on `device`: Module.to_empty, without
    handing the meta tensors to the fake mode."""
    with fake:
        return module._apply(lambda t: torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=device))


def summary(ops: list[Op]) -> dict:
    """The census of one call: kernel ops, casts, all aten ops, memory traffic (GB) and each kernel class."""
    kernels = [op for op in ops if op.kernel]
    by_kind = {}
    for kind in KINDS:
        chosen = [op for op in kernels if op.kind == kind]
        if chosen:
            by_kind[kind] = dict(ops=len(chosen), gbytes=sum(op.nbytes for op in chosen) / 1e9,
                                 gflops=sum(op.flops for op in chosen) / 1e9)
    return dict(kernel_ops=len(kernels), casts=sum(op.kind == "cast" for op in kernels), aten_ops=len(ops),
                gbytes=sum(op.nbytes for op in kernels) / 1e9, by_kind=by_kind)


def multiset(ops: list[Op]) -> dict:
    """Every op with its dtypes and shapes, counted: two runs of the same code give equal multisets."""
    counts: dict = {}
    for op in ops:
        key = (op.name, op.inputs, op.outputs)
        counts[key] = counts.get(key, 0) + 1
    return counts


@contextlib.contextmanager
def cuda_autocast(dtype: torch.dtype):
    """CUDA autocast's kernels on (for fake cuda:0 tensors), as `torch.autocast("cuda", dtype).__enter__` turns them on,
    with its cast cache off (module docstring)."""
    before = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"), torch.is_autocast_cache_enabled())
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", dtype)
    torch.set_autocast_cache_enabled(False)
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()
        torch.set_autocast_enabled("cuda", before[0])
        torch.set_autocast_dtype("cuda", before[1])
        torch.set_autocast_cache_enabled(before[2])


INT64_MAX = 2**63 - 1


def basic_getitem(tensor: torch.Tensor, index) -> torch.Tensor:
    """`tensor[index]` for ints, slices, None and Ellipsis, by the aten ops Python indexing calls: select, slice (a
    slice covering the whole dimension is skipped), unsqueeze; `alias` when nothing is indexed."""
    index = index if isinstance(index, tuple) else (index,)
    if any(not (i is None or i is Ellipsis or isinstance(i, (int, slice))) for i in index):
        raise TypeError(f"the census indexes fake CUDA tensors with ints, slices, None and ... only, not {index!r}")
    out, dim, changed = tensor, 0, False
    for position, i in enumerate(index):
        if i is Ellipsis:
            dim = out.dim() - sum(j is not None and j is not Ellipsis for j in index[position + 1:])
        elif i is None:
            out, dim, changed = torch.ops.aten.unsqueeze.default(out, dim), dim + 1, True
        elif isinstance(i, int):
            out, changed = torch.ops.aten.select.int(out, dim, i), True
        else:
            start, stop, step = i.start or 0, i.stop, i.step or 1
            if not (start == 0 and (stop is None or stop == out.shape[dim]) and step == 1):
                out = torch.ops.aten.slice.Tensor(out, dim, start, INT64_MAX if stop is None else stop, step)
                changed = True
            dim += 1
    return out if changed else torch.ops.aten.alias.default(tensor)


class CudnnAttention(torch.autograd.Function):
    """Scaled dot-product attention as the cuDNN kernels the H200 profile shows, forward and backward (on fake tensors
    their meta kernels give the shapes)."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        out = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False, scale=scale)
        ctx.save_for_backward(q, k, v, out[0], out[1], out[2], out[3], out[6], out[7])
        ctx.sizes, ctx.scale = (out[4], out[5]), scale
        return out[0]

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, logsumexp, cum_q, cum_k, seed, offset = ctx.saved_tensors
        dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            grad, q, k, v, out, logsumexp, seed, offset, q.new_empty(0), cum_q, cum_k, *ctx.sizes, 0.0, False,
            scale=ctx.scale)
        return dq, dk, dv, None


def cudnn_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    """`F.scaled_dot_product_attention` as the cuDNN kernel (no mask, no dropout, not causal: what SD3 calls)."""
    if attn_mask is not None or dropout_p or is_causal:
        raise NotImplementedError("the census counts unmasked, non-causal attention without dropout only")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return CudnnAttention.apply(q, k, v, scale)
    return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, False, 0.0, False, False,
                                                              scale=scale)[0]


class CudaOnCpuBuild(TorchFunctionMode):
    """For fake cuda:0 tensors under `cuda_autocast` (module docstring); only without autograd: recording a graph on
    fake CUDA tensors needs the CUDA device guard a CPU build lacks, and that error aborts the process."""

    def __enter__(self):
        if torch.is_grad_enabled():
            raise RuntimeError("counting on fake CUDA tensors needs torch.no_grad(): autograd on them aborts a CPU "
                               "build of torch")
        return super().__enter__()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.__getitem__:
            return basic_getitem(*args)
        if func is torch.Tensor.contiguous:
            tensor, memory_format = args[0], kwargs.get("memory_format", torch.contiguous_format)
            if tensor.is_contiguous(memory_format=memory_format):
                return tensor
            return torch.ops.aten.clone.default(tensor, memory_format=memory_format)
        if getattr(func, "__name__", "") == "scaled_dot_product_attention":
            q, k, v = args[:3]
            if torch.is_autocast_enabled("cuda"):  # autocast's cast, as its kernel for this op would make it
                dtype = torch.get_autocast_dtype("cuda")
                q, k, v = (t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t for t in (q, k, v))
            return cudnn_attention(q, k, v, *args[3:], **kwargs)
        return func(*args, **kwargs)


def emulated_autocast(dtype: torch.dtype | None):
    """CUDA autocast's op lists on CPU tensors (fdfo/memory.py), attention as the cuDNN kernels."""
    from fdfo.memory import AutocastEmulation

    return AutocastEmulation(dtype, attention=cudnn_attention)



# --fused-rms-norm's Triton kernels launch outside aten: in the census they are these two ops, one kernel each, reading
# and writing what the kernels read and write (no computation: they run on fake tensors only)
def _census_kernel(name: str):
    def kernel(reads: list[torch.Tensor], writes: list[torch.Tensor]) -> None:
        raise RuntimeError("the census's stand-in for a Triton kernel runs on fake tensors only")

    op = torch.library.custom_op(f"fdfo_census::{name}", kernel, mutates_args=("writes",))
    op.register_fake(lambda reads, writes: None)
    return op


triton_rms_norm_forward = _census_kernel("triton_rms_norm_forward")
triton_rms_norm_backward = _census_kernel("triton_rms_norm_backward")


class _Launcher:
    """Stands in for a `@triton.jit` kernel: `kernel[grid](*args, **meta)` records one op (module comment above)."""

    def __init__(self, op, n_reads: int, weight: int):
        self.op, self.n_reads, self.weight = op, n_reads, weight  # weight: the position of the W argument

    def __getitem__(self, grid):
        return self._launch

    def _launch(self, *args, **meta):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        reads = self.n_reads
        if not meta["HAS_WEIGHT"]:  # the W slot then holds the input again (fdfo/fused_triton.py): not read
            tensors.pop(self.weight)
            reads -= 1
        self.op(tensors[:reads], tensors[reads:])


def _counted_kernels():
    """(forward, backward) as fdfo/fused_triton.py's `_kernels` gives them: X, W read, Y, RSTD written; DY, X, W,
    RSTD read, DX written."""
    return (_Launcher(torch.ops.fdfo_census.triton_rms_norm_forward, 2, 1),
            _Launcher(torch.ops.fdfo_census.triton_rms_norm_backward, 4, 2))


def _triton_rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """fdfo.fused.rms_norm's CUDA path, whatever the fake tensors' device and Triton's presence on this machine."""
    from fdfo import fused_triton

    return fused_triton.TritonRMSNorm.apply(x, weight, eps)


@contextlib.contextmanager
def numerics_options_counted(amp: torch.dtype, emulated: bool):
    """While counting: the fused RMS norm through its Triton path with the kernels recorded as ops, and (emulated: CPU
    fake tensors under CUDA autocast's op lists) the compute-dtype LayerNorm rounding to `amp` as under CUDA autocast.
    Modules without these options are untouched."""
    from unittest import mock

    from fdfo import fused, fused_triton

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(fused, "rms_norm", _triton_rms_norm))
        stack.enter_context(mock.patch.object(fused_triton, "_kernels", _counted_kernels))
        if emulated:
            stack.enter_context(emulated_layer_norm(amp))
        yield


@contextlib.contextmanager
def emulated_layer_norm(amp: torch.dtype):
    """--train.compute-dtype-modulation's LayerNorm (fdfo/fused.py) as under CUDA autocast to `amp`, for code that runs
    under the emulated op lists: those are no autocast state, so the module itself would see none and round nothing."""
    from unittest import mock

    from fdfo.fused import ComputeDtypeLayerNorm

    def layer_norm_in_amp(module, x):
        weight, bias = (None if t is None else t.float() for t in (module.weight, module.bias))
        return torch.nn.functional.layer_norm(x.float(), module.normalized_shape, weight, bias, module.eps).to(amp)

    with mock.patch.object(ComputeDtypeLayerNorm, "forward", layer_norm_in_amp):
        yield

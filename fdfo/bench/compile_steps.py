"""The steps of the compile probe (fdfo/bench/compile_probe.py), each run in a child process: one block compiled
alone, the whole transformer as --train.compile compiles it, and its warm start from the saved artifacts."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from fdfo.bench import probe_calls as pc

MODES = {"block-default": "default", "block-max-autotune": "max-autotune-no-cudagraphs"}


def run_step(args: argparse.Namespace) -> dict:
    from fdfo.threads import single_thread_if_tiny

    single_thread_if_tiny(args.tiny)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    # the GPU's path (bf16 base, fp16 autocast, the speed levers); on a CPU fp32 without autocast, as train.py runs
    # there (the emulated autocast is a Python mode that the compiler would trace as well)
    precision = "fp16" if device.type == "cuda" else "fp32"
    record = pc.ProgressRecord(Path(args.out_dir) / f"compile-{args.child}.json",  # rewritten after every sub-step
                               {"step": args.child, "backend": args.backend, "device": str(device),
                                "precision": precision}, "log", 2)
    base = pc.build_base(args.tiny, device, torch.bfloat16 if precision == "fp16" else torch.float32)
    policy = pc.build_policy(base, pc.Variant("compile", precision=precision))
    inputs = pc.make_inputs(base, policy)
    calls = pc.Calls(policy, pc.Variant("compile", precision=precision), inputs)
    record.step("built")
    if args.child in MODES:
        block_step(args, calls, record)
    else:
        whole_step(args, calls, record)
    record.data["done"] = True
    record.step("done")
    return record.data


def block_inputs(calls: pc.Calls) -> tuple[torch.nn.Module, dict]:
    """A plain block of the transformer (neither dual-attention nor the last) where there is one, and its inputs in
    a sampling forward (12 rows) and in a training micro-batch (6 rows), as the model passes them."""
    base = calls.policy.pipe.transformer
    blocks = base.transformer_blocks
    plain = [i for i, b in enumerate(blocks[:-1]) if getattr(b, "attn2", None) is None]
    index = plain[0] if plain else 0
    captured = {}

    def grab(module, args, kwargs):
        captured.setdefault("grad" if torch.is_grad_enabled() else "no_grad", (
            tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args),
            {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}))

    handle = blocks[index].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        calls.sample_forward()
        calls.train_micro_batch()
        calls.reset()
    finally:
        handle.remove()
    return blocks[index], {"index": index, **captured}


def block_calls(calls: pc.Calls, fn, captured: dict):
    """(forward without autograd on the sampling rows, forward + backward on the training rows) of `fn`."""
    policy = calls.policy

    def forward():
        args, kwargs = captured["no_grad"]
        with torch.no_grad(), policy.autocast():
            return fn(*args, **kwargs)

    def forward_backward():
        args, kwargs = captured["grad"]
        with policy.autocast():
            out = fn(*args, **kwargs)
        loss = sum(o.float().square().mean() for o in (out if isinstance(out, tuple) else (out,))
                   if isinstance(o, torch.Tensor))
        loss.backward()
        return [p.grad.detach().clone() for p in calls.params if p.grad is not None]

    return forward, forward_backward


def first_call_s(fn, device: torch.device) -> float:
    pc.synchronize(device)
    start = time.perf_counter()
    fn()
    pc.synchronize(device)
    return time.perf_counter() - start


def block_step(args: argparse.Namespace, calls: pc.Calls, record: pc.ProgressRecord) -> None:
    device = calls.policy.device
    block, captured = block_inputs(calls)
    record.data["block"] = captured["index"]
    mode = MODES[args.child]
    options = dict(mode=mode) if args.backend == "inductor" else {}
    record.data["mode"] = mode if options else f"n/a (backend {args.backend})"
    compiled = torch.compile(block, backend=args.backend, **options)
    eager_fwd, eager_train = block_calls(calls, block, captured)
    fast_fwd, fast_train = block_calls(calls, compiled, captured)
    record.data["compile_s"] = {"forward": first_call_s(fast_fwd, device)}
    record.step("forward compiled")
    calls.reset()
    record.data["compile_s"]["forward_backward"] = first_call_s(fast_train, device)
    calls.reset()
    record.step("forward + backward compiled")
    for name, pair in (("forward", (eager_fwd, fast_fwd)), ("forward_backward", (eager_train, fast_train))):
        times = pc.interleaved(list(pair), [calls.reset, calls.reset], 1, args.repeats, device)
        outputs = []
        for fn in pair:
            calls.reset()
            result = fn()
            outputs.append([t for t in (result if isinstance(result, (list, tuple)) else [result])
                            if isinstance(t, torch.Tensor)])
        calls.reset()
        record.data[name] = {"eager": pc.timing_summary(times[0]), "compiled": pc.timing_summary(times[1]),
                             "output": pc.compare(*outputs)}
        record.step(f"{name}: eager {record.data[name]['eager']['median_ms']:.3f} ms, compiled "
                    f"{record.data[name]['compiled']['median_ms']:.3f} ms")


def whole_step(args: argparse.Namespace, calls: pc.Calls, record: pc.ProgressRecord) -> None:
    from fdfo import compile as compile_cache
    from fdfo.compile import compile_transformer

    device, out = calls.policy.device, Path(args.out_dir)
    if args.child == "whole":  # eager first, on the same policy
        eager = {call: calls.outputs(call) for call in ("sample_forward", "train_micro_batch")}
        for call in ("sample_forward", "train_micro_batch"):
            times = pc.interleaved([getattr(calls, call)], [calls.reset], 1, args.repeats, device)
            record.data.setdefault(call, {})["eager"] = pc.timing_summary(times[0])
        record.step("eager timed")
    else:
        record.data["warm_start_loaded"] = compile_cache.load_cache(out)
        record.step("cache loaded" if record.data["warm_start_loaded"] else "no cache to load")
    compile_transformer(calls.policy.pipe.transformer, args.scope, args.backend)
    record.data["scope"] = args.scope
    for call in ("sample_forward", "train_micro_batch"):
        calls.reset()
        record.data.setdefault(call, {})["first_call_s"] = first_call_s(getattr(calls, call), device)
        record.step(f"{call}: first compiled call {record.data[call]['first_call_s']:.1f} s")
    for call in ("sample_forward", "train_micro_batch"):
        times = pc.interleaved([getattr(calls, call)], [calls.reset], 1, args.repeats, device)
        record.data[call]["compiled"] = pc.timing_summary(times[0])
        if args.child == "whole":
            record.data[call]["output"] = pc.compare(eager[call], calls.outputs(call))
        record.step(f"{call}: compiled {record.data[call]['compiled']['median_ms']:.3f} ms")
    counters = torch._dynamo.utils.counters
    record.data["graphs"] = int(counters["stats"]["unique_graphs"])
    if args.child == "whole":
        saved = compile_cache.save_cache(out)
        size = (out / compile_cache.CACHE_FILE).stat().st_size if saved else 0
        record.data["cache"] = {"saved": saved, "bytes": size}
        record.step(f"compile cache: {size / 2**20:.1f} MiB" if saved else "no compile cache (backend)")

"""`python -m fdfo.bench --profile`: where the device time of one sampling forward and one training micro-batch goes.

After the bench's measured epochs, torch.profiler records one call of each at the bench's shape and precision:
the sampler's forward (`policy.velocity` under no_grad on a sampling batch of 2 x --sample-batch rows) and FDFO's
training micro-batch (`fdfo.phases._micro_batch`: forward, SPO loss, scaled backward of --train-batch items; its
gradients are then dropped). Each becomes a table of the 15 costliest kernels (on a CPU: operators, by self time)
with their share of all kernel time, plus the call's wall time, so that a gap between kernel time and wall time (a
launch-bound or host-bound call) shows too.
"""

from __future__ import annotations

import re
import time

import torch

TOP = 15


def _self_time_us(event, device_type: str) -> float:
    """An averaged event's own time in microseconds on the device that ran it (CUDA kernels, or CPU operators)."""
    if device_type == "cuda":
        return float(getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0))
    return float(event.self_cpu_time_total)


def kernel_table(prof, device_type: str, top: int = TOP) -> dict:
    """{"rows": the `top` costliest entries (name, calls, ms, share of the total), "total_ms", "kind"} from a finished
    profiler. On CUDA the entries are the kernels the device ran (DeviceType.CUDA events); should a profiler report
    none, the operators' self device time is used instead and "kind" says so."""
    averages = prof.key_averages()
    if device_type == "cuda":
        entries = [e for e in averages if str(getattr(e, "device_type", "")).endswith("CUDA")]
        kind = "CUDA kernels"
        if not entries:
            entries, kind = list(averages), "operators (self device time)"
    else:
        entries, kind = list(averages), "CPU operators (self time)"
    timed = [(e.key, int(e.count), _self_time_us(e, device_type)) for e in entries]
    timed = [t for t in timed if t[2] > 0]
    total = sum(t[2] for t in timed)
    timed.sort(key=lambda t: -t[2])
    rows = [dict(name=name, calls=calls, ms=us / 1e3, share=us / total if total else None)
            for name, calls, us in timed[:top]]
    return dict(kind=kind, total_ms=total / 1e3, rows=rows)


def _profiled(fn, device: torch.device) -> tuple[dict, float]:
    """(kernel table, wall seconds) of one call of `fn` under torch.profiler (CPU + CUDA activities on a GPU)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    sync()
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        fn()
        sync()
        wall = time.perf_counter() - start
    return kernel_table(prof, device.type), wall


def profile_calls(policy, module, scaler, optimizer, data, cfg, geom) -> dict:
    """Profile one sampling forward and one training micro-batch on the last epoch's training set `data`.
    Leaves no gradient behind (the optimizer's step is not taken)."""
    from fdfo.phases import _micro_batch

    device = policy.device
    rows = 2 * geom.sample_batch
    first = torch.arange(rows, device=data.timestep.device)  # any `rows` rollout states: the shapes are what counts
    x = data.states[first.to(data.states.device)].to(device)
    sigma = data.sigmas[data.timestep[first]].to(device)
    cond = {k: v[data.prompt[first]].to(device) for k, v in data.cond.items()}
    ids = data.steps[0][:geom.train_batch]

    def sample_forward():
        with torch.no_grad():
            policy.velocity(x, sigma, cond)

    def train_micro_batch():
        _micro_batch(policy, module, scaler, data, ids, cfg, len(ids))

    policy.transformer.eval()
    sampling, sampling_s = _profiled(sample_forward, device)
    policy.transformer.train()
    training, training_s = _profiled(train_micro_batch, device)
    optimizer.zero_grad(set_to_none=True)
    return {"sample_forward": dict(sampling, batch=rows, wall_ms=sampling_s * 1e3),
            "train_micro_batch": dict(training, batch=len(ids), wall_ms=training_s * 1e3)}


def short_name(name: str) -> str:
    """A readable label for PyTorch's own templated kernels, whose full names run to 700 characters: the kernel's
    name, then the operation and dtype found in its template arguments, e.g. `elementwise_kernel: Mul (Half)` or
    `unrolled_elementwise_kernel: copy with cast (Half)`. Other names (cuBLAS / cuDNN kernels) are returned whole."""
    kernel = re.match(r"void at::native::(?:\(anonymous namespace\)::)?(\w+)", name)
    if kernel is None:
        return name
    what = None
    if binary := re.search(r"BinaryFunctor<(?:c10::)?(\w+),.*?binary_internal::(\w+)Functor", name):
        # gpu_kernel_impl (not _nocast): the inputs' dtypes differ and the kernel casts them as it loads
        cast = ", inputs cast" if "gpu_kernel_impl<" in name else ""
        what = f"{binary.group(2)} ({binary.group(1)}{cast})"
    elif functor := re.search(r"CUDAFunctor_(\w+)<(?:c10::)?(\w+)>", name):
        what = f"{functor.group(1)} ({functor.group(2)})"
    elif "float16_copy_kernel_cuda" in name:
        what = "cast float -> Half"
    elif copy := re.search(r"direct_copy_kernel_cuda.*?lambda\((?:c10::)?(\w+)\)", name):
        what = f"copy{' with cast' if 'LoadWithCast' in name else ''} ({copy.group(1)})"
    elif op := re.search(r"(\w+?)(?:_tensor_scalar_kernel_impl|Ops)<(?:c10::)?(\w+)", name):
        what = f"{op.group(1)} ({op.group(2)})"
    return kernel.group(1) + (f": {what}" if what else "")


def profile_markdown(profile: dict) -> list[str]:
    """Markdown lines: one table per profiled call."""
    lines = ["The wall times include the profiler's own overhead on the host, so a "
             "call looks more host-bound here than it is; the bench's unprofiled times are in the tables above.", ""]
    titles = {"sample_forward": "one sampling forward", "train_micro_batch": "one training micro-batch"}
    for key, title in titles.items():
        p = profile.get(key)
        if not p:
            continue
        lines += [f"**{title}** ({p['batch']} rows): wall {p['wall_ms']:.1f} ms, {p['kind']} {p['total_ms']:.1f} ms "
                  f"in all ({p['total_ms'] / p['wall_ms']:.0%} of the wall time)", "",
                  "| # | kernel | calls | ms | share |", "|---|---|---|---|---|"]
        for i, r in enumerate(p["rows"], 1):
            name = short_name(r["name"]).replace("|", "\\|")
            name = name if len(name) <= 100 else name[:97] + "..."
            share = "-" if r["share"] is None else f"{r['share']:.1%}"
            lines.append(f"| {i} | `{name}` | {r['calls']} | {r['ms']:.2f} | {share} |")
        lines.append("")
    return lines

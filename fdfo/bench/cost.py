"""A cost model next to the kernel census: H200 milliseconds of a sampling forward and a training micro-batch,
predicted from the census's ops, bytes and FLOPs with the rates of the first H200 profile (docs/benchmarks.md,
docs/bench/h200-2026-12-04/bench-fp16.json). A planning tool, not a measurement (docs/performance.md says how far it
is from the runs it was calibrated on).

Calibration, on the census of the profiled code (fp16, all speed levers off) and the profile of its sampling forward
(146.0 ms of kernels, the 15 costliest listed):
- each listed kernel is the census's group of ops of one kind and dtypes (`ROWS`): its milliseconds per GB of those
  ops' reads and writes (a group with more ops than the kernel's calls, e.g. non-contiguous copies the profile lists
  under another name, is priced for all its ops at that rate);
- the matrix products the profile lists (`nvjet`, 338 calls) are the census's 338 largest by FLOPs: TFLOP/s for
  every matrix product at least as large; the cuDNN attention likewise (forward and backward alike);
- every other op (smaller matrix products, kinds outside the list) costs the same: the kernel time left over,
  divided by their number.
The host side is one rate, microseconds per aten op, from the unprofiled training micro-batch (237.7 ms: 3.169 s
per pair, 80 micro-batches of 6 for 6 pairs), which waits on the host. A call takes the longer of its device and
host times.
"""

from __future__ import annotations

import math

# The H200 run of 2026-12-04 (bench-fp16: 6 pairs, T = 40, sampling batches of 6 pairs = 12 rows, micro-batches
# of 6): seconds per pair, and its profile of one sampling forward (CUDA kernels, total and the 15 costliest).
MEASURED = dict(sample_s_per_pair=1.0142999799999994, train_s_per_pair=3.1689706169999994, pairs=6, steps=40,
                rows=12, train_batch=6, profile_sample_ms=146.04014400000028, profile_train_ms=173.21127800000252)
F16, F32, B16 = "float16", "float32", "bfloat16"
# (kernel as docs/benchmarks.md names it, calls, ms, the census groups it ran: (op, input dtypes, output dtype))
MIXED_MUL = [("mul", (F32, F16), F32), ("mul", (F16, F32), F32)]
ROWS = (
    ("nvjet_sm90_hsh_192x192_64x4_2x1_v_bz_coopB_bias_TNN", 196, 26.228737, "matmul"),
    ("elementwise_kernel: Mul (float, inputs cast)", 231, 14.891369, MIXED_MUL),
    ("unrolled_elementwise_kernel: copy with cast (Half)", 876, 13.839444, [("_to_copy", (B16,), F16)]),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_", 37, 9.464447, "attention"),
    ("CatArrayBatchedCopy", 72, 8.572445, [("cat", (B16, B16), B16), ("cat", (F16, F16), F16)]),
    ("unrolled_elementwise_kernel: copy with cast (float)", 219, 8.056486, [("_to_copy", (F16,), F32)]),
    ("vectorized_elementwise_kernel: cast float -> Half", 805, 7.975282, [("_to_copy", (F32,), F16)]),
    ("reduce_kernel: Mean (float)", 122, 7.450207, [("mean", (F32,), F32)]),
    ("elementwise_kernel: add (float)", 110, 6.185903, [("add", (F32, F16), F32), ("add", (F16, B16), F32)]),
    ("vectorized_elementwise_kernel: add (Half)", 299, 5.166892, [("add", (F16, F16), F16)]),
    ("nvjet_sm90_hsh_128x224_64x4_2x1_v_bz_coopA_bias_TNT", 142, 4.41995, "matmul"),
    ("elementwise_kernel: Mul (BFloat16)", 122, 4.165898, [("mul", (B16, B16), B16)]),
    ("elementwise_kernel: Mul (Half)", 107, 3.912787, [("mul", (F16, F16), F16)]),
    ("vectorized_elementwise_kernel: pow (float)", 122, 3.053497, [("pow", (F32,), F32)]),
    ("vectorized_layer_norm_kernel", 96, 3.038964, [("native_layer_norm", (F32,), F32)]),
)


def group(op) -> tuple:
    """The census op's group: (op, input dtypes in order, output dtype)."""
    return (op.name.split(".")[1], tuple(str(d).removeprefix("torch.") for d, _ in op.inputs),
            str(op.outputs[0][0]).removeprefix("torch.") if op.outputs else None)


def measured_ms() -> dict:
    """The H200 run's milliseconds per sampling forward and per training micro-batch, unprofiled."""
    m = MEASURED
    forwards_per_pair = m["steps"] / (m["rows"] // 2)  # one forward per step for each sampling batch of 6 pairs
    micro_batches_per_pair = 2 * m["steps"] / m["train_batch"]
    return {"sample_forward": 1e3 * m["sample_s_per_pair"] / forwards_per_pair,
            "train_micro_batch": 1e3 * m["train_s_per_pair"] / micro_batches_per_pair}


def calibrate(sample_ops: list, train_ops: list) -> dict:
    """The model's rates from the census of the profiled code (kernel-launching ops of its sampling forward and
    training micro-batch: fp16, levers off) and the profile (module docstring)."""
    kernels = [op for op in sample_ops if op.kernel]
    rates, covered = {}, set()
    for _, calls, ms, target in ROWS:
        if isinstance(target, list):
            chosen = [op for op in kernels if group(op) in target]
            for key in target:
                rates[key] = ms / 1e3 / (sum(op.nbytes for op in chosen) * calls / len(chosen) / 1e9) * 1e3
            covered.update(id(op) for op in chosen)
    tflops = {}
    for kind in ("matmul", "attention"):
        calls = sum(r[1] for r in ROWS if r[3] == kind)
        ms = sum(r[2] for r in ROWS if r[3] == kind)
        largest = sorted((op for op in kernels if op.kind == kind), key=lambda op: -op.flops)[:calls]
        tflops[kind] = (sum(op.flops for op in largest) / 1e12 / (ms / 1e3), largest[-1].flops)
        covered.update(id(op) for op in largest)
    model = {"ms_per_gb": rates, "tflops": {k: v[0] for k, v in tflops.items()},
             "min_flops": {k: v[1] for k, v in tflops.items()}, "other_us": 0.0, "host_us": 0.0}
    known = sum(op_ms(op, model) for op in kernels if id(op) in covered or group(op) in rates)
    others = [op for op in kernels if id(op) not in covered and group(op) not in rates]
    model["other_us"] = 1e3 * (MEASURED["profile_sample_ms"] - known) / len(others)
    model["host_us"] = 1e3 * measured_ms()["train_micro_batch"] / len(train_ops)
    return model


def op_ms(op, model: dict) -> float:
    """Device milliseconds of one kernel-launching op."""
    if op.kind in model["tflops"] and op.flops >= model["min_flops"][op.kind]:
        return op.flops / 1e12 / model["tflops"][op.kind] * 1e3
    rate = model["ms_per_gb"].get(group(op))
    if rate is not None:
        return op.nbytes / 1e9 * rate
    return model["other_us"] / 1e3


def predict(ops: list, model: dict) -> dict:
    """Device, host and predicted milliseconds of one counted call."""
    device = math.fsum(op_ms(op, model) for op in ops if op.kernel)
    host = len(ops) * model["host_us"] / 1e3
    return {"device_ms": device, "host_ms": host, "ms": max(device, host)}


def cost_record(sample_ops: list, train_ops: list, calibration: tuple[list, list]) -> dict:
    """The prediction for one census (its sampling forward's and micro-batch's ops), with the model calibrated on
    `calibration` (the ops of the profiled code's census), and how far the model is from the run it was calibrated
    on: its sampling forward (kernels 146.0 ms in the profile, 152.1 ms unprofiled) and micro-batch (173.2 ms of
    kernels in the profile, 237.7 ms unprofiled)."""
    model = calibrate(*calibration)
    sample, train = predict(sample_ops, model), predict(train_ops, model)
    m, measured = MEASURED, measured_ms()
    per_pair = {"sample": sample["ms"] * m["steps"] / (m["rows"] // 2) / 1e3,
                "train": train["ms"] * 2 * m["steps"] / m["train_batch"] / 1e3}
    base_sample, base_train = predict(calibration[0], model), predict(calibration[1], model)
    check = {"sample_forward": {"predicted_ms": base_sample["ms"], "measured_ms": measured["sample_forward"],
                                "profile_kernel_ms": m["profile_sample_ms"]},
             "train_micro_batch": {"predicted_ms": base_train["ms"], "measured_ms": measured["train_micro_batch"],
                                   "predicted_device_ms": base_train["device_ms"],
                                   "profile_kernel_ms": m["profile_train_ms"]}}
    return {"gpu": "H200 (calibrated on the fp16 profile of 2026-12-04)", "sample_forward": sample,
            "train_micro_batch": train, "s_per_pair": per_pair | {"total": sum(per_pair.values())},
            "rates": {"tflops": model["tflops"], "ms_per_gb": {" ".join(map(str, k)): v
                                                               for k, v in model["ms_per_gb"].items()},
                      "other_us_per_op": model["other_us"], "host_us_per_aten_op": model["host_us"]},
            "calibration_check": check}


def cost_lines(cost: dict) -> list[str]:
    s, t, p, check = cost["sample_forward"], cost["train_micro_batch"], cost["s_per_pair"], cost["calibration_check"]
    cs, ct = check["sample_forward"], check["train_micro_batch"]
    return [f"cost model, {cost['gpu']}; a plan, not a measurement:",
            f"  sampling forward {s['ms']:.1f} ms (device {s['device_ms']:.1f}, host {s['host_ms']:.1f}), "
            f"micro-batch {t['ms']:.1f} ms (device {t['device_ms']:.1f}, host {t['host_ms']:.1f}): "
            f"{p['sample']:.2f} s sampling + {p['train']:.2f} s training per pair",
            f"  on the profiled code it predicts {cs['predicted_ms']:.1f} ms per sampling forward (measured "
            f"{cs['measured_ms']:.1f}, kernels {cs['profile_kernel_ms']:.1f}) and {ct['predicted_ms']:.1f} ms per "
            f"micro-batch (measured {ct['measured_ms']:.1f}; kernels {ct['predicted_device_ms']:.1f} predicted, "
            f"{ct['profile_kernel_ms']:.1f} profiled)"]

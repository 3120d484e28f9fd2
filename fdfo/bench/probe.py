"""`python -m fdfo.bench.probe`: the speed changes measured per call, not per epoch (docs/performance.md "Per-call
probe"; docs/benchmarks.md says how the GPU check runs it).

One random-init transformer (SD3.5-Medium's shapes, or the tiny model's with --tiny) is built once in this process;
each variant (fdfo/bench/probe_calls.py: today's default with every speed lever on; the levers off; CUDA graphs;
the fused RMS norm; the compute-dtype modulation; bf16 instead of fp16) is a policy copied from it and compared with
the default on the same inputs, call by call:
- a sampling forward (12 rows) and a training micro-batch (6 items: forward, SPO loss, scaled backward), each timed
  `--repeats` times after `--warmup` rounds, default and variant interleaved (A B A B ...) so that drift reaches
  both alike; CUDA events on a GPU (each call alone on an idle device), the wall clock on a CPU; medians;
- its outputs against the default's, bit for bit (the velocity; the micro-batch's sums and every LoRA gradient), or
  for an option that moves rounding within its tolerance, or only reported (bf16); the default against itself first,
  so that a GPU's nondeterministic kernels cannot pass for a difference;
- the aten ops it dispatches (counted as the census counts them), the kernels it launches (torch.profiler, CUDA),
  and the census and its cost model for the same variant: computed here with --tiny, else read from --census-dir
  (files `census-<variant>.json` made by `python -m fdfo.bench --census` with the variant's flags; the full-shape
  census takes minutes of CPU, which a GPU lease should not spend).
The JSON (--out) is rewritten after every step, so a run cut short returns what it measured.

    python -m fdfo.bench.probe --tiny --out p.json                       # CPU rehearsal, tiny shapes, seconds
    python -m fdfo.bench.probe --census-dir docs/bench/census --out p.json  # on a GPU, SD3.5-M's shapes
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch

from fdfo.bench import probe_calls as pc
from fdfo.outputs import check_output_path

CALLS = ("sample_forward", "train_micro_batch")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fdfo.bench.probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="the tiny model's shapes (CPU rehearsal)")
    p.add_argument("--device", default=None, help="torch device; default cuda if available, else cpu (tiny: cpu)")
    p.add_argument("--variants", default=",".join(v for v in pc.VARIANTS if v != "default"),
                   help=f"comma-separated, each compared with the default: {', '.join(pc.VARIANTS)}")
    p.add_argument("--warmup", type=int, default=3,
                   help="rounds not kept (default 3; CUDA graphs capture in the third)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds kept (default 10; tiny 5)")
    p.add_argument("--census-dir", default=None, metavar="DIR",
                   help="census-<variant>.json files to set beside the measurements (without --tiny)")
    p.add_argument("--out", default=None, help="write the record as JSON to this file, after every step")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Every flag checked before anything is built; ValueError naming the flag."""
    from fdfo.cli import check_device

    args = build_parser().parse_args(argv)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in pc.VARIANTS or n == "default"]
    if unknown or not names:
        raise ValueError(f"--variants {args.variants!r}: give a comma-separated list of "
                         f"{', '.join(v for v in pc.VARIANTS if v != 'default')}")
    args.variants = names
    if args.repeats is None:
        args.repeats = 5 if args.tiny else 10
    if args.warmup < 3 and "cuda-graphs" in names:
        raise ValueError(f"--warmup {args.warmup}: CUDA graphs run 2 warm-up micro-batches and capture in the third; "
                         "give 3 or more")
    if args.warmup < 0 or args.repeats < 1:
        raise ValueError(f"--warmup {args.warmup} / --repeats {args.repeats}: warm-up >= 0, repeats >= 1")
    if args.census_dir is not None and not Path(args.census_dir).is_dir():
        raise ValueError(f"--census-dir {args.census_dir!r}: no such folder")
    if args.out is not None:
        check_output_path("--out", args.out, folder=False)
    check_device("--device", args.device)
    check_full_shape_device(args)
    return args


def check_full_shape_device(args: argparse.Namespace) -> None:
    """SD3.5-M's shapes only on a GPU: on a CPU one training micro-batch takes minutes (--tiny rehearses there)."""
    if not args.tiny and probe_device(args).type == "cpu":
        raise ValueError(f"{build_parser().prog} at SD3.5-M's shapes needs a GPU (no CUDA device here"
                         f"{'' if args.device is None else f', --device {args.device}'}): pass --tiny to rehearse on "
                         "a CPU")


def probe_device(args: argparse.Namespace) -> torch.device:
    return torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))


def census_for(variant: pc.Variant, tiny: bool, census_dir: str | None) -> dict | None:
    """The census of the variant (kernel ops, casts, aten ops per call, and the cost model's milliseconds)."""
    if tiny:
        from fdfo.bench.census import census
        from fdfo.models.sd3_speed import SpeedLevers

        record = census(variant.precision, True, SpeedLevers.parse(variant.levers),
                        dict(fused_rms_norm=variant.fused_rms_norm,
                             compute_dtype_modulation=variant.compute_dtype_modulation))
    else:
        path = Path(census_dir) / f"census-{'default' if variant.cuda_graphs else variant.name}.json" \
            if census_dir else None
        if path is None or not path.is_file():
            return None
        record = json.loads(path.read_text())
        record["file"] = str(path)
    out = {call: {k: record[call][k] for k in ("kernel_ops", "casts", "aten_ops")} for call in CALLS}
    cost = record.get("cost_model")
    if cost:
        for call in CALLS:
            out[call]["cost_model_ms"] = cost[call]["ms"]
    return out | {"options": record.get("options", []), "levers": record.get("levers"), "file": record.get("file")}


def measure_call(call: str, pair: list, warmup: int, repeats: int, device: torch.device) -> dict:
    """Both policies' calls, interleaved; their timings, dispatch counts and launches."""
    fns = [getattr(calls, call) for calls in pair]
    resets = [calls.reset if call == "train_micro_batch" else (lambda: None) for calls in pair]
    times = pc.interleaved(fns, resets, warmup, repeats, device)
    result = {"ms": [pc.timing_summary(t) for t in times]}
    for calls, reset, fn in zip(pair, resets, fns, strict=True):
        reset()
        fresh = calls.params if call == "train_micro_batch" and not calls.variant.cuda_graphs else None
        result.setdefault("dispatched", []).append(pc.dispatched(fn, fresh))  # graphs: the replay's own ops
        reset()
        result.setdefault("launches", []).append(pc.launches(fn, device))
    return result


def verdict(variant: pc.Variant, output: dict, call: str, repeatable: bool) -> str:
    if variant.check == "report":
        return "reported (another precision)"
    if variant.check == "velocity":
        if call != "sample_forward":
            return "reported (the gradients of an option that moves rounding)"
        ok = output["max_rel_rms"] <= pc.VELOCITY_TOLERANCE and output["nonfinite"][0] == output["nonfinite"][1]
        return f"{'ok' if ok else 'FAILED'}: within {pc.VELOCITY_TOLERANCE:g} relative RMS"
    if output["bit_identical"]:
        return "ok: bit-identical"
    return "FAILED: not bit-identical" + ("" if repeatable else " (but the default does not repeat itself either)")


def probe_variant(name: str, args, base, default, inputs, record: pc.ProgressRecord) -> None:
    variant = pc.VARIANTS[name]
    entry = record.data["variants"].setdefault(name, {"check": variant.check, "against": "default"})
    policy = pc.build_policy(base, variant)
    calls = pc.Calls(policy, variant, inputs)
    record.step(f"{name}: built")
    for call in CALLS:
        if call == "sample_forward" and variant.cuda_graphs:
            entry[call] = {"note": "sampling is not graphed: --train.cuda-graphs captures the training micro-batch"}
            continue
        measured = measure_call(call, [default, calls], args.warmup, args.repeats, base.device)
        output = pc.compare(default.outputs(call), calls.outputs(call))
        entry[call] = dict(measured, output=output, verdict=verdict(
            variant, output, call, record.data["reference"][call]["bit_identical"]))
        record.step(f"{name}: {call} {entry[call]['ms'][1]['median_ms']:.3f} ms against "
                    f"{entry[call]['ms'][0]['median_ms']:.3f} ms; {entry[call]['verdict']}")
    if calls.graph_calls is not None:
        entry["graph_calls"] = sorted(set(calls.graph_calls))
    entry["census"] = census_for(variant, args.tiny, args.census_dir)
    record.step(f"{name}: census {'beside it' if entry['census'] else 'not found'}")
    del calls, policy
    gc.collect()
    if base.device.type == "cuda":
        torch.cuda.empty_cache()


def env_record(device: torch.device) -> dict:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return dict(gpu=gpu, torch=torch.__version__, cuda=torch.version.cuda,
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))


def main(argv: list[str] | None = None) -> dict:
    from fdfo.threads import single_thread_if_tiny

    args = parse_args(argv)
    single_thread_if_tiny(args.tiny)
    device = probe_device(args)
    record = pc.ProgressRecord(args.out, {
        "env": env_record(device),
        "config": dict(tiny=args.tiny, device=str(device), rows=pc.SAMPLE_ROWS, items=pc.TRAIN_ITEMS,
                       warmup=args.warmup, repeats=args.repeats, variants=args.variants,
                       timing="CUDA events" if device.type == "cuda" else "wall clock"),
        "reference": {}, "variants": {}, "steps": [], "done": False}, "steps", 3)
    base = pc.build_base(args.tiny, device)
    default_policy = pc.build_policy(base, pc.VARIANTS["default"])
    inputs = pc.make_inputs(base, default_policy)
    default = pc.Calls(default_policy, pc.VARIANTS["default"], inputs)
    record.step("default: built")
    for call in CALLS:  # the default against itself: what "bit-identical" can mean on this device
        record.data["reference"][call] = pc.compare(default.outputs(call), default.outputs(call))
    record.data["reference"]["census"] = census_for(pc.VARIANTS["default"], args.tiny, args.census_dir)
    record.step("default: repeatability and census")
    for name in args.variants:
        try:
            probe_variant(name, args, base, default, inputs, record)
        except Exception as e:  # noqa: BLE001 - written down, then raised: what came before stays in the JSON
            record.data["error"] = f"{name}: {type(e).__name__}: {e}"
            record.step(f"{name}: stopped by {type(e).__name__}")
            raise
    record.data["done"] = True
    record.step("done")
    print("\n".join(summary_lines(record.data)))
    return record.data


def summary_lines(data: dict) -> list[str]:
    """A table: per variant and call, the medians (default, variant), the verdict, dispatched kernel ops and the
    census's count."""
    lines = [f"{'variant':26}{'call':19}{'default ms':>11}{'variant ms':>11}{'kernels':>9}{'census':>8}  verdict"]
    for name, entry in data["variants"].items():
        for call in CALLS:
            c = entry.get(call, {})
            if "ms" not in c:
                continue
            census = (entry.get("census") or {}).get(call, {}).get("kernel_ops", "-")
            lines.append(f"{name:26}{call:19}{c['ms'][0]['median_ms']:>11.3f}{c['ms'][1]['median_ms']:>11.3f}"
                         f"{c['dispatched'][1]['kernel_ops']:>9}{census:>8}  {c['verdict']}")
    return lines


if __name__ == "__main__":
    from fdfo.cli import run_main

    run_main(main, None)

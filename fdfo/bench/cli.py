"""The bench's command line: its flags, every check before any work (one line naming the bench's own flag), main and
the summary it prints."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from fdfo import distributed as dist
from fdfo.models.sd3_speed import SpeedLevers
from fdfo.models.shapes import MODELS
from fdfo.outputs import check_output_path, write_text

REPORT_OUT = "docs/benchmarks.md"  # --report's default --out
DESCRIPTION = "Throughput benchmark of one FDFO epoch (docs/performance.md)."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    check_args(args)
    return args


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fdfo.bench", description=DESCRIPTION)
    p.add_argument("--tiny", action="store_true", help="tiny model shapes on CPU (a few seconds; for tests)")
    p.add_argument("--model", choices=list(MODELS), default="sd35m",
                   help="whose real shapes --flops-only and --census count: sd35m (SD3.5-Medium, default), sd35l "
                        "(SD3.5-Large), flux-dev (FLUX.1-dev; --flops-only only); a measured run is SD3.5-Medium's")
    p.add_argument("--device", default=None, help="torch device; default cuda:<local rank> if available, else cpu")
    p.add_argument("--pairs", type=int, default=None, help="pairs per GPU sampled and trained (default 4; tiny 2)")
    p.add_argument("--steps", type=int, default=None, help="Euler steps T (default 40; tiny 4)")
    p.add_argument("--resolution", type=int, default=None, help="image side in pixels (default 512; tiny 64)")
    p.add_argument("--sample-batch", type=int, default=None, help="pairs per sampling batch (default: as train.py)")
    p.add_argument("--train-batch", type=int, default=None, help="items per micro-batch (default: as train.py)")
    p.add_argument("--decode-batch", type=int, default=1,
                   help="images per VAE decode call, 1 to 2 x --pairs (default 1, as training; "
                        "--sample.decode-batch-size)")
    p.add_argument("--gradient-steps", type=int, default=4, help="optimizer steps per epoch (default 4)")
    p.add_argument("--precision", choices=["fp16", "bf16", "fp32"], default="fp16",
                   help="training autocast precision (default fp16, the reference; fp32 on CPU)")
    p.add_argument("--guidance-scale", type=float, default=1.0,
                   help="SD3: the CFG scale (default 1: no CFG; any other value doubles the forward passes); "
                        "FLUX.1-dev (--model flux-dev): its distilled guidance, one forward pass whatever the value")
    add_speed_flags(p)
    p.add_argument("--grad-checkpoint", action="store_true", help="gradient checkpointing per transformer block")
    p.add_argument("--timesteps-per-sample", type=int, default=None,
                   help="train K of the T timesteps per trajectory (default all T; --train.timesteps-per-sample)")
    p.add_argument("--repeats", type=int, default=None, help="epochs run; the last one is measured (default 2; tiny 1)")
    p.add_argument("--rollout-device", choices=["auto", "cpu"], default="auto",
                   help="keep the rollouts on the training device (auto) or in host memory (--train.rollout-device)")
    p.add_argument("--memory-fraction", type=float, default=None,
                   help="cap this process's CUDA memory to this fraction of the GPU (e.g. 24/141: a 24 GB card)")
    p.add_argument("--reward", choices=["stub", "pickscore"], default="stub",
                   help="stub: a brightness mean (default); pickscore: a random-init CLIP ViT-H/14 (tiny: a 2-layer "
                        "CLIP) through rewards.clip.CLIPScorer, fp32, the real preprocessing")
    p.add_argument("--overlap-rewards", action="store_true",
                   help="--reward.overlap-preprocessing: prepare a batch's reward inputs while the next one is sampled "
                        "(needs --reward pickscore and 2 or more sampling batches to overlap anything)")
    p.add_argument("--hold-side-models", action="store_true",
                   help="hold a device buffer the size of SD3.5-M's text encoders (bf16) and, with the stub reward, "
                        "PickScore (fp32) through each sampling phase, freed for training as lowmem24 offloads them "
                        "(fdfo/bench/side.py); for memory-cap checks")
    p.add_argument("--profile", action="store_true",
                   help="after the measured epochs, torch.profiler tables (top 15 kernels) of one sampling forward and "
                        "one training micro-batch, into the JSON (fdfo/bench/profile.py)")
    p.add_argument("--flops-only", action="store_true", help="only count FLOPs on the meta device at the full shape")
    p.add_argument("--levers", default="all",
                   help="the bit-identical speed levers of the policy (fdfo/models/sd3_speed.py): all (default), none, "
                        "or a comma-separated list of base-dtype, peft-cast, lora-cache, shared-cast")
    p.add_argument("--census", action="store_true",
                   help="no run: count the kernels of one sampling forward and one training micro-batch at the shapes "
                        "of --model (sd35m or sd35l) on fake tensors, on a CPU, in --precision fp16 or bf16 "
                        "(fdfo/bench/census.py)")
    p.add_argument("--out", default=None, help="write the results as JSON to this file (with --report: the markdown)")
    p.add_argument("--report", default=None, metavar="DIR",
                   help="no run: summarise the bench JSON files in DIR (and DIR/status.txt) as markdown into --out")
    return p


def add_speed_flags(p: argparse.ArgumentParser) -> None:
    """The speed options as train.py names them (--train.compile, --train.cuda-graphs, the numerics options)."""
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer (--train.compile)")
    p.add_argument("--compile-scope", choices=["blocks", "transformer"], default="blocks",
                   help="with --compile: each block (default) or the whole transformer (--train.compile-scope)")
    p.add_argument("--compile-cache-dir", default=None, metavar="DIR",
                   help="with --compile: a warm start from DIR/compile-cache.bin if it is there, and the compiled "
                        "kernels saved there after the run (fdfo/compile.py, as a run folder keeps them)")
    p.add_argument("--compile-backend", choices=["inductor", "aot_eager", "eager"], default=None,
                   help="with --compile: torch.compile's backend (default inductor, as train.py; the others trace "
                        "without generating code, for a quick rehearsal on a CPU)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="capture the training micro-batch in a CUDA graph (--train.cuda-graphs; CUDA only)")
    p.add_argument("--fused-rms-norm", action="store_true",
                   help="the q / k RMS norms as one kernel each way (--train.fused-rms-norm; moves rounding)")
    p.add_argument("--compute-dtype-modulation", action="store_true",
                   help="the modulation after each LayerNorm in fp16 / bf16 (--train.compute-dtype-modulation; "
                        "moves rounding)")


def check_args(args: argparse.Namespace) -> None:
    """Every flag checked, and the output path, before anything is built or measured; ValueError naming the bench's
    own flag (not train.py's) and what it allows. Fills in the defaults that depend on --tiny."""
    from fdfo.cli import check_device

    if args.report is not None:
        if not Path(args.report).is_dir():
            raise FileNotFoundError(f"--report {args.report!r}: no such folder of bench JSON files")
        args.out = str(check_output_path("--out", args.out if args.out is not None else REPORT_OUT, folder=False))
        return
    if args.out is not None:
        check_output_path("--out", args.out, folder=False)
    SpeedLevers.parse(args.levers)  # ValueError naming the allowed levers
    check_model(args)
    if args.census:
        check_census(args)
        return
    check_device("--device", args.device)
    defaults = dict(pairs=2, steps=4, resolution=64, repeats=1) if args.tiny else dict(pairs=4, steps=40,
                                                                                       resolution=512, repeats=2)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    check_numbers(args)
    check_combinations(args)
    check_geometry(args)
    check_speed_flags(args)


def check_model(args: argparse.Namespace) -> None:
    """--model: the FLOP model counts every model; the census SD3's (FLUX has no from_components policy nor the speed
    levers it counts); a measured run and --tiny SD3.5-Medium's shapes only."""
    if args.model == "sd35m":
        return
    if args.tiny:
        raise ValueError(f"--model {args.model} counts a real model's shapes; --tiny uses the tiny SD3's: leave one "
                         f"out")
    if args.census and args.model == "flux-dev":
        raise ValueError("--model flux-dev: the census counts SD3 models only (sd35m, sd35l); use --flops-only for "
                         "FLUX.1-dev's FLOPs")
    if not (args.flops_only or args.census):
        raise ValueError(f"--model {args.model}: a measured run is SD3.5-Medium's; pass --flops-only (or --census) to "
                         f"count {args.model}'s shapes")


# what --census counts is fixed (SD3.5-M or --tiny, 512 px, a sampling batch of 6 pairs, a micro-batch of 6, no
# compile, on fake tensors): the flags of a measured run do not apply to it
CENSUS_FIXED = ("device", "pairs", "steps", "resolution", "sample_batch", "train_batch", "decode_batch",
                "timesteps_per_sample", "repeats", "memory_fraction", "gradient_steps", "guidance_scale", "compile",
                "compile_scope", "compile_cache_dir", "compile_backend", "cuda_graphs", "grad_checkpoint",
                "rollout_device", "reward",
                "overlap_rewards", "hold_side_models", "profile", "flops_only")


def check_census(args: argparse.Namespace) -> None:
    """--census: fp16 or bf16 (it counts autocast's path), and no flag of a measured run."""
    if args.precision not in ("fp16", "bf16"):
        raise ValueError(f"--census counts the GPU's autocast path: --precision fp16 or bf16, not {args.precision}")
    defaults = build_parser().parse_args([])
    for name in CENSUS_FIXED:
        if getattr(args, name) != getattr(defaults, name):
            raise ValueError(f"--census counts one sampling forward and one training micro-batch at fixed shapes; "
                             f"--{name.replace('_', '-')} does not apply to it (leave it out)")


def check_numbers(args: argparse.Namespace) -> None:
    """The counts, the resolution and the scalars, each on its own."""
    for flag in ("pairs", "steps", "repeats", "gradient_steps"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if not 1 <= args.decode_batch <= 2 * args.pairs:
        raise ValueError(f"--decode-batch {args.decode_batch} must be between 1 and {2 * args.pairs} (2 x --pairs "
                         f"{args.pairs}: a sampling batch never holds more images)")
    if args.resolution < 16 or args.resolution % 16:
        raise ValueError(f"--resolution {args.resolution} must be a multiple of 16, at least 16 (e.g. 64 or 512)")
    if not math.isfinite(args.guidance_scale):
        raise ValueError(f"--guidance-scale {args.guidance_scale} must be a finite number (1 disables CFG)")
    if args.memory_fraction is not None and not 0 < args.memory_fraction <= 1:
        raise ValueError(f"--memory-fraction must be in (0, 1], got {args.memory_fraction}")
    if args.timesteps_per_sample is not None and not 1 <= args.timesteps_per_sample <= args.steps:
        raise ValueError(f"--timesteps-per-sample {args.timesteps_per_sample} must be between 1 and --steps "
                         f"{args.steps}")


def check_combinations(args: argparse.Namespace) -> None:
    """Flags that do nothing together with others."""
    on_cpu = args.device is None and (args.tiny or not torch.cuda.is_available()) or \
        args.device is not None and torch.device(args.device).type == "cpu"
    if args.memory_fraction is not None and on_cpu:
        raise ValueError("--memory-fraction caps CUDA memory and does nothing on a CPU; leave it out, or run on a GPU "
                         "(--device cuda)")
    if args.overlap_rewards and args.reward == "stub":
        raise ValueError("--overlap-rewards needs --reward pickscore: --reward stub has no preprocessing to overlap")


# train.py's flag names in its speed-option checks (fdfo/config.py) -> the bench's (longest first)
TRAIN_FLAGS = (("--train.compile-scope", "--compile-scope"), ("--train.compile", "--compile"),
               ("--train.cuda-graphs", "--cuda-graphs"), ("--train.gradient-checkpointing", "--grad-checkpoint"),
               ("--train.rollout-device", "--rollout-device"))


def check_speed_flags(args: argparse.Namespace) -> None:
    """The speed options refused where train.py refuses them (fdfo/config.py: CUDA graphs on a CPU or with compile,
    checkpointing or host-memory rollouts; a compile scope without --compile), by train.py's own check, named with
    the bench's flags."""
    from fdfo.bench.epoch import bench_config
    from fdfo.config.checks import _check_speed_options

    if args.compile_backend is not None and not args.compile:
        raise ValueError(f"--compile-backend {args.compile_backend} says how --compile compiles: it needs --compile")
    if args.compile_cache_dir is not None:
        if not args.compile:
            raise ValueError(f"--compile-cache-dir {args.compile_cache_dir!r} keeps compiled kernels: it needs "
                             "--compile")
        check_output_path("--compile-cache-dir", args.compile_cache_dir, folder=True)
    cfg = bench_config(args)
    cfg.device = args.device or ("cpu" if args.tiny else None)
    problems = []

    def need(ok: bool, flag: str, value, allowed: str) -> None:
        if not ok:
            problems.append(f"{flag} {value} is invalid: it must be {allowed}")

    _check_speed_options(cfg, need)
    if problems:
        message = "; ".join(problems)
        for train_flag, bench_flag in TRAIN_FLAGS:
            message = message.replace(train_flag, bench_flag)
        raise ValueError(message)


def check_geometry(args: argparse.Namespace) -> None:
    """The geometry train.py would derive, checked here with the bench's flag names: 2 x pairs samples split into
    --gradient-steps equal optimizer steps (train.py would round --pairs down; the bench measures what is asked)."""
    multiple = args.gradient_steps // math.gcd(2, args.gradient_steps)
    if args.pairs % multiple:
        raise ValueError(f"--pairs {args.pairs} must be a multiple of {multiple} for --gradient-steps "
                         f"{args.gradient_steps} (the 2 x {args.pairs} samples split into equal optimizer steps)")
    per_step = 2 * args.pairs // args.gradient_steps
    for flag, value, n, what in (("--sample-batch", args.sample_batch, args.pairs, f"--pairs {args.pairs}"),
                                 ("--train-batch", args.train_batch, per_step, f"the {per_step} samples per optimizer "
                                  "step (2 x --pairs / --gradient-steps)")):
        if value is not None and (value < 1 or n % value):
            divisors = [d for d in range(1, n + 1) if n % d == 0]
            raise ValueError(f"{flag} {value} must divide {what}; valid values: {divisors}")


def print_summary(record: dict) -> None:
    """The run's numbers in a few lines; on a CPU without the GPU-only ones (GPU-seconds, MFU, peak memory)."""
    from fdfo.bench.flops import flop_text

    f = record["flops"]
    print(f"FLOPs: forward {flop_text(f['fwd_per_image'])} per image, training item {flop_text(f['train_item'])}, "
          f"decode {flop_text(f['decode_per_image'])} per image; "
          + (f"reward {flop_text(f['per_pair']['reward'])} per pair; " if f["per_pair"]["reward"] else "")
          + f"{flop_text(f['total_per_pair'])} per pair")
    if "total" not in record:
        return
    for name, p in record["phases"].items():
        mem = f", peak {p['peak_mem_gb']:.1f} GB" if p["peak_mem_gb"] is not None else ""
        mfu = f", MFU {p['mfu']:.1%}" if p["mfu"] is not None else ""
        print(f"{name:>8}: {p['s_per_pair']:.3f} s/pair{mfu}{mem}")
    t, world = record["total"], record["env"]["world_size"]
    if record["env"]["gpu"] is not None:
        spent = f" ({t['gpu_s_per_pair']:.3f} GPU-s/pair)"
    else:  # CPU: process-seconds, and only when several processes share the work
        spent = f" ({t['gpu_s_per_pair']:.3f} CPU-process-s/pair over {world} processes)" if world > 1 else ""
    mfu = f", MFU {t['mfu']:.1%}" if t["mfu"] is not None else ""
    print(f"   total: {t['s_per_pair']:.3f} s/pair{spent}{mfu}; rollouts {record['rollout_gb_per_rank']:.3g} GB per "
          f"rank; training activations {record['activation_gb_estimate']:.3g} GB per micro-batch (estimate, "
          f"fdfo/memory.py)")


def write_report(args: argparse.Namespace) -> dict:
    """--report DIR: the markdown of the folder's bench JSON files into --out, naming each file it skips."""
    from fdfo.bench.report import report_markdown

    skipped: list[tuple[str, str]] = []
    text = report_markdown(Path(args.report), skipped)
    for name, why in skipped:
        print(f"skipped {Path(args.report) / name}: {why}")
    write_text(args.out, text)
    print(f"wrote {args.out}")
    return {"report": text, "skipped": skipped}


def numerics_options(args: argparse.Namespace) -> dict[str, bool]:
    """The options that move rounding, as SD3Policy.speed_options names them."""
    return dict(fused_rms_norm=args.fused_rms_norm, compute_dtype_modulation=args.compute_dtype_modulation)


def write_census(args: argparse.Namespace) -> dict:
    """--census: the table on stdout, the record as JSON into --out."""
    from fdfo.bench.census import census, census_lines

    record = census(args.precision, args.tiny, SpeedLevers.parse(args.levers), numerics_options(args), args.model)
    print("\n".join(census_lines(record)))
    if args.out:
        replaced = write_text(args.out, json.dumps(record, indent=1) + "\n")
        print(f"{'replaced' if replaced else 'wrote'} {args.out}")
    return record


def main(argv: list[str] | None = None) -> dict:
    from fdfo.bench import epoch, flops
    from fdfo.threads import single_thread_if_tiny

    args = parse_args(argv)  # every flag and the output path checked before any work
    single_thread_if_tiny(args.tiny)  # tiny shapes gain nothing from threads (fdfo/threads.py)
    if args.report is not None:
        return write_report(args)
    if args.census:
        return write_census(args)
    record = flops.flops_record(args) if args.flops_only else epoch.run(args)
    if dist.get_rank() == 0:
        print_summary(record)
        if args.out:
            replaced = write_text(args.out, json.dumps(record, indent=1, default=str) + "\n")
            print(f"{'replaced' if replaced else 'wrote'} {args.out}")
    return record

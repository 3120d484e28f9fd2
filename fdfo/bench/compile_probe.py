"""`python -m fdfo.bench.compile_probe`: what `--train.compile` costs and gains, within a time cap (docs/performance.md
"Compile probe"; the GPU check runs it).

Each step runs in a child process of its own, under its own share of `--cap` seconds (killed at its end, after
SIGABRT has made Python print every thread's stack into the log), with a fresh Inductor cache folder, so that its
compile seconds are cold and a step that overruns (autotuning can take minutes) leaves the next its time:
- `block-default`, `block-max-autotune`: one transformer block of the policy (a plain one where the model has one;
  LoRA and speed levers as train.py builds them) compiled alone with torch.compile's default mode and with
  `max-autotune-no-cudagraphs`: the seconds of the first compiled forward (12 rows, no autograd) and forward +
  backward (6 rows), then medians of the eager and the compiled block, interleaved, and the compiled outputs
  against eager;
- `whole`: the whole transformer as `--train.compile` compiles it (fdfo/compile.py, `--scope`): eager medians of a
  sampling forward and a training micro-batch, the seconds of their first compiled calls, compiled medians, the
  compiled velocity and gradients against eager; then its compile artifacts saved as `compile-cache.bin` in
  `--out-dir` (torch.compiler.save_cache_artifacts), the warm start of a later run;
- `whole-warm`: the same in a fresh process that first loads that `compile-cache.bin` (fdfo/compile.py load_cache),
  i.e. what a resumed run spends before its first step (skipped without it; other backends keep no artifacts, and
  run it without any, as a rehearsal).
Each child writes `compile-<step>.json` after each of its steps; the parent gathers them into `compile-probe.json`
after each child. On a CPU (rehearsal) pass `--backend aot_eager`: Inductor's C++ compiles take minutes there.

    python -m fdfo.bench.compile_probe --tiny --backend aot_eager --cap 120 --out-dir c   # CPU rehearsal
    python -m fdfo.bench.compile_probe --cap 200 --out-dir c                               # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STEPS = ("block-default", "block-max-autotune", "whole", "whole-warm")
SHARE = {"block-default": 2, "block-max-autotune": 2, "whole": 4, "whole-warm": 1}  # of the cap, as time is left
MIN_STEP_S = 20  # a step with less left is skipped
SUMMARY = "compile-probe.json"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fdfo.bench.compile_probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="the tiny model's shapes (CPU rehearsal)")
    p.add_argument("--device", default=None, help="torch device; default cuda if available, else cpu (tiny: cpu)")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, in order: {', '.join(STEPS)}")
    p.add_argument("--cap", type=float, default=240.0, help="seconds for all steps together (default 240)")
    p.add_argument("--backend", default="inductor", choices=["inductor", "aot_eager", "eager"],
                   help="torch.compile's backend (default inductor; aot_eager for a quick CPU rehearsal)")
    p.add_argument("--scope", default="blocks", choices=["blocks", "transformer"],
                   help="what the whole step compiles (--train.compile-scope; default blocks)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per median (default 5)")
    p.add_argument("--out-dir", required=True, help="folder for the JSON files and compile-cache.bin")
    p.add_argument("--child", default=None, choices=STEPS, help=argparse.SUPPRESS)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from fdfo.cli import check_device
    from fdfo.outputs import check_output_path

    args = build_parser().parse_args(argv)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    if not steps or any(s not in STEPS for s in steps):
        raise ValueError(f"--steps {args.steps!r}: give a comma-separated list of {', '.join(STEPS)}")
    args.steps = steps
    if not args.cap > 0 or args.repeats < 1:
        raise ValueError(f"--cap {args.cap} / --repeats {args.repeats}: the cap must be > 0 seconds, repeats >= 1")
    check_output_path("--out-dir", args.out_dir, folder=True)
    check_device("--device", args.device)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if not args.tiny and torch.device(device).type == "cpu":
        raise ValueError("python -m fdfo.bench.compile_probe at SD3.5-M's shapes needs a GPU (no CUDA device here): "
                         "pass --tiny to rehearse on a CPU")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.child is not None:
        from fdfo.bench.compile_steps import run_step

        return run_step(args)
    return run_parent(args)


def run_parent(args: argparse.Namespace) -> dict:
    """Each step in its own child process with its share of the time left (module docstring)."""
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.cap
    summary = {"cap_s": args.cap, "backend": args.backend, "scope": args.scope, "steps": {}}
    for i, step in enumerate(args.steps):
        left = deadline - time.monotonic()
        share = SHARE[step] / sum(SHARE[s] for s in args.steps[i:])
        if step == "whole-warm" and args.backend == "inductor" and not (out / "compile-cache.bin").is_file():
            summary["steps"][step] = {"status": "skipped (no compile-cache.bin from the whole step)"}
        elif left < MIN_STEP_S:
            summary["steps"][step] = {"status": f"skipped ({left:.0f} s left of the {args.cap:g} s cap)"}
        else:
            summary["steps"][step] = run_child(args, step, left * share if i < len(args.steps) - 1 else left, out)
        write_summary(out, summary)
        print(f"compile probe: {step}: {summary['steps'][step]['status']}", flush=True)
    return summary


def run_child(args: argparse.Namespace, step: str, cap: float, out: Path) -> dict:
    """One step in a child process under `cap` seconds; its JSON with how it ended."""
    command = [sys.executable, "-m", "fdfo.bench.compile_probe", "--child", step, "--out-dir", str(out),
               "--backend", args.backend, "--scope", args.scope, "--repeats", str(args.repeats)]
    command += ["--tiny"] * args.tiny + (["--device", args.device] if args.device else [])
    env = dict(os.environ, PYTHONFAULTHANDLER="1", PYTHONUNBUFFERED="1")
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="inductor-") as cache:
        env["TORCHINDUCTOR_CACHE_DIR"] = cache  # cold: nothing compiled by an earlier step or run
        env["TRITON_CACHE_DIR"] = os.path.join(cache, "triton")
        child = subprocess.Popen(command, env=env, start_new_session=True)
        try:
            rc = child.wait(timeout=cap)
            status = "ok" if rc == 0 else f"FAILED (exit {rc})"
        except subprocess.TimeoutExpired:
            stop(child)
            status = f"TIMED OUT after {cap:.0f} s (its stacks are in the log)"
    result_file = out / f"compile-{step}.json"
    result = json.loads(result_file.read_text()) if result_file.is_file() else {}
    return result | {"status": status, "cap_s": round(cap, 1), "wall_s": round(time.monotonic() - start, 1)}


def stop(child: subprocess.Popen) -> None:
    """SIGABRT to the child's process group (Python's fault handler prints every thread's stack), then SIGKILL."""
    for sig, wait in ((signal.SIGABRT, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            return
        try:
            child.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def write_summary(out: Path, summary: dict) -> None:
    from fdfo.outputs import write_text

    write_text(out / SUMMARY, json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    from fdfo.cli import run_main

    run_main(main, None)

"""The sections of docs/benchmarks.md (fdfo/bench/report.py) beside the bench's tables: the machine
(environment.json, scripts/gpu_parts.py), the per-call probe (probe.json, fdfo/bench/probe.py), the compile probe
(compile/compile-probe.json, fdfo/bench/compile_probe.py) and how to run the check (the plan in
scripts/gpu_check.sh's header, quoted, so that it has one home)."""

from __future__ import annotations

import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.sh"
OWN_FILES = ("probe.json", "environment.json")  # shown in their own sections, not bench records


def is_own_file(name: str) -> bool:
    """JSON files of the GPU check that are not bench records: the probe's, the machine's, each part's record."""
    return name in OWN_FILES or name.endswith(".part.json")


def _load(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _ms(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def environment_lines(folder: Path) -> list[str]:
    env = _load(folder / "environment.json")
    if env is None:
        return []
    t, p = env.get("torch", {}), env.get("packages", {})
    smi = env.get("nvidia_smi") or []
    host = env.get("host", {})
    return ["## The machine", "", f"- GPU: {t.get('device', 'none')} (capability {t.get('capability', '-')}); "
            f"nvidia-smi: {smi[1] if len(smi) > 1 else '-'}",
            f"- torch {t.get('version')}, CUDA {t.get('cuda')}, cuDNN {t.get('cudnn')}; diffusers "
            f"{p.get('diffusers')}, transformers {p.get('transformers')}, peft {p.get('peft')}, "
            f"triton {p.get('triton')}",
            f"- {host.get('cpus')} CPUs, load {' '.join(host.get('loadavg', []))} at the start; GPU processes then: "
            f"{env.get('gpu_processes') or 'none'}; name lookup {env.get('fqdn_lookup_s')} s", ""]


def probe_lines(folder: Path) -> list[str]:
    data = _load(folder / "probe.json")
    if data is None:
        return []
    c = data.get("config", {})
    lines = ["## Per-call probe", "",
             f"`python -m fdfo.bench.probe` ({'tiny model' if c.get('tiny') else 'SD3.5-M'}, {c.get('timing')}): "
             f"a sampling forward of {c.get('rows')} rows and a training micro-batch of {c.get('items')} items, "
             f"medians of {c.get('repeats')} calls after {c.get('warmup')} warm-up rounds, each variant interleaved "
             f"with the default (A B A B ...). Kernels: aten ops that launch one, dispatched by the real call and "
             f"counted by the census; launches: CUDA kernels in torch.profiler. The cost model is the census's "
             "(docs/performance.md). " + ("Complete." if data.get("done") else
                                          f"CUT SHORT ({data.get('error', 'stopped')}): the rows below are what it "
                                          "measured."),
             ""]
    ref = data.get("reference", {})
    if ref:
        lines += ["The default against itself: " + ", ".join(
            f"{call} {'bit-identical' if r.get('bit_identical') else 'NOT bit-identical'}"
            for call, r in ref.items() if isinstance(r, dict) and "bit_identical" in r), ""]
    lines += ["| variant | call | default ms | variant ms | change | verdict | kernels (dispatched) | launches | "
              "census kernels | cost model ms |", "|" + "---|" * 10]
    for name, entry in data.get("variants", {}).items():
        census = entry.get("census") or {}
        for call in ("sample_forward", "train_micro_batch"):
            r = entry.get(call, {})
            if "ms" not in r:
                if "note" in r:
                    lines.append(f"| {name} | {call} | | | | {r['note']} | | | | |")
                continue
            a, b = r["ms"][0]["median_ms"], r["ms"][1]["median_ms"]
            launch = (r.get("launches") or [None, None])[1]
            lines.append(f"| {name} | {call} | {a:.2f} | {b:.2f} | {(b - a) / a:+.1%} | {r['verdict']} | "
                         f"{r['dispatched'][1]['kernel_ops']} | {launch['kernels'] if launch else '-'} | "
                         f"{census.get(call, {}).get('kernel_ops', '-')} | "
                         f"{_ms(census.get(call, {}).get('cost_model_ms'))} |")
    return lines + [""]


def compile_lines(folder: Path) -> list[str]:
    data = _load(folder / "compile" / "compile-probe.json")
    if data is None:
        return []
    lines = ["## Compile probe", "",
             f"`python -m fdfo.bench.compile_probe`, backend {data.get('backend')}, each step in a child process "
             f"within {data.get('cap_s')} s in all; first-call seconds include tracing and compiling (cold "
             "Inductor cache, except `whole-warm`, which loads the `whole` step's artifacts).", "",
             "| step | status | first calls (s) | eager ms | compiled ms | compiled against eager |", "|" + "---|" * 6]
    for step, r in data.get("steps", {}).items():
        if "compile_s" in r:  # one block
            first = f"forward {r['compile_s'].get('forward', 0):.1f}, + backward " \
                    f"{r['compile_s'].get('forward_backward', 0):.1f}" if r["compile_s"] else "-"
            calls = [(k, r.get(k, {})) for k in ("forward", "forward_backward")]
        else:
            first = ", ".join(f"{k} {r[k]['first_call_s']:.1f}" for k in ("sample_forward", "train_micro_batch")
                              if "first_call_s" in r.get(k, {})) or "-"
            calls = [(k, r.get(k, {})) for k in ("sample_forward", "train_micro_batch")]
        eager = ", ".join(f"{k} {v['eager']['median_ms']:.2f}" for k, v in calls if "eager" in v) or "-"
        fast = ", ".join(f"{k} {v['compiled']['median_ms']:.2f}" for k, v in calls if "compiled" in v) or "-"
        check = ", ".join(f"{k} {v['output']['max_rel_rms']:.2g} rel. RMS" for k, v in calls if "output" in v) or "-"
        cache = r.get("cache") or {}
        status = r.get("status", "-") + (f"; cache {cache['bytes'] / 2**20:.1f} MiB" if cache.get("saved") else "")
        lines.append(f"| {step} | {status} | {first} | {eager} | {fast} | {check} |")
    return lines + [""]


def how_to_run_lines() -> list[str]:
    """The plan from scripts/gpu_check.sh's header, and the commands (docs/bench/NEXT_RUN.md has the device's)."""
    lines = ["## How to run", "",
             "`scripts/gpu_check.sh` runs the check in two calls of a device lease (`GPU_CHECK_CALL=1`, then `2`); "
             "[bench/NEXT_RUN.md](bench/NEXT_RUN.md) has the exact commands for the device machine, "
             "`bash scripts/gpu_check.sh --cpu-dry-run` rehearses every part on a CPU at tiny shapes. This page is "
             "regenerated from a run's folder with `python -m fdfo.bench --report docs/bench/<folder> --out "
             "docs/benchmarks.md`. The plan, from the script's header:", "", "```"]
    text = SCRIPT.read_text(encoding="utf-8").splitlines() if SCRIPT.is_file() else []
    start = next((i for i, line in enumerate(text) if line.startswith("# The plan")), None)
    if start is None:
        return []
    for line in text[start:]:
        if not line.startswith("#") or line.strip() == "#":
            break
        lines.append(line[2:])
    return lines + ["```", ""]

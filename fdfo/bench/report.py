"""`python -m fdfo.bench --report DIR`: docs/benchmarks.md from a folder of bench JSON files, one table row each, a
per-phase table, the profile tables of runs made with --profile, the per-call and compile probes, the machine, the
folder's notes.md (how the run was made), the GPU check's status.txt and how to run it (fdfo/bench/report_probe.py).
A JSON file that is not a measured bench record (unreadable, not JSON, a --flops-only count, a record missing a field
the table shows) is skipped and named with the reason, never silently dropped; the GPU check's own records (the
probe's, the machine's, each part's) have their sections instead."""

from __future__ import annotations

import json
from pathlib import Path

PHASES = ("sample", "decode", "reward", "exchange", "train")


def _fmt(value, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def phase_cell(p: dict | None) -> str:
    """One phase of one run: "s/pair · TFLOP/s · MFU · peak GB" ("-" for what was not measured)."""
    if not p:
        return "-"
    mfu = _fmt(p.get("mfu"), ".1f", 100.0) + ("%" if p.get("mfu") else "")
    return (f"{_fmt(p.get('s_per_pair'), '.3f')} s · {_fmt(p.get('achieved_tflops'), '.0f')} TFLOP/s · {mfu} · "
            f"{_fmt(p.get('peak_mem_gb'), '.1f')} GB")


def reward_model(config: dict) -> str:
    """The report's name for a run's reward: stub, pickscore or "pickscore + overlap" (older JSON: stub)."""
    return config.get("reward", "stub") + (" + overlap" if config.get("overlap_rewards") else "")


def table_row(name: str, r: dict) -> list[str]:
    """The table cells of one bench record; KeyError / TypeError / ValueError for a record without the fields."""
    c, ph, t = r["config"], r["phases"], r["total"]
    cells = [name.removesuffix(".json"), c.get("precision"), "yes" if c.get("compile") else "no",
             "yes" if c.get("grad_checkpoint") else "no",
             f"{c.get('pairs_per_gpu')} x {c.get('steps')} ({c.get('sample_batch')})", reward_model(c)]
    cells += [_fmt(ph[k]["s_per_pair"], ".3f") for k in PHASES]
    cells += [_fmt(t["s_per_pair"], ".3f"), _fmt(t["mfu"], ".1f", 100.0) + ("%" if t["mfu"] else ""),
              _fmt(t["peak_mem_gb"], ".1f"), _fmt(r.get("rollout_gb_per_rank"), ".3g"),
              _fmt(r.get("activation_gb_estimate"), ".3g"), options_cell(c)]
    return [str(x) for x in cells]


def options_cell(config: dict) -> str:
    """The speed options a run had that are not the defaults (older JSON: none recorded, "-")."""
    chosen = [] if "levers" in config else ["before the speed levers"]
    if config.get("levers", "all") != "all":
        chosen.append(f"levers {config['levers']}")
    if config.get("compile_scope", "blocks") != "blocks":
        chosen.append(f"compile {config['compile_scope']}")
    chosen += [flag.replace("_", "-") for flag in ("cuda_graphs", "fused_rms_norm", "compute_dtype_modulation")
               if config.get(flag)]
    if config.get("rollout_device") == "cpu":
        chosen.append("rollouts in host memory")
    return ", ".join(chosen) or "-"


def read_records(folder: Path) -> tuple[list[tuple[str, dict, list[str]]], list[tuple[str, str]]]:
    """([(file name, record, table cells)], [(file name, why it was skipped)]) for the *.json files of `folder`."""
    from fdfo.bench.report_probe import is_own_file

    records, skipped = [], []
    for path in sorted(folder.glob("*.json")):
        if is_own_file(path.name):  # the GPU check's probe, machine and part records: their own sections
            continue
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            skipped.append((path.name, f"could not be read ({e.strerror or e})"))
            continue
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            skipped.append((path.name, f"not JSON ({e})"))
            continue
        if not isinstance(record, dict) or "total" not in record:
            what = "a --flops-only count" if isinstance(record, dict) and "flops" in record else "something else"
            skipped.append((path.name, f"not a measured bench record (no \"total\"; {what})"))
            continue
        try:
            cells = table_row(path.name, record)
            record["env"].get("date")
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            skipped.append((path.name, f"a bench record without the fields the table shows ({type(e).__name__}: "
                                       f"{e})"))
            continue
        records.append((path.name, record, cells))
    return records, skipped


def report_markdown(folder: Path, skipped: list | None = None) -> str:
    """docs/benchmarks.md from a folder of bench JSON files (one table row each) and the check's status.txt. The
    files skipped, with the reason, are appended to `skipped` when given."""
    records, passed_over = read_records(folder)
    if skipped is not None:
        skipped.extend(passed_over)
    lines = ["# Benchmarks", "",
             "Measured by `scripts/gpu_check.sh` (`python -m fdfo.bench`: the real phases of one epoch on random-init",
             "SD3.5-Medium shapes, fake text embeddings; see README \"Performance\"). Reward model: a stub",
             "(brightness) or a random-init CLIP ViT-H/14 of PickScore's shape through the real scorer, \"+ overlap\"",
             "with --reward.overlap-preprocessing (the reward column: the main thread's share). Seconds per pair",
             "per GPU; MFU against the dense bf16/fp16 peak of the GPU's spec sheet (H100/H200: 989 TFLOP/s).", ""]
    if not records:
        lines += ["Not yet measured on a GPU.", ""]
    else:
        env = records[0][1]["env"]
        lines += [f"- date: {env.get('date')}", f"- GPU: {env.get('gpu') or 'none (CPU)'} x {env.get('world_size')}",
                  f"- torch {env.get('torch')}, diffusers {env.get('diffusers')}, peft {env.get('peft')}, "
                  f"CUDA {env.get('cuda')}", f"- raw JSON: {folder}", "",
                  "| run | precision | compile | ckpt | pairs x T (sample batch) | reward model | sample | decode "
                  "| reward | exchange | train | total s/pair | MFU | peak GB | rollouts GB/rank "
                  "| activations GB (estimate) | options |", "|" + "---|" * 17]
        lines += ["| " + " | ".join(cells) + " |" for _, _, cells in records]
        lines += ["", "Per phase: seconds per pair, achieved TFLOP/s, MFU and peak memory (GB) of each phase.", "",
                  "| run | " + " | ".join(PHASES) + " |", "|" + "---|" * (len(PHASES) + 1)]
        lines += ["| " + " | ".join([name.removesuffix(".json")] + [phase_cell(r["phases"].get(k)) for k in PHASES])
                  + " |" for name, r, _ in records]
        lines.append("")
        for name, r, _ in records:
            if r.get("profile"):
                from fdfo.bench.profile import profile_markdown

                lines += [f"### Profile of {name.removesuffix('.json')}", ""] + profile_markdown(r["profile"])
    from fdfo.bench import report_probe

    lines += report_probe.probe_lines(folder) + report_probe.compile_lines(folder)
    lines += report_probe.environment_lines(folder)
    notes = folder / "notes.md"  # how the run was made (commands, calls), kept beside its JSON files
    if notes.exists():
        lines += [notes.read_text(encoding="utf-8").rstrip(), ""]
    status = folder / "status.txt"
    if status.exists():
        lines += ["## Check status", "", "```", status.read_text().rstrip(), "```", ""]
    return "\n".join(lines + report_probe.how_to_run_lines())

"""The per-call probe (python -m fdfo.bench.probe) and the compile probe (python -m fdfo.bench.compile_probe) on the
tiny model: the bit checks, the interleaving, the dispatched ops against the census, the JSON written after every
step (a run cut short keeps what it measured), the census files beside the GPU run, the compile probe's time
shares, and their sections of docs/benchmarks.md."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fdfo.bench import compile_probe, probe
from fdfo.bench import probe_calls as pc

ROOT = Path(__file__).resolve().parents[1]
CENSUS_DIR = ROOT / "docs" / "bench" / "census"


@pytest.fixture(scope="module")
def tiny_probe(tmp_path_factory):
    out = tmp_path_factory.mktemp("probe") / "probe.json"
    data = probe.main(["--tiny", "--variants", "levers-none,cuda-graphs,fused-rms-norm", "--repeats", "2",
                       "--out", str(out)])
    return data, json.loads(out.read_text())


def test_the_tiny_probe_checks_each_variant_against_the_default(tiny_probe):
    data, written = tiny_probe
    assert written == json.loads(json.dumps(data, default=str)) and data["done"] is True
    assert all(r["bit_identical"] for call, r in data["reference"].items() if call != "census")
    v = data["variants"]
    for call in ("sample_forward", "train_micro_batch"):  # the levers change no bit, sampling or training
        assert v["levers-none"][call]["verdict"] == "ok: bit-identical"
        assert v["levers-none"][call]["output"]["tensors"] == (1 if call == "sample_forward" else 31)
    # CUDA graphs: only the micro-batch, here its static-buffer path (no capture on a CPU), bit for bit
    assert "note" in v["cuda-graphs"]["sample_forward"] and v["cuda-graphs"]["graph_calls"] == ["static"]
    assert v["cuda-graphs"]["train_micro_batch"]["verdict"] == "ok: bit-identical"
    assert v["fused-rms-norm"]["sample_forward"]["verdict"].startswith("ok: within 0.00185 relative RMS")
    for entry in v.values():  # medians of the kept rounds, default first
        for call in ("sample_forward", "train_micro_batch"):
            for timing in entry[call].get("ms", []):
                assert timing["runs"] == 2 and timing["min_ms"] <= timing["median_ms"] <= timing["max_ms"]
    steps = [s["step"] for s in data["steps"]]
    assert steps[:2] == ["default: built", "default: repeatability and census"] and steps[-1] == "done"


def test_the_real_calls_dispatch_what_the_census_counts(tiny_probe):
    """A sampling forward on real CPU tensors under the emulated CUDA autocast dispatches exactly the kernel ops,
    casts and aten ops the census counts on fake tensors (the fused norm apart: on a CPU it runs its pure-torch
    reference, which the census counts as the GPU's one Triton kernel)."""
    data, _ = tiny_probe
    for name in ("levers-none",):
        entry = data["variants"][name]
        assert entry["sample_forward"]["dispatched"][1] == entry["census"]["sample_forward"]
    assert data["variants"]["levers-none"]["sample_forward"]["dispatched"][0] == data["reference"]["census"][
        "sample_forward"]
    fused = data["variants"]["fused-rms-norm"]
    assert fused["sample_forward"]["dispatched"][1]["kernel_ops"] > fused["census"]["sample_forward"]["kernel_ops"]


def test_interleaving_runs_a_b_a_b_and_keeps_the_rounds_after_the_warm_up():
    order = []
    calls = [lambda: order.append("A"), lambda: order.append("B")]
    resets = [lambda: order.append("a"), lambda: order.append("b")]
    times = pc.interleaved(calls, resets, 2, 3, torch.device("cpu"))
    assert "".join(order) == "aAbB" * 5 and [len(t) for t in times] == [3, 3]


def test_compare_is_bit_for_bit_and_its_relative_rms_is_by_hand():
    a = torch.tensor([3.0, 4.0, float("nan")])
    assert pc.compare([a], [a.clone()])["bit_identical"]  # the same NaN bits too
    assert not pc.compare([torch.tensor([0.0])], [torch.tensor([-0.0])])["bit_identical"]
    r = pc.compare([a], [torch.tensor([3.3, 4.4, 1.0])])
    assert not r["bit_identical"] and r["nonfinite"] == [1, 0]
    assert r["max_rel_rms"] == pytest.approx(0.1)  # |(0.3, 0.4)| / |(3, 4)| over the entries finite in both
    r = pc.compare([torch.tensor([3.0, 4.0])], [torch.tensor([3.3, float("inf")])])
    assert r["nonfinite"] == [0, 1] and r["max_rel_rms"] == pytest.approx(0.1)  # 0.3 / 3
    assert pc.compare([torch.zeros(2)], [torch.ones(2)])["max_rel_rms"] == math.inf


def test_a_probe_cut_short_keeps_what_it_measured(monkeypatch, tmp_path):
    build = pc.build_policy

    def failing(base, variant):
        if variant.name == "bf16":
            raise RuntimeError("out of memory, say")
        return build(base, variant)

    monkeypatch.setattr(pc, "build_policy", failing)
    out = tmp_path / "p.json"
    with pytest.raises(RuntimeError, match="out of memory"):
        probe.main(["--tiny", "--variants", "levers-none,bf16", "--repeats", "1", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["done"] is False and data["error"] == "bf16: RuntimeError: out of memory, say"
    assert data["variants"]["levers-none"]["train_micro_batch"]["verdict"] == "ok: bit-identical"
    assert [s["step"] for s in data["steps"][-2:]] == ["levers-none: census beside it", "bf16: stopped by RuntimeError"]


def test_bad_flags_are_one_line_before_anything_is_built(monkeypatch, tmp_path):
    monkeypatch.setattr(pc, "build_base", lambda *a: pytest.fail("built"))
    for flags, message in ((["--variants", "fast"], "--variants 'fast': give a comma-separated list of levers-none"),
                           (["--variants", "default"], "--variants 'default'"),
                           (["--warmup", "2"], "--warmup 2: CUDA graphs run 2 warm-up micro-batches"),
                           (["--repeats", "0"], "repeats >= 1"),
                           (["--census-dir", str(tmp_path / "none")], "--census-dir .*: no such folder"),
                           (["--out", str(tmp_path)], "--out .* is a folder")):
        with pytest.raises(ValueError, match=message):
            probe.main(["--tiny", *flags])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="at SD3.5-M's shapes needs a GPU .*: pass --tiny to rehearse on a CPU"):
        probe.main([])
    with pytest.raises(ValueError, match="at SD3.5-M's shapes needs a GPU .*: pass --tiny"):
        compile_probe.main(["--out-dir", str(tmp_path)])


def test_the_census_files_beside_the_gpu_run_count_each_variant():
    """docs/bench/census holds `python -m fdfo.bench --census` of each variant but CUDA graphs (the same kernels as
    the default), made with the variant's own flags; the probe reads them by name."""
    for variant in pc.VARIANTS.values():
        name = "default" if variant.cuda_graphs else variant.name
        record = json.loads((CENSUS_DIR / f"census-{name}.json").read_text())
        flags = variant.census_flags()
        assert record["precision"] == flags[1] and record["shape"]["model"] == "SD3.5-Medium"
        assert record["levers"] == (["base-dtype", "peft-cast", "lora-cache", "shared-cast"]
                                    if variant.levers == "all" else [])
        assert record["options"] == sorted(n for n in ("fused_rms_norm", "compute_dtype_modulation")
                                           if getattr(variant, n))
        assert record["emulation_check"]["same_sequence"]
        read = probe.census_for(variant, False, str(CENSUS_DIR))
        assert read["sample_forward"]["kernel_ops"] == record["sample_forward"]["kernel_ops"]
        assert read["train_micro_batch"]["cost_model_ms"] == record["cost_model"]["train_micro_batch"]["ms"]
    assert probe.census_for(pc.VARIANTS["default"], False, None) is None


@pytest.mark.slow
def test_the_default_census_file_is_todays_census():
    from fdfo.bench.census import census

    record = json.loads((CENSUS_DIR / "census-default.json").read_text())
    today = census("fp16")
    for call in ("sample_forward", "train_micro_batch"):
        assert today[call]["kernel_ops"] == record[call]["kernel_ops"], call


def test_the_compile_probe_shares_its_cap_and_skips_what_has_no_time(monkeypatch, tmp_path):
    import types

    clock, caps = [0.0], []

    def child(args, step, cap, out):  # a step that uses all of its time
        caps.append((step, round(cap)))
        clock[0] += cap
        return {"status": "ok"}

    monkeypatch.setattr(compile_probe, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    monkeypatch.setattr(compile_probe, "run_child", child)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the full shapes' plan, as on a GPU
    summary = compile_probe.main(["--cap", "90", "--out-dir", str(tmp_path)])
    # shares 2 : 2 : 4 : 1 of what is left; the warm start needs the whole step's compile-cache.bin
    assert caps == [("block-default", 20), ("block-max-autotune", 20), ("whole", 40)]
    assert summary["steps"]["whole-warm"]["status"] == "skipped (no compile-cache.bin from the whole step)"
    caps.clear()
    clock[0] = 0.0
    (tmp_path / "compile-cache.bin").write_bytes(b"x")
    summary = compile_probe.main(["--cap", "30", "--out-dir", str(tmp_path), "--steps", "whole,whole-warm"])
    assert caps == [("whole", 24)]
    assert summary["steps"]["whole-warm"]["status"] == "skipped (6 s left of the 30 s cap)"
    assert json.loads((tmp_path / compile_probe.SUMMARY).read_text()) == summary
    with pytest.raises(ValueError, match="--steps 'fast'"):
        compile_probe.main(["--steps", "fast", "--out-dir", str(tmp_path)])


def test_the_compile_probe_stops_a_child_by_its_process_group():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True,
                             env=dict(os.environ, PYTHONFAULTHANDLER="1"), stderr=subprocess.PIPE)
    time.sleep(1)
    compile_probe.stop(child)
    assert child.returncode == -signal.SIGABRT and b"Fatal Python error: Aborted" in child.stderr.read()


@pytest.mark.slow
def test_the_compile_probe_runs_its_steps_in_children(tmp_path):
    """Every step on the tiny model with a tracing backend (no code generation): each writes its JSON."""
    summary = compile_probe.main(["--tiny", "--backend", "eager", "--cap", "300", "--repeats", "2",
                                  "--out-dir", str(tmp_path)])
    for step in compile_probe.STEPS:
        r = summary["steps"][step]
        assert r["status"] == "ok" and r["done"], step
    block = summary["steps"]["block-default"]
    assert block["forward"]["output"]["bit_identical"] and block["forward_backward"]["output"]["bit_identical"]
    assert summary["steps"]["whole"]["sample_forward"]["output"]["bit_identical"]  # eager backend: the same ops
    assert summary["steps"]["whole"]["graphs"] >= 1 and summary["steps"]["whole-warm"]["warm_start_loaded"] is False


def test_the_report_shows_the_probes_and_the_plan(tiny_probe, tmp_path):
    from fdfo.bench import report_markdown

    data, _ = tiny_probe
    (tmp_path / "probe.json").write_text(json.dumps(data, default=str))
    (tmp_path / "env.part.json").write_text("{}")
    (tmp_path / "compile").mkdir()
    step = {"status": "ok", "compile_s": {"forward": 12.5, "forward_backward": 30.25},
            "forward": {"eager": {"median_ms": 2.0}, "compiled": {"median_ms": 1.25},
                        "output": {"max_rel_rms": 3e-4}}}
    (tmp_path / "compile" / "compile-probe.json").write_text(json.dumps(
        {"cap_s": 200, "backend": "inductor", "steps": {"block-default": step,
                                                        "whole": {"status": "TIMED OUT after 80 s"}}}))
    skipped = []
    text = report_markdown(tmp_path, skipped)
    assert skipped == []  # the check's own files are not bench records, and not listed as skipped either
    levers = data["variants"]["levers-none"]["sample_forward"]
    a, b = levers["ms"][0]["median_ms"], levers["ms"][1]["median_ms"]
    assert (f"| levers-none | sample_forward | {a:.2f} | {b:.2f} | {(b - a) / a:+.1%} | ok: bit-identical | "
            f"{levers['dispatched'][1]['kernel_ops']} | - | {levers['dispatched'][1]['kernel_ops']} | - |") in text
    assert ("| block-default | ok | forward 12.5, + backward 30.2 | forward 2.00 | forward 1.25 | "
            "forward 0.0003 rel. RMS |") in text
    assert "| whole | TIMED OUT after 80 s | - | - | - | - |" in text
    assert "    speed-probe 120" in text and "## How to run" in text

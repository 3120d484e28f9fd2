"""scripts/gpu_check.sh's parts (scripts/gpu_parts.py): a part's outcome in status.txt, its limit (every process it
started prints its stacks, then dies), the processes it leaves behind (killed and checked gone, in a session of
their own too, as torchrun's workers are), the budget, the selection of parts, the rerun list and the pack; and the
script's plan (its header) against the parts it runs."""

import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def load_parts():
    spec = importlib.util.spec_from_file_location("gpu_parts", ROOT / "scripts" / "gpu_parts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def parts(tmp_path, monkeypatch):
    module = load_parts()
    monkeypatch.setenv("GPU_CHECK_RESULTS", str(tmp_path / "res"))
    monkeypatch.setenv("GPU_CHECK_START", str(time.time()))
    monkeypatch.setenv("GPU_CHECK_BUDGET_S", "300")
    monkeypatch.setenv("GPU_CHECK_PACK", str(tmp_path / "out"))
    monkeypatch.delenv("GPU_CHECK_PARTS", raising=False)
    monkeypatch.setattr(module, "gpu_processes", lambda: [])  # no nvidia-smi here; tested below by hand
    return module


def status(tmp_path) -> list[str]:
    return (tmp_path / "res" / "status.txt").read_text().splitlines()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"  # a zombie has ended


# a part that starts a grandchild in a session of its own (as torchrun starts its workers), writes its pid and ends
LEAVES_A_WORKER = ("import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', 'import time; "
                   "time.sleep(300)'], start_new_session=True); open(sys.argv[1], 'w').write(str(p.pid))")


def test_a_part_that_ends_ok_has_its_line_its_log_and_its_record(parts, tmp_path):
    parts.run_part("hello", 30, [sys.executable, "-c", "print('hi')"])
    [line] = status(tmp_path)
    assert re.fullmatch(r"hello: ok \(\d+ s; load before [\d.]+ [\d.]+ [\d.]+\)", line), line
    assert (tmp_path / "res" / "hello.log").read_text() == "hi\n"
    record = json.loads((tmp_path / "res" / "hello.part.json").read_text())
    assert record["rc"] == 0 and record["left_running"] == [] and record["before"]["gpu_processes"] == []
    # the pack after the part: the results folder and the status, for a call cut short later
    with tarfile.open(tmp_path / "out" / "results.tar.gz") as tar:
        assert {"hello.log", "status.txt"} <= set(tar.getnames())
    assert (tmp_path / "out" / "status.txt").read_text() == f"{line}\n"


def test_a_worker_in_its_own_session_is_killed_after_the_part_and_named(parts, tmp_path):
    pid_file = tmp_path / "worker.pid"
    parts.run_part("leaves", 30, [sys.executable, "-c", LEAVES_A_WORKER, str(pid_file)])
    pid = int(pid_file.read_text())
    assert not alive(pid)
    [line] = status(tmp_path)
    assert line.startswith("leaves: ok (") and "1 of its processes were still running after it, killed" in line
    assert json.loads((tmp_path / "res" / "leaves.part.json").read_text())["left_running"] == [pid]


# the same, but the part waits until its worker runs (a signal before Python has started prints no stack), then hangs
HANGS_WITH_A_WORKER = ("import os, subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import sys, "
                       "time; open(sys.argv[1], \"w\"); time.sleep(300)', sys.argv[1] + '.ready'], "
                       "start_new_session=True); open(sys.argv[1], 'w').write(str(p.pid))\n"
                       "while not os.path.exists(sys.argv[1] + '.ready'): time.sleep(0.05)\n"
                       "time.sleep(300)")


def test_a_part_over_its_limit_prints_every_stack_and_leaves_nothing(parts, tmp_path):
    pid_file = tmp_path / "worker.pid"
    parts.run_part("hangs", 8, [sys.executable, "-c", HANGS_WITH_A_WORKER, str(pid_file)])
    assert (tmp_path / "worker.pid.ready").exists() and not alive(int(pid_file.read_text()))
    [line] = status(tmp_path)
    assert line.startswith("hangs: TIMED OUT after 8 s (the stacks at the time-out are at the end of hangs.log")
    log = (tmp_path / "res" / "hangs.log").read_text()
    assert log.count("Fatal Python error: Aborted") == 2  # the part's process and its worker, each its stack
    assert 'File "<string>", line 3 in <module>' in log and 'File "<string>", line 1 in <module>' in log


def test_a_failed_part_shows_the_end_of_its_log_and_the_next_part_runs(parts, tmp_path):
    parts.run_part("fails", 30, [sys.executable, "-c", "import sys; print('it went wrong'); sys.exit(3)"])
    parts.run_part("next", 30, [sys.executable, "-c", "pass"])
    lines = status(tmp_path)
    assert lines[0].startswith("fails: FAILED (exit 3 after ") and lines[1] == "    it went wrong"
    assert lines[2].startswith("next: ok")


def test_budget_selection_limit_and_gpu_notes(parts, tmp_path, monkeypatch):
    monkeypatch.setenv("GPU_CHECK_PARTS", "chosen")
    parts.run_part("other", 30, [sys.executable, "-c", "pass"])
    assert not (tmp_path / "res" / "status.txt").exists()  # not selected: no line at all
    monkeypatch.setenv("GPU_CHECK_BUDGET_S", "40")
    monkeypatch.setenv("GPU_CHECK_START", str(time.time() - 30))  # 10 s left
    parts.run_part("chosen", 30, [sys.executable, "-c", "pass"])
    assert status(tmp_path) == ["chosen: skipped (budget of 40 s spent)"]
    # @LIMIT@: the part's limit (the budget left) less the margin
    monkeypatch.setenv("GPU_CHECK_START", str(time.time()))
    monkeypatch.setenv("GPU_CHECK_BUDGET_S", "300")
    monkeypatch.setattr(parts, "gpu_processes", lambda: ["123, python, 500 MiB"])
    parts.run_part("chosen", 100, [sys.executable, "-c", "import sys; print(sys.argv[1])", "@LIMIT@"])
    assert (tmp_path / "res" / "chosen.log").read_text() == f"{100 - parts.MARGIN_S}\n"
    line = status(tmp_path)[-1]
    assert "another process on the GPU before it: 123, python, 500 MiB" in line
    assert "the GPU still had a process after it: 123, python, 500 MiB" in line


def test_rerun_lists_the_parts_that_were_not_ok(parts, tmp_path):
    text = ("# call 1 at 2026-12-10 10:00:00 UTC, commit abc, budget 450 s, parts: env pytest-gpu\n"
            "env: ok (3 s; load before 0.1 0.1 0.1)\n"
            "pytest-gpu: FAILED (exit 1 after 80 s; the end of pytest-gpu.log below)\n"
            "    FAILED tests/test_gpu.py::test_x - assert 1: ok\n"
            "train-random-sd35m: TIMED OUT after 110 s (the stacks ...)\n"
            "compile-probe: skipped (budget of 450 s spent)\n"
            "speed-probe: ok (100 s)\n")
    (tmp_path / "status.txt").write_text(text)
    assert parts.rerun(str(tmp_path / "status.txt")) == "pytest-gpu train-random-sd35m compile-probe"


def test_the_pack_leaves_out_the_largest_files_while_it_is_too_large(parts, tmp_path, monkeypatch):
    res = tmp_path / "res"
    res.mkdir()
    (res / "small.json").write_text("{}")
    (res / "big.bin").write_bytes(os.urandom(200_000))  # random: gzip cannot shrink it
    monkeypatch.setattr(parts, "PACK_LIMIT", 100_000)
    parts.pack()
    with tarfile.open(tmp_path / "out" / "results.tar.gz") as tar:
        names = set(tar.getnames())
    assert "small.json" in names and "big.bin" not in names
    assert (res / "left-out-of-the-pack.txt").read_text() == "big.bin (200000 bytes)\n"


def test_the_plan_in_the_header_is_what_the_script_runs():
    """Every part of the two calls has a `part NAME LIMIT` line, with the limit the header's plan gives it."""
    text = SCRIPT.read_text()
    header = [line[2:] for line in text.splitlines() if line.startswith("# ")]
    plan = {m.group(1): m.group(2) for line in header if (m := re.match(r"\s{4}([a-z0-9-]+) (\d+|rest)\s", line))}
    runs = dict(re.findall(r"^part ([a-z0-9-]+) (\d+) ", text, flags=re.M))
    calls = {n: re.search(rf'^CALL{n}="([^"]+)"', text, flags=re.M).group(1).split() for n in (1, 2)}
    for name in calls[1] + calls[2]:
        assert name in runs, name
        if name not in ("env", "report"):
            assert plan[name] in (runs[name], "rest"), name
    assert set(plan) | {"env", "report"} >= set(calls[1]) | set(calls[2])
    budgets = dict(re.findall(r"call (\d), budget (\d+)", "\n".join(header)))
    assert calls[1][0] == calls[2][0] == "env" and budgets == {"1": "420", "2": "180"}
    assert re.search(r'1\) : "\$\{GPU_CHECK_PARTS:=\$CALL1\}" "\$\{GPU_CHECK_BUDGET_S:=420\}"', text)
    assert re.search(r'2\) : "\$\{GPU_CHECK_PARTS:=\$CALL2\}" "\$\{GPU_CHECK_BUDGET_S:=180\}"', text)


def test_environment_names_the_machine(parts, tmp_path):
    record = parts.environment()
    assert record["torch"]["version"] and record["torch"]["cuda_available"] in (True, False)
    assert record["packages"]["diffusers"] and record["fqdn_lookup_s"] >= 0
    assert record["host"]["cpus"] == os.cpu_count()


@pytest.mark.slow
def test_cpu_dry_run_passes_every_part(tmp_path):
    """The whole script on a CPU at tiny shapes (a few minutes)."""
    env = dict(os.environ, GPU_CHECK_RESULTS=str(tmp_path / "res"), GPU_CHECK_BUDGET_S="900", PYTHON=sys.executable,
               TMPDIR=str(tmp_path))
    subprocess.run(["bash", str(SCRIPT), "--cpu-dry-run"], env=env, cwd=ROOT, timeout=1200, check=True,
                   capture_output=True)
    lines = [line for line in (tmp_path / "res" / "status.txt").read_text().splitlines()
             if not line.startswith(("#", " "))]
    assert len(lines) == 12 and all(": ok (" in line for line in lines), lines

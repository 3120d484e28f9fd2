"""The parts of scripts/gpu_check.sh: each run time-boxed, with the GPU's other processes and the host load recorded
before and after it, and every process it started gone before the next part (docs/benchmarks.md "How to run").

    python3 scripts/gpu_parts.py run NAME LIMIT_S -- COMMAND ...   # one part
    python3 scripts/gpu_parts.py rerun STATUS_FILE                 # the parts of a status.txt that were not ok
    python3 scripts/gpu_parts.py pack                              # results.tar.gz and status.txt into the pack
    python scripts/gpu_parts.py env                                # environment.json (imports torch)

Standard library only (it runs beside the GPU work, not inside it). Settings from the environment:
GPU_CHECK_RESULTS (the results folder, default ./bench-results), GPU_CHECK_START (when the check began, seconds
since the epoch) and GPU_CHECK_BUDGET_S (its total budget), GPU_CHECK_PARTS (a selection of part names),
GPU_CHECK_PACK (a folder, e.g. the device machine's $OUT, that gets results.tar.gz and status.txt after every part,
so that a call cut short still returns what it measured).

A part's processes carry GPU_CHECK_TAG=<part>-<pid> in their environment (children inherit it, torchrun's workers in
their own sessions too), so that they can be found by it: at the part's limit each gets SIGABRT (Python's fault
handler, on through PYTHONFAULTHANDLER=1, prints every thread's stack into the part's log), then SIGKILL; after the
part ends, whatever still runs with its tag is killed and waited for. An `@LIMIT@` argument becomes the part's limit
in seconds less a margin (for a command with a cap of its own). Results: <NAME>.log, <NAME>.part.json, one line in
status.txt: `NAME: ok|FAILED|TIMED OUT|skipped (...)`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

MIN_LEFT_S = 20  # a part with less of the budget left is skipped
STACK_WAIT_S = 8  # between SIGABRT (stacks) and SIGKILL
MARGIN_S = 15  # @LIMIT@: the part's limit less this
PACK_LIMIT = 15 * 2**20  # the device tool brings back files of up to 16 MiB


def results() -> Path:
    path = Path(os.environ.get("GPU_CHECK_RESULTS", "./bench-results"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def budget_left() -> float:
    start = float(os.environ.get("GPU_CHECK_START", time.time()))
    return float(os.environ.get("GPU_CHECK_BUDGET_S", "480")) - (time.time() - start)


def selected(name: str) -> bool:
    chosen = os.environ.get("GPU_CHECK_PARTS", "").split()
    return not chosen or name in chosen


def gpu_processes() -> list[str] | None:
    """The GPU's compute processes (`pid, name, memory`), or None without nvidia-smi."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,process_name,used_memory",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else None


def host_load() -> dict:
    """Load averages, and the busiest processes by CPU (ps)."""
    load = Path("/proc/loadavg").read_text().split() if Path("/proc/loadavg").exists() else []
    try:
        top = subprocess.run(["ps", "-eo", "pid,pcpu,rss,etimes,comm", "--sort=-pcpu"], capture_output=True,
                             text=True, timeout=10).stdout.splitlines()[1:6]
    except (OSError, subprocess.TimeoutExpired):
        top = []
    return {"loadavg": load[:3], "running": load[3] if len(load) > 3 else None, "cpus": os.cpu_count(),
            "top": [" ".join(line.split()) for line in top]}


def snapshot() -> dict:
    return {"time": time.strftime("%H:%M:%S"), "gpu_processes": gpu_processes(), "host": host_load()}


def tagged(tag: str) -> list[int]:
    """The processes whose environment holds GPU_CHECK_TAG=tag (this process's own children, found by their id)."""
    needle = f"GPU_CHECK_TAG={tag}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:  # gone, or not ours to read
            continue
    return found


def signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def abort_one_by_one(pids: list[int]) -> None:
    """SIGABRT to each process in turn, waiting (up to STACK_WAIT_S) until it is gone before the next, so that the
    stacks their fault handlers print into the one log do not interleave."""
    for pid in pids:
        signal_all([pid], signal.SIGABRT)
        deadline = time.monotonic() + STACK_WAIT_S
        while _running(pid) and time.monotonic() < deadline:
            time.sleep(0.05)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie has ended, its parent has not collected it yet


def reap(tag: str, child: subprocess.Popen | None = None) -> list[int]:
    """Kill what still runs with `tag` (SIGTERM, then SIGKILL) and wait until none is left; returns the pids found."""
    found = tagged(tag)
    if found:
        signal_all(found, signal.SIGTERM)
        deadline = time.monotonic() + 3
        while tagged(tag) and time.monotonic() < deadline:
            time.sleep(0.2)
        signal_all(tagged(tag), signal.SIGKILL)
        deadline = time.monotonic() + 10
        while tagged(tag) and time.monotonic() < deadline:
            time.sleep(0.2)
    if child is not None:
        child.poll()
    return found


def run_part(name: str, limit: float, command: list[str]) -> int:
    """One part (module docstring); appends its line to status.txt and returns 0 (a failed part does not stop the
    check)."""
    if not selected(name):
        return 0
    res, left = results(), budget_left()
    if left < MIN_LEFT_S:
        return finish(name, f"skipped (budget of {os.environ.get('GPU_CHECK_BUDGET_S', '480')} s spent)", {})
    limit = min(limit, left)
    command = [str(max(int(limit - MARGIN_S), 10)) if arg == "@LIMIT@" else arg for arg in command]
    tag = f"{name}-{os.getpid()}"
    record = {"command": command, "limit_s": round(limit), "before": snapshot()}
    start = time.monotonic()
    env = dict(os.environ, GPU_CHECK_TAG=tag, PYTHONFAULTHANDLER="1", PYTHONUNBUFFERED="1")
    with open(res / f"{name}.log", "w") as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = child.wait(timeout=limit)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            abort_one_by_one(tagged(tag))  # every Python process of the part prints its stacks
            child.poll()
            rc = None
    record["wall_s"] = round(time.monotonic() - start, 1)
    record["left_running"] = reap(tag, child)
    record["after"] = snapshot()
    record["rc"] = child.returncode if rc is None else rc
    return finish(name, outcome(name, record, timed_out), record)


def outcome(name: str, record: dict, timed_out: bool) -> str:
    """The status line's verdict and its notes: other processes on the GPU, processes the part left behind."""
    notes = []
    before = record["before"]["gpu_processes"]
    if before:
        notes.append(f"another process on the GPU before it: {'; '.join(before)}")
    if record["left_running"]:
        notes.append(f"{len(record['left_running'])} of its processes were still running after it, killed")
    after = record["after"]["gpu_processes"]
    if after:
        notes.append(f"the GPU still had a process after it: {'; '.join(after)}")
    load = record["before"]["host"]["loadavg"]
    extra = "".join(f"; {n}" for n in notes) + (f"; load before {' '.join(load)}" if load else "")
    if timed_out:
        return f"TIMED OUT after {record['limit_s']} s (the stacks at the time-out are at the end of {name}.log{extra})"
    if record["rc"] == 0:
        return f"ok ({record['wall_s']:.0f} s{extra})"
    return f"FAILED (exit {record['rc']} after {record['wall_s']:.0f} s{extra}; the end of {name}.log below)"


def finish(name: str, verdict: str, record: dict) -> int:
    res = results()
    line = f"{name}: {verdict}"
    if verdict.startswith("FAILED"):
        tail = (res / f"{name}.log").read_text(errors="replace").splitlines()[-5:]
        line += "".join(f"\n    {t[:300]}" for t in tail)
    with open(res / "status.txt", "a") as status:
        status.write(line + "\n")
    if record:
        (res / f"{name}.part.json").write_text(json.dumps(record, indent=1) + "\n")
    print(line, flush=True)
    pack()
    return 0


def pack() -> None:
    """results.tar.gz (the results folder; the largest files left out while it is over the limit) and status.txt
    into GPU_CHECK_PACK, each replaced whole."""
    target = os.environ.get("GPU_CHECK_PACK")
    if not target:
        return
    res, target = results(), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    files = sorted((p for p in res.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    while True:
        tmp = target / "results.tar.gz.tmp"
        with tarfile.open(tmp, "w:gz") as tar:
            for path in files:
                tar.add(path, arcname=str(path.relative_to(res)))
        if tmp.stat().st_size <= PACK_LIMIT or not files:
            break
        dropped = files.pop()
        with open(res / "left-out-of-the-pack.txt", "a") as note:
            note.write(f"{dropped.relative_to(res)} ({dropped.stat().st_size} bytes)\n")
    os.replace(tmp, target / "results.tar.gz")
    status = res / "status.txt"
    if status.exists():
        (target / "status.txt.tmp").write_text(status.read_text())
        os.replace(target / "status.txt.tmp", target / "status.txt")


def rerun(status_file: str) -> str:
    """The parts of a status.txt that did not end ok, space-separated (for GPU_CHECK_PARTS of a second call)."""
    names = []
    for line in Path(status_file).read_text().splitlines():
        if line[:1].isspace() or line.startswith("#") or ": " not in line:
            continue
        name, verdict = line.split(": ", 1)
        if not verdict.startswith("ok") and name not in names:
            names.append(name)
    return " ".join(names)


def environment() -> dict:
    """What the machine is: GPU (nvidia-smi), torch and CUDA, the packages, CPUs, memory, the host's load, the name
    lookup that torchrun makes (slow where no name server answers), the offline settings."""
    import importlib.metadata as md
    import platform
    import socket

    fields = ("name,memory.total,driver_version,pstate,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,"
              "power.draw,power.limit,persistence_mode,compute_mode")
    try:
        smi = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv"], capture_output=True, text=True,
                             timeout=20).stdout.strip().splitlines()
    except (OSError, subprocess.TimeoutExpired):
        smi = None
    start = time.monotonic()
    fqdn = socket.getfqdn(socket.gethostname())
    lookup_s = time.monotonic() - start
    packages = {}
    for name in ("torch", "diffusers", "transformers", "peft", "tyro", "wandb", "triton", "tokenizers",
                 "huggingface_hub", "safetensors", "pytest", "pytest-timeout", "numpy"):
        try:
            packages[name] = md.version(name)
        except md.PackageNotFoundError:
            packages[name] = None
    record = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "nvidia_smi": smi,
              "python": platform.python_version(), "packages": packages, "host": host_load(),
              "memory_kb": next((line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                                 if line.startswith("MemTotal")), None) if Path("/proc/meminfo").exists() else None,
              "hostname": socket.gethostname(), "fqdn": fqdn, "fqdn_lookup_s": round(lookup_s, 3),
              "gpu_processes": gpu_processes(),
              "variables": {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                                                           "TOKENIZERS_PARALLELISM", "OMP_NUM_THREADS",
                                                           "FDFO_TINY_CACHE", "PYTHONPATH", "WANDB_MODE")}}
    import torch

    record["torch"] = {"version": torch.__version__, "cuda": torch.version.cuda,
                       "cudnn": torch.backends.cudnn.version(), "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        record["torch"] |= {"device": props.name, "capability": f"{props.major}.{props.minor}",
                            "multiprocessors": props.multi_processor_count, "memory_bytes": props.total_memory}
    return record


def main(argv: list[str]) -> int:
    if len(argv) >= 4 and argv[0] == "run" and argv[3] == "--":
        return run_part(argv[1], float(argv[2]), argv[4:])
    if len(argv) == 2 and argv[0] == "rerun":
        print(rerun(argv[1]))
        return 0
    if argv == ["pack"]:
        pack()
        return 0
    if argv == ["env"]:  # a part of its own (it imports torch): environment.json, and a summary on stdout
        record = environment()
        (results() / "environment.json").write_text(json.dumps(record, indent=1) + "\n")
        print(json.dumps(record, indent=1))
        if os.environ.get("GPU_CHECK_DRY") == "0" and not record["torch"]["cuda_available"]:
            print("FAILED: torch sees no CUDA device on this GPU machine", file=sys.stderr)
            return 1
        return 0
    print(__doc__.split("\n\n")[1], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

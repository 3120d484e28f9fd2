"""Two gloo processes started by a test, without a launcher and without a TCP port to agree on: the ranks meet
through a file (torch.distributed's FileStore), so there is no race for a "free" port with other tests or programs on
the machine. The timeouts only guard against a hang and are generous: nothing a test checks depends on how long
anything takes, however loaded the machine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GROUP_TIMEOUT_S = 900  # a collective (or the rendezvous) waiting for a missing peer fails after this
WAIT_S = 1200  # the test's wait for both processes; above GROUP_TIMEOUT_S, so a stuck rank fails on its own first
LAUNCH_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID")


def join() -> None:
    """In a worker started by `run_pair`: join the two-process gloo group through the test's store file."""
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{os.environ['FDFO_TEST_STORE']}",
                            rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
                            timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S))


def run_pair(script: str, folder: Path) -> list[tuple[int, str, str]]:
    """Run `script` (a path under the repository) as ranks 0 and 1 of a gloo group that meets in `folder`; wait for
    both. Returns (exit status, stdout, stderr) per rank. Output goes to files, so no pipe can fill up and block."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    env |= {"PYTHONPATH": str(ROOT), "WORLD_SIZE": "2", "FDFO_TEST_STORE": str(folder / "store")}
    workers = []
    for rank in (0, 1):
        with open(folder / f"rank{rank}.out", "w") as out, open(folder / f"rank{rank}.err", "w") as err:
            workers.append(subprocess.Popen([sys.executable, script], cwd=ROOT, stdout=out, stderr=err, text=True,
                                            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}))
    try:
        for worker in workers:
            worker.wait(timeout=WAIT_S)
    finally:
        for worker in workers:  # only after a hang: the other rank must not outlive the test
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    return [(w.returncode, (folder / f"rank{r}.out").read_text(), (folder / f"rank{r}.err").read_text())
            for r, w in enumerate(workers)]

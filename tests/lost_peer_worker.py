"""Run as 2 gloo processes by tests/test_faults_processes.py (tests/gloo_pair.py), through the entry points' run_main:
rank 0 stops with a user error right after joining the group, while rank 1 waits for it in a barrier, as a rank of a
torchrun launch does when another rank refuses its settings before the first collective."""

from fdfo import distributed
from fdfo.cli import run_main
from tests.gloo_pair import join


def body(_) -> None:
    join()
    if distributed.get_rank() == 0:
        raise ValueError("rank 0 refuses its settings")
    distributed.barrier()


if __name__ == "__main__":
    run_main(body, None)

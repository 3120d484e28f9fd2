"""CPU threads of tiny runs: one, unless the user chose.

The smoke presets and any run on the built-in tiny model (`builtin:tiny-sd3`: train.py, generate.py, metrics.py),
the toy (`python -m fdfo.toy` and its tools), the tiny bench (`python -m fdfo.bench --tiny`) and the test suite compute
on tensors far too small for torch's intra-op threads to gain anything, while on a busy machine those threads spin
waiting for each other: a 4-epoch smoke run took 3.4x the CPU time with torch's default threads on 2 shared cores
(docs/performance.md#cpu-threads). These runs therefore use one thread unless OMP_NUM_THREADS is set; real runs keep
torch's default.
"""

from __future__ import annotations

import os


def single_thread_if_tiny(tiny: bool) -> bool:
    """Call once per process, as soon as the configuration says whether the run is tiny, before the work starts.

    On a tiny run with OMP_NUM_THREADS unset (or empty): torch computes on one thread from now on, and OMP_NUM_THREADS=1
    is set for the child processes it starts. Returns whether it changed anything (False: not tiny, or the user chose
    a number of threads with OMP_NUM_THREADS, which torch has already read)."""
    if not tiny or os.environ.get("OMP_NUM_THREADS", "").strip():
        return False
    import torch

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    return True

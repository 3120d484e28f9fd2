"""Each rank receives exactly the items it trains on (one all_to_all), not the whole epoch: 2 gloo processes."""

import os
import subprocess
import sys
from pathlib import Path

import torch

from tests import rollout_exchange_worker as worker

ROOT = Path(__file__).resolve().parents[1]


def test_each_rank_holds_only_its_own_items_equal_to_the_one_process_rows(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "tests/rollout_exchange_worker.py", str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one = worker.flat(worker.build(1))  # the same epoch built by one process: all 48 items
    num_items = 2 * worker.PAIRS * worker.STEPS
    assert len(one["items"]) == num_items
    samples = worker.epoch_samples(0, 1)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        # this rank's rows are exactly its share of each optimizer step (the j-th quarter of the global permutation)
        expected_items = torch.cat([one["items"][j * 12 + rank * 6: j * 12 + (rank + 1) * 6] for j in range(4)])
        assert torch.equal(got["items"], expected_items)
        assert len(got["states"]) == len(got["velocities"]) == num_items // 2
        # held per-sample / per-prompt rows: only those its items use
        assert int(got["held_dx"]) == len(torch.unique(expected_items // worker.STEPS)) < 2 * worker.PAIRS
        assert int(got["held_embeds"]) == len(torch.unique(expected_items // worker.STEPS // 2))
        # each row holds the values of its (sample, timestep) item, as gathered from both ranks' rollouts
        sample, k = expected_items // worker.STEPS, expected_items % worker.STEPS
        assert torch.equal(got["states"], samples.states[sample, k])
        assert torch.equal(got["velocities"], samples.velocities[sample, k])
        assert torch.equal(got["embeds"], samples.cond["embeds"][sample // 2])
        # and what it trains on equals the 1-process build's rows for the same items
        rows = torch.cat([torch.arange(j * 12 + rank * 6, j * 12 + (rank + 1) * 6) for j in range(4)])
        for key in ("states", "velocities", "sigma", "dx", "dR", "embeds"):
            assert torch.equal(got[key], one[key][rows]), key
        assert torch.equal(got["steps"], torch.arange(24).reshape(4, 6))

"""Two "nodes" on one machine: two torchrun launchers, one process each, meeting through a c10d rendezvous on the
loopback interface (the way scripts/slurm/train.sbatch starts a multi-node job). The trained adapter equals a
one-process run's within the invariance tolerance of tests/test_distributed.py."""

import json
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
# Pinned batches, as in tests/test_distributed.py: 1 and 2 processes batch the same samples and items together.
ARGS = ["--preset", "smoke", "--num-epochs", "1", "--total-pairs-per-epoch", "4", "--gradient-steps-per-epoch", "2",
        "--sample.num-solver-steps", "3", "--sample.batch-size", "2", "--train.batch-size", "2", "--save-freq", "1",
        "--image-log-freq", "0"]
TIMEOUT_S = 300


def _env():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        env.pop(name, None)  # nothing inherited from an outer launcher
    return env


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _adapter(run: Path):
    return load_file(run / "checkpoints/epoch-0000001/adapter_model.safetensors")


@pytest.mark.slow
def test_two_node_rendezvous_trains_like_one_process(tmp_path):
    port, rdzv_id = _free_port(), f"fdfo-test-{uuid.uuid4().hex[:8]}"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={rdzv_id}",
                "--local-addr=127.0.0.1", "--max-restarts=0", "train.py", *ARGS, "--run-dir", str(tmp_path / "two")]
    nodes = [subprocess.Popen(launcher, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    try:
        outputs = [node.communicate(timeout=TIMEOUT_S)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
                node.wait()
    for node, output in zip(nodes, outputs):
        assert node.returncode == 0, output[-3000:]
    geometry = json.loads((tmp_path / "two/config.json").read_text())["geometry"]
    assert (geometry["world_size"], geometry["pairs_per_gpu"]) == (2, 2)  # the two launchers formed one job

    single = subprocess.run([sys.executable, "train.py", *ARGS, "--run-dir", str(tmp_path / "one")], cwd=ROOT,
                            env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert single.returncode == 0, single.stderr[-3000:]
    a, b = _adapter(tmp_path / "one"), _adapter(tmp_path / "two")
    assert a.keys() == b.keys() and len(a) > 0
    moved = 0.0
    for key in a:
        # same tolerance and reason as tests/test_distributed.py: only the gradient summation order differs
        assert (a[key] - b[key]).norm() <= 1e-4 * a[key].norm(), key
        moved = max(moved, float(a[key].norm()))
    assert moved > 0  # the adapter trained (LoRA B starts at zero), so the comparison is not of two zero tensors

"""Run by tests/test_cuda_graphs.py on a GPU (a fresh process, so that CUBLAS_WORKSPACE_CONFIG applies): the tiny
model trained for one epoch in fp16 with the grad scaler, eagerly twice and with --train.cuda-graphs once; prints one
JSON line comparing the adapters and the logged records."""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from fdfo import cuda_graphs, phases, train_loop
from tests.test_train import read_log, tiny_config


def run(folder: Path, graphs: bool) -> tuple[dict, list]:
    cfg = tiny_config(folder, device="cuda")
    cfg.train.precision = "fp16"
    cfg.train.batch_size = 2  # 6 micro-batches per optimizer step
    cfg.train.cuda_graphs = graphs
    train_loop.train(cfg)
    adapter = load_file(folder / "checkpoints/epoch-0000001/adapter_model.safetensors")
    records = [r for r in read_log(folder) if "step" in r]
    return adapter, records


def main(tmp: Path) -> None:
    torch.use_deterministic_algorithms(True, warn_only=True)
    calls = []

    class Recorded(cuda_graphs.GraphedMicroBatch):
        def __call__(self, *args):
            out = super().__call__(*args)
            calls.append(self.calls[-1])
            return out

    phases.GraphedMicroBatch = Recorded
    eager_a, eager_b, graphed = run(tmp / "a", False), run(tmp / "b", False), run(tmp / "graphed", True)

    def same(x, y):
        return x[1] == y[1] and x[0].keys() == y[0].keys() and all(torch.equal(x[0][k], y[0][k]) for k in x[0])

    print(json.dumps(dict(calls=calls, eager_repeatable=same(eager_a, eager_b),
                          graphed_equals_eager=same(eager_a, graphed))))


if __name__ == "__main__":
    main(Path(sys.argv[1]))

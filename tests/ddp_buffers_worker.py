"""Run as 2 gloo processes by tests/test_numerics_authors.py (tests/gloo_pair.py): a module with a buffer, wrapped by
fdfo.distributed.wrap_ddp; each rank then sets its own buffer value, runs forward + backward, and prints one JSON line
with the buffer it used and its averaged gradient."""

import json

import torch

from fdfo import distributed
from tests.gloo_pair import join


class Scaled(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(2))
        self.register_buffer("scale", torch.ones(2))

    def forward(self, x):
        return (self.weight * self.scale * x).sum()


def main():
    join()
    device = distributed.init("cpu")  # the group is joined: the device only
    rank = distributed.get_rank()
    module = Scaled()
    ddp = distributed.wrap_ddp(module, device)
    with torch.no_grad():
        module.scale.fill_(rank + 1.0)  # ranks' buffers differ after wrapping (DDP synced them once, at wrapping)
    ddp(torch.ones(2)).backward()
    print(json.dumps({"rank": rank, "scale": module.scale.tolist(), "grad": module.weight.grad.tolist()}), flush=True)
    # both ranks past their last collective before the group goes: on a loaded machine gloo aborted one rank's exit
    # ("terminate called without an active exception") when the other tore the group down first
    torch.distributed.barrier()
    distributed.shutdown()


if __name__ == "__main__":
    main()

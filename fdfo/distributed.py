"""Every torch.distributed call of the project lives here.

`python train.py` runs as world size 1 without a process group; `torchrun` sets RANK / WORLD_SIZE / LOCAL_RANK and
`init()` joins the group: NCCL on CUDA, gloo on CPU, through the same code path.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import re
import sys
import warnings
from typing import Any, Iterator

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else int(os.environ.get("RANK", 0))


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else int(os.environ.get("WORLD_SIZE", 1))


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def init(device: str | None = None, timeout_s: float = 1800.0) -> torch.device:
    """Pick the device and, under torchrun, join the process group. Returns the device of this rank.

    timeout_s bounds how long a collective waits for a missing peer before failing instead of hanging.
    """
    if device is None:
        device = f"cuda:{get_local_rank()}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    launched = int(os.environ.get("WORLD_SIZE", 1)) > 1 or "TORCHELASTIC_RUN_ID" in os.environ  # torchrun sets both
    if launched and not is_distributed():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
        print0(f"process group: {backend}, world size {get_world_size()}")
    return dev


# What gloo and NCCL say when another process of the run went away: it stopped first (torchrun stops the others a moment
# later, and a rank still joining the group or in a collective may see the closed connection before that), or the
# network between them failed
PEER_GONE = ("closed by peer", "reset by peer", "broken pipe", "remote process exited")


def lost_peer(e: BaseException) -> str | None:
    """One line for the error a rank of a multi-process run gets when another process went away (gloo's
    "Connection closed by peer" while joining the group or in a collective, NCCL's remote error); None for any other
    error, which keeps its traceback."""
    text = str(e).splitlines()[0] if str(e) else ""
    lowered = text.lower()
    if (not isinstance(e, RuntimeError) or get_world_size() < 2 or not ("gloo" in lowered or "nccl" in lowered)
            or not any(k in lowered for k in PEER_GONE)):
        return None
    detail = re.sub(r"\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", text).split(" This is typically")[0].strip()
    return (f"rank {get_rank()} lost the connection to another process of this run ({detail}): another rank stopped "
            f"first (its own message says why), or the network between them failed")


def shutdown() -> None:
    if is_distributed():
        dist.destroy_process_group()


def print0(*args: Any, **kwargs: Any) -> None:
    if get_rank() == 0:
        print(*args, **kwargs, flush=True)


def warn0(message: str) -> None:
    """One `warning:` line on stderr, from rank 0 only."""
    if get_rank() == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `x` along dim 0, rank order: `[N, ...]` -> `[world * N, ...]`.

    Uses the flat output form, which gloo supports (the stacked form does not). All ranks must pass equal shapes.
    """
    if not is_distributed():
        return x
    x = x.contiguous()
    out = torch.empty((get_world_size() * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    # torch 2.13 renamed all_gather_into_tensor to all_gather_single; keep older torch working
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, x)
    return out


def round_robin(total: int, rank: int, world: int) -> range:
    """The items j of one rank when `total` items are dealt round-robin: j = rank, rank + world, ... (counts differ by
    at most one between ranks; a rank past the last item gets none). `unshard` restores the order after a gather."""
    return range(rank, total, world)


def unshard(gathered: torch.Tensor, total: int, world: int) -> torch.Tensor:
    """Rows in item order j from the concatenation of every rank's `round_robin` rows, each rank padded to
    ceil(total / world) rows: `[world * per, ...]` -> `[total, ...]`."""
    per = math.ceil(total / world)
    assert gathered.shape[0] == world * per, (gathered.shape, total, world)
    rows = [(j % world) * per + j // world for j in range(total)]  # item j is row j // world of rank j % world
    return gathered[rows]


def wrap_ddp(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`module` in DistributedDataParallel for training (gradients averaged over ranks), as the authors wrap it.

    broadcast_buffers=False: no buffer is trained, so there is nothing to keep in step. With the default True, DDP
    would send rank 0's buffers to every rank before each forward; SD3's positional-embedding table alone is
    147,456 x 1,536 values in SD3.5-M (about 450 MB in bf16). All LoRA parameters are in the graph (the last block's
    add_q_proj LoRA gets an exact zero gradient, tests/test_numerics.py), so no unused-parameter search either.
    """
    with warnings.catch_warnings():
        # torch 2.13 deprecates the flag for forward_sync_buffers, which would still sync buffers once at init and
        # does not exist in the older torch requirements.txt allows; the flag keeps one meaning across versions
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*is deprecated", category=FutureWarning)
        return torch.nn.parallel.DistributedDataParallel(
            module, device_ids=[device] if device.type == "cuda" else None, broadcast_buffers=False)


def all_reduce_mean_(x: torch.Tensor) -> torch.Tensor:
    """In-place mean over ranks."""
    if is_distributed():
        dist.all_reduce(x)
        x /= get_world_size()
    return x


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Send a picklable object from rank `src` to all ranks; returns it on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@contextlib.contextmanager
def rank0_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. to build or download into a shared cache), then the others."""
    if get_rank() != 0:
        barrier()
    try:
        yield
    finally:
        if get_rank() == 0:
            barrier()


def exchange_rows(x: torch.Tensor, wanted: list[torch.Tensor]) -> torch.Tensor:
    """Rows of the rank-ordered concatenation of every rank's `x` that this rank asks for, without gathering it all.

    x: this rank's rows `[n, ...]` (global rows rank * n ..); all ranks pass equal shapes.
    wanted: for every rank d, the global row ids d receives, in the order d wants them (the same list on all ranks).
    Returns `x_all[wanted[rank]]`. One all_to_all: each rank sends only the rows others want and holds only its own.
    """
    n, rank, world = x.shape[0], get_rank(), len(wanted)
    if not is_distributed():
        assert world == 1, "without a process group there is one rank"
        return x[wanted[0].to(x.device)]
    mine = wanted[rank]
    src = torch.div(mine, n, rounding_mode="floor")
    order = torch.argsort(src, stable=True)  # receive buffer: grouped by source rank, each group in `mine` order
    recv_counts = torch.bincount(src, minlength=world).tolist()
    send = [w[torch.div(w, n, rounding_mode="floor") == rank] - rank * n for w in wanted]
    send_counts = [len(s) for s in send]
    # NCCL moves CUDA tensors only: rows kept in host memory travel through the GPU, one rank's share at a time
    comm = x.device
    if comm.type == "cpu" and dist.get_backend() == "nccl":
        comm = torch.device("cuda", torch.cuda.current_device())
    send_rows = x[torch.cat(send).to(x.device)].to(comm).contiguous()
    received = torch.empty((len(mine), *x.shape[1:]), dtype=x.dtype, device=comm)
    dist.all_to_all_single(received, send_rows, recv_counts, send_counts)
    del send_rows
    out = torch.empty_like(received)
    out[order.to(comm)] = received
    return out.to(x.device)

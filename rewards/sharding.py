"""FSDP sharding of the VLM reward across ranks (docs/algorithm.md §7: "Sharded with FSDP across ranks to save
memory").

The model is loaded to CPU first; `fully_shard` then moves one block at a time to the device and keeps only this
rank's slice, so sharding never needs the whole model on the device. In forward, each block's parameters are
all-gathered just in time and freed afterwards. Every rank must therefore run the same number of forward passes:
`synced_chunk_count` makes the ranks agree, and ranks with fewer images run dummy chunks.

Process-group bookkeeping lives in `fdfo.distributed`; only the FSDP/device-mesh calls are here.
"""

from __future__ import annotations

import torch

from fdfo import distributed


def resolve_vlm_fsdp(vlm_fsdp: bool | None) -> bool:
    """`--reward.vlm-fsdp`: None means on when the world size is > 1; a single process has nothing to shard."""
    return vlm_fsdp is not False and distributed.get_world_size() > 1


def shard_vlm(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Shard a Qwen2.5-VL model (on CPU) across all ranks in place: each vision block, each decoder layer, the
    embedding and the LM head are their own FSDP units, the remaining small modules belong to the root unit.
    Tied embedding and LM head (Qwen2.5-VL-3B) share one weight, so they stay together in the root unit."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not distributed.is_distributed():
        raise RuntimeError("FSDP sharding of the VLM needs the process group: call fdfo.distributed.init() first.")
    mesh = init_device_mesh(device.type, (distributed.get_world_size(),))
    inner = model.model
    units = [*inner.visual.blocks, *inner.language_model.layers]
    if model.lm_head.weight is not inner.language_model.embed_tokens.weight:
        units += [inner.language_model.embed_tokens, model.lm_head]
    for unit in units:
        fully_shard(unit, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)  # the root too: it must not keep gathered params
    return model


def synced_chunk_count(num_chunks: int, device: torch.device) -> int:
    """The largest `num_chunks` over all ranks (collective: every rank must call it)."""
    counts = distributed.all_gather_cat(torch.tensor([num_chunks], device=device))
    return int(counts.max())

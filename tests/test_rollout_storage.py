"""Rollout storage: states in the dtype the network's first layer computes in, velocities in 16 bits only where that
is exact (tests/test_numerics_authors.py checks against the network that training on them changes nothing)."""

import types

import torch

from fdfo.config import batch_geometry, smoke_config
from fdfo.phases import _lossless, rollout_dtypes, rollout_gb_per_rank


def test_velocities_are_kept_in_16_bits_only_when_exact():
    gpu_policy = types.SimpleNamespace(dtype=torch.bfloat16, amp_dtype=torch.float16)  # the reference on CUDA
    state_dtype, candidates = rollout_dtypes(gpu_policy)
    # fp16 autocast rounds the authors' fp32 state to fp16 on entry: store exactly that, not bf16(x)
    assert state_dtype == torch.float16 and candidates == (torch.float16, torch.bfloat16)
    bf16_amp = types.SimpleNamespace(dtype=torch.bfloat16, amp_dtype=torch.bfloat16)
    assert rollout_dtypes(bf16_amp) == (torch.bfloat16, (torch.bfloat16, torch.bfloat16))
    assert rollout_dtypes(types.SimpleNamespace(dtype=torch.bfloat16, amp_dtype=None))[0] == torch.bfloat16
    g = torch.Generator().manual_seed(0)
    v16 = torch.randn(4, 16, 8, 8, generator=g).half().float()  # an fp16 network output cast to float32
    stored = _lossless(v16, candidates)
    assert stored.dtype == torch.float16 and torch.equal(stored.float(), v16)
    vb16 = (torch.randn(4, 16, 8, 8, generator=g) * 1e6).bfloat16().float()  # out of fp16's range: bf16 is exact
    assert _lossless(vb16, candidates).dtype == torch.bfloat16
    # CFG combined in float32 (no autocast) is not exact in 16 bits (under autocast it is computed in fp16: exact)
    cfg_v = v16 + 4.5 * (torch.randn(4, 16, 8, 8, generator=g).half().float() - v16)
    assert _lossless(cfg_v, candidates).dtype == torch.float32 and torch.equal(_lossless(cfg_v, candidates), cfg_v)
    # CPU: the model is fp32, nothing to compact
    assert rollout_dtypes(types.SimpleNamespace(dtype=torch.float32, amp_dtype=None)) == (torch.float32, ())


def test_rollout_memory_formula_at_paper_scale():
    cfg = smoke_config()
    cfg.total_pairs_per_epoch, cfg.gradient_steps_per_epoch = 432, 4
    latent = (16, 64, 64)
    one, eight = batch_geometry(cfg, 1), batch_geometry(cfg, 8)
    # before: fp32 states + velocities of the whole epoch, 864 samples x 40 steps x 65,536 x 8 bytes = 18.1 GB
    assert rollout_gb_per_rank(one, 40, latent, 4, 4) == 864 * 40 * 65536 * 8 / 1e9
    assert round(rollout_gb_per_rank(one, 40, latent, 4, 4), 1) == 18.1
    # now: 2 + 2 bytes and only this rank's 54 pairs of 8 GPUs: 108 x 40 x 65,536 x 4 bytes = 1.13 GB
    assert eight.pairs_per_gpu == 54
    assert round(rollout_gb_per_rank(eight, 40, latent, 2, 2), 2) == 1.13

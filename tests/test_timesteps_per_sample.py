"""--train.timesteps-per-sample K: K = T is the default run exactly; K < T stores and trains only the K drawn
timesteps of each trajectory, the same ones whatever the batching."""

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from fdfo import train_loop
from fdfo.bench import StubReward
from fdfo.config import batch_geometry
from fdfo.models.sd3 import SD3Policy
from fdfo.phases import build_training_set, kept_timesteps, sample_phase, timesteps_per_sample
from tests.test_train import tiny_config


def _with_k(cfg, k):
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, timesteps_per_sample=k))


def test_k_equal_to_t_is_the_default_run(tmp_path):
    train_loop.train(tiny_config(tmp_path / "default"))
    train_loop.train(_with_k(tiny_config(tmp_path / "k3"), 3))  # tiny_config: T = 3 solver steps
    a = load_file(tmp_path / "default/checkpoints/epoch-0000001/adapter_model.safetensors")
    b = load_file(tmp_path / "k3/checkpoints/epoch-0000001/adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_k_below_t_stores_and_trains_only_the_drawn_timesteps(tmp_path):
    cfg = tiny_config(tmp_path)
    geom = batch_geometry(cfg, 1)
    torch.manual_seed(0)
    policy = SD3Policy(cfg.pretrained_model, torch.device("cpu"), cfg.lora_rank, cfg.lora_alpha)
    prompts = ["a red apple", "a blue boat", "a cat", "a dog"]
    full = sample_phase(policy, StubReward(), cfg, geom, 0, prompts, 0)
    cfg2 = _with_k(cfg, 2)
    part = sample_phase(policy, StubReward(), cfg2, geom, 0, prompts, 0)
    kept = torch.cat([kept_timesteps(cfg2, 0, i) for i in range(4)])  # [8 samples, 2]
    assert torch.equal(part.timesteps, kept) and (kept[:, 1] > kept[:, 0]).all()
    assert len({tuple(row.tolist()) for row in kept}) > 1  # drawn per sample, not one set for all
    assert part.states.shape[:2] == (8, 2)  # only K = 2 of the T = 3 states are stored
    rows = torch.arange(8)[:, None]
    assert torch.equal(part.states, full.states[rows, kept])
    assert torch.equal(part.velocities, full.velocities[rows, kept])
    data = build_training_set(part, cfg2, geom, 0)
    assert len(data.items) == 8 * 2  # items: sample * K + j
    sample, j = data.items // 2, data.items % 2
    assert torch.equal(data.timestep, kept[sample, j])
    assert torch.equal(data.states, full.states[sample, kept[sample, j]])


def test_k_out_of_range_is_a_user_error():
    cfg = _with_k(tiny_config("unused"), 4)
    with pytest.raises(ValueError, match="--train.timesteps-per-sample 4 must be between 1 and "
                                         "--sample.num-solver-steps 3"):
        timesteps_per_sample(cfg)

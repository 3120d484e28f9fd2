"""Run under torchrun (gloo) by tests/test_rollout_exchange.py: each rank builds its share of one fake epoch, hands it
to build_training_set and saves what it received. Also importable for the 1-process reference."""

import sys

import torch

from fdfo import distributed
from fdfo.config import batch_geometry, smoke_config
from fdfo.phases import EpochSamples, build_training_set

PAIRS, STEPS, EPOCH = 8, 3, 5


def config():
    cfg = smoke_config()
    cfg.total_pairs_per_epoch, cfg.gradient_steps_per_epoch = PAIRS, 4
    return cfg


def epoch_samples(rank: int, world: int) -> EpochSamples:
    """Rank `rank`'s slice of one fixed epoch of all PAIRS pairs (distinct values in every row)."""
    g = torch.Generator().manual_seed(0)
    n = 2 * PAIRS
    full = dict(states=torch.randn(n, STEPS, 2, 2, 2, generator=g),
                velocities=torch.randn(n, STEPS, 2, 2, 2, generator=g),
                final=torch.randn(n, 2, 2, 2, generator=g), reward=torch.randn(n, generator=g),
                embeds=torch.randn(PAIRS, 3, generator=g))
    s = slice(rank * n // world, (rank + 1) * n // world)
    p = slice(rank * PAIRS // world, (rank + 1) * PAIRS // world)
    return EpochSamples(states=full["states"][s].clone(), velocities=full["velocities"][s].clone(),
                        sigmas=torch.linspace(1, 0, STEPS + 1)[:-1], final=full["final"][s],
                        rewards={"reward": full["reward"][s]}, cond={"embeds": full["embeds"][p]},
                        prompts=[f"p{i}" for i in range(PAIRS)][p], preview=torch.zeros(0))


def build(world: int):
    cfg = config()
    samples = epoch_samples(distributed.get_rank(), world)
    data = build_training_set(samples, cfg, batch_geometry(cfg, world), EPOCH)
    assert samples.states is None and samples.velocities is None
    return data


def flat(data) -> dict[str, torch.Tensor]:
    """What each trained row sees: (item, state, velocity, sigma, dx, dR, cond), plus the held tensors' sizes."""
    return dict(items=data.items, states=data.states, velocities=data.velocities,
                sigma=data.sigmas[data.timestep], dx=data.dx[data.sample], dR=data.dR[data.sample],
                embeds=data.cond["embeds"][data.prompt], held_dx=torch.tensor(len(data.dx)),
                held_embeds=torch.tensor(len(data.cond["embeds"])), steps=torch.stack(data.steps))


if __name__ == "__main__":
    distributed.init("cpu")
    torch.save(flat(build(distributed.get_world_size())), f"{sys.argv[1]}/rank{distributed.get_rank()}.pt")
    distributed.shutdown()

"""One toy run: train one method for a budget of reward evaluations, evaluating reward and diversity along the way,
and optionally measure how well its update direction matches the true gradient of the expected reward."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch

from fdfo.outputs import check_output_path, save_figure, write_text
from fdfo.toy import methods
from fdfo.toy.checks import check, check_duration, finite_or_none, strict_json
from fdfo.toy.flows import REWARDS, ResidualNet, bump_reward, make_problem, model_velocity

Algorithm = Literal["fdfo", "flow_grpo", "diffusion_nft", "backprop"]


@dataclass
class ToyConfig:
    algorithm: Algorithm = "fdfo"
    """Training method; every method gets the same number of reward evaluations."""
    dim: int = 2
    """Dimension d of the data (2 .. thousands)."""
    prompts: int = 1
    """Number of prompts (each its own Gaussian mixture and target)."""
    modes: int = 4
    """Mixture modes per prompt."""
    mode_std: float = 0.1
    """Standard deviation of every mode."""
    reward: Literal["smooth", "bump", "quantised"] = "smooth"
    """smooth: -mean((x - target)^2); bump: Gaussian bump; quantised: the bump rounded to 10 levels (black box)."""
    steps: int = 10
    """Sampler steps T (linear sigmas from 1 to 0), in training and evaluation."""
    evaluations: int = 4096
    """Training budget in reward evaluations."""
    samples_per_epoch: int = 64
    """Rollouts (= reward evaluations) per epoch."""
    grad_steps: int = 4
    """Optimizer steps per epoch."""
    lr: float = 1e-3
    """Adam learning rate."""
    clip: float = 0.03
    """Trust region: SPO clip range (fdfo) or PPO clip range (flow_grpo)."""
    churn: float = 0.0025
    """FDFO's churn gamma (prior churn and every step but the last)."""
    trust_region: Literal["separation", "velocity"] = "separation"
    """FDFO's SPO trust region. separation: the published ratio, whose edge |rho - 1| = clip moves the velocity by about
    clip * rms(delta) / 2; velocity (opt-in): the log-ratio scaled so the edge is a velocity change of about clip (rms
    per element) along the FD direction (docs/toy.md, "The trust-region scale")."""
    kl: float = 0.01
    """Flow-GRPO's KL weight beta."""
    nft_beta: float = 1.0
    """DiffusionNFT's beta."""
    group: int = 8
    """Samples per prompt for the group-relative baselines (flow_grpo, diffusion_nft)."""
    hidden: int = 128
    """Width of the residual network."""
    seed: int = 0
    """Seed of the problem instance, the network and all sampling."""
    eval_per_prompt: int = 32
    """Evaluation samples per prompt (fixed noise, deterministic Euler)."""
    eval_every: int = 4
    """Evaluate every this many epochs."""
    cosine_batches: int = 0
    """If > 0: measure the update direction at initialisation over this many batches of samples_per_epoch (before
    training, from the run's random stream, so training then sees other noise than without it)."""
    true_grad_samples: int = 8192
    """Samples for the reference gradient of the expected reward (backprop through the Euler sampler)."""
    out: str = ""
    """Folder for result.json and curves.png (nothing is written when empty)."""


def make_context(cfg: ToyConfig) -> methods.Context:
    problem = make_problem(cfg.dim, cfg.prompts, cfg.modes, cfg.mode_std, cfg.seed)
    hyper = methods.Hyper(lr=cfg.lr, clip=cfg.clip, churn=cfg.churn, kl=cfg.kl, nft_beta=cfg.nft_beta, group=cfg.group,
                          trust_region=cfg.trust_region)
    with torch.random.fork_rng():  # seed the network's initialisation without touching the caller's RNG
        torch.manual_seed(cfg.seed)
        net = ResidualNet(cfg.dim, cfg.prompts, cfg.hidden)
    ctx = methods.Context(problem=problem, net=net, reward=REWARDS[cfg.reward],
                          sigmas=torch.linspace(1, 0, cfg.steps + 1), hyper=hyper,
                          generator=torch.Generator().manual_seed(1000 + cfg.seed))
    methods.setup(ctx, cfg.algorithm)
    return ctx


@torch.no_grad()
def evaluate(ctx: methods.Context, per_prompt: int, reward: str) -> dict[str, float]:
    """Deterministic Euler samples from fixed noise: mean reward and diversity, averaged over prompts.

    modes: modes holding >= 10% of a prompt's samples; spread: RMS per-element distance to the nearest mode centre
    (the base flow gives about mode_std); pairwise: RMS per-element distance between two samples of one prompt."""
    problem = ctx.problem
    g = torch.Generator().manual_seed(12345)
    prompt = torch.arange(problem.num_prompts).repeat_interleave(per_prompt)
    x = torch.randn(len(prompt), problem.dim, generator=g)
    net = methods.evaluated_net(ctx)
    for k in range(len(ctx.sigmas) - 1):
        x = x + (ctx.sigmas[k + 1] - ctx.sigmas[k]) * model_velocity(problem, net, x, ctx.sigmas[k].expand(len(x)),
                                                                     prompt)
    rewards = REWARDS[reward](problem, x, prompt)
    xs = x.reshape(problem.num_prompts, per_prompt, problem.dim)
    dist = torch.cdist(xs, problem.means).square() / problem.dim  # [P, n, K]
    nearest, which = dist.min(dim=2)
    counts = torch.nn.functional.one_hot(which, problem.means.shape[1]).sum(1).float()  # [P, K]
    pair = torch.cdist(xs, xs).square() / problem.dim
    off_diagonal = pair.sum((1, 2)) / (per_prompt * (per_prompt - 1))
    return {
        "reward": rewards.mean().item(),
        "modes": (counts >= 0.1 * per_prompt).float().sum(1).mean().item(),
        "spread": nearest.mean().sqrt().item(),
        "pairwise": off_diagonal.mean().sqrt().item(),
    }


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a, b, dim=0).item()


def true_gradient(ctx: methods.Context, samples: int, reward: str, chunk: int = 2048) -> torch.Tensor:
    """Ascent direction grad_theta E[r(x0)] through the deterministic Euler sampler, for a differentiable reward
    (the quantised reward uses its underlying bump). Flattened over trainable parameters."""
    fn = bump_reward if reward == "quantised" else REWARDS[reward]
    params = [p for p in ctx.net.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(777)
    total = [torch.zeros_like(p) for p in params]
    for start in range(0, samples, chunk):
        n = min(chunk, samples - start)
        prompt = torch.randint(ctx.problem.num_prompts, (n,), generator=g)
        x0 = methods.euler_with_grad(ctx.problem, ctx.net, torch.randn(n, ctx.problem.dim, generator=g), prompt,
                                     ctx.sigmas)
        grads = torch.autograd.grad(fn(ctx.problem, x0, prompt).sum() / samples, params, allow_unused=True)
        total = [t + (gr if gr is not None else 0) for t, gr in zip(total, grads)]
    return torch.cat([t.flatten() for t in total])


def direction_cosines(ctx: methods.Context, cfg: ToyConfig) -> dict[str, float]:
    """At the current parameters: cosine between the true gradient and (a) the mean of the method's update over
    `cosine_batches` batches (its expected direction), (b) single batches of equal cost (mean and spread)."""
    truth = true_gradient(ctx, cfg.true_grad_samples, cfg.reward)
    grads = torch.stack([methods.loss_gradient(ctx, cfg.algorithm, cfg.samples_per_epoch)
                         for _ in range(cfg.cosine_batches)])
    per_batch = torch.tensor([_cos(g, truth) for g in grads])
    return {"expected": _cos(grads.mean(0), truth), "per_batch_mean": per_batch.mean().item(),
            "per_batch_std": per_batch.std().item() if len(per_batch) > 1 else 0.0}


def run(cfg: ToyConfig) -> dict:
    """Train and evaluate one method; returns (and writes to cfg.out, if set) a JSON-ready dict without non-finite
    numbers. A run whose evaluated reward becomes NaN or infinite stops there: its last curve point has null metrics
    and `result["diverged"]` is the number of reward evaluations spent (None for a run that did not diverge)."""
    check(cfg)
    if cfg.out:
        check_output_path("--out", cfg.out, folder=True)
    ctx = make_context(cfg)
    result: dict = {"config": asdict(cfg)}
    if cfg.cosine_batches:
        result["cosine"] = direction_cosines(ctx, cfg)
    optimizer = torch.optim.Adam([p for p in ctx.net.parameters() if p.requires_grad], lr=cfg.lr)
    epochs = math.ceil(cfg.evaluations / cfg.samples_per_epoch)
    curve = [{"evaluations": 0, **evaluate(ctx, cfg.eval_per_prompt, cfg.reward)}]
    diverged, start = None, time.perf_counter()
    for epoch in range(epochs):
        methods.train_epoch(ctx, cfg.algorithm, optimizer, cfg.samples_per_epoch, cfg.grad_steps, epoch)
        if epoch == 0:  # an absurd budget is refused here, not left running for ever
            check_duration(cfg, time.perf_counter() - start, epochs)
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == epochs:
            spent = (epoch + 1) * cfg.samples_per_epoch
            metrics = evaluate(ctx, cfg.eval_per_prompt, cfg.reward)
            if not math.isfinite(metrics["reward"]):  # keep the record, stop spending; the metrics mean nothing
                curve.append({"evaluations": spent, **{key: None for key in metrics}})
                diverged = spent
                break
            curve.append({"evaluations": spent, **metrics})
    result["curve"] = curve
    result["final"] = curve[-1]
    result["diverged"] = diverged
    result = finite_or_none(result)
    if cfg.out:
        write(result, Path(cfg.out))
    return result


def write(result: dict, out: Path) -> None:
    """result.json (strict JSON) and curves.png, each written whole under a temporary name and renamed."""
    write_text(out / "result.json", strict_json(result))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = result["curve"]
    evals = [c["evaluations"] for c in curve]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, key in zip(axes, ("reward", "modes", "pairwise")):
        ax.plot(evals, [math.nan if c[key] is None else c[key] for c in curve])
        ax.set_xlabel("reward evaluations")
        ax.set_title(key)
    title = result["config"]["algorithm"]
    fig.suptitle(title if result.get("diverged") is None else f"{title}: diverged at {result['diverged']} evaluations")
    fig.tight_layout()
    try:
        save_figure(fig, out / "curves.png", dpi=100)
    finally:
        plt.close(fig)

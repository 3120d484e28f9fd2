"""The evaluation protocol of ALGORITHM.md §8 (metrics.py): which prompts, which seeds, which rank does what, and the
aggregation into one table.

* The prompt set is shuffled by a permutation seeded with `prompt_seed` and its first `num_prompts` are kept; they are
  numbered j = 0 .. num_prompts - 1 in that order.
* Image r of prompt j is generated from seed `image_seed + j * num_repeats + r` (each image has its own generator).
* Rank k of W takes prompts j = k, k + W, k + 2W, ...; all repeats of a prompt stay on one rank (diversity needs
  them together). Scores are all-gathered and put back in j order.
Images therefore depend on (checkpoint, prompt, seed) only, not on the number of GPUs or the batch size, and the
means are over the same images whatever the launch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fdfo import distributed
from fdfo.checkpoints import write_json_atomic
from fdfo.diversity import INSTALL_HINT, DreamSimEmbedder, dreamsim_available, mean_pairwise_sq_distance
from fdfo.prompts import load_prompt_set
from fdfo.runlog import to_pil
from rewards import EVAL_METRICS, RewardConfig, build_metrics

DIVERSITY = "dreamsim_diversity"
METRICS = (*EVAL_METRICS, DIVERSITY)


@dataclass
class EvalConfig:
    checkpoint: str | None = None
    """LoRA to evaluate: one of our run checkpoints (runs/.../checkpoints/epoch-XXXXXXX), a PEFT folder, a \
https://huggingface.co/<org>/<repo>/tree/main/<folder> URL or hf:<org>/<repo>/<subfolder>; omit for the base model."""
    prompt_set: str = "hpdv2"
    """Prompts: pickscore_train, hpdv2 (see `python -m fdfo.prompts download`), or the path of a text file."""
    num_prompts: int | None = None
    """Prompts kept after the seeded shuffle; default: the whole set."""
    num_repeats: int = 1
    """Images per prompt, each with its own seed (dreamsim_diversity needs >= 2)."""
    metrics: tuple[str, ...] = ("pickscore", "hpsv2", "clip_h14", "clip_l14")
    """Metrics to compute: pickscore, hpsv2, clip_h14, clip_l14, vlm_alignment, vlm_quality, vlm_photo, \
dreamsim_diversity."""
    pretrained_model: str | None = None
    """Hugging Face id or local folder of the SD3 pipeline the LoRA belongs to; default: the one recorded in our run \
checkpoints, else stabilityai/stable-diffusion-3.5-medium."""
    guidance_scale: float | None = None
    """CFG scale; default: the one the checkpoint was trained with (1.0 for the base model)."""
    num_steps: int = 40
    """Euler steps per image."""
    resolution: int = 512
    """Image height and width in pixels (a multiple of 16)."""
    batch_size: int = 8
    """Images generated (and scored) together on each GPU; does not change the images."""
    seed: int | None = None
    """Sets both --image-seed and --prompt-seed."""
    image_seed: int = 0
    """Image r of prompt j uses seed image_seed + j * num_repeats + r."""
    prompt_seed: int = 0
    """Seed of the prompt shuffle."""
    out: str | None = None
    """Write the results (metric means, their spread, the config, the elapsed time) to this JSON file."""
    save_images: str | None = None
    """Keep the images as PNG in this folder, with index.jsonl (file, prompt, seed and scores of each image)."""
    dreamsim_cache: str = "~/.cache/dreamsim"
    """Folder for the DreamSim weights (downloaded on first use)."""
    device: str | None = None
    """Torch device; default cuda:<local rank> when CUDA is available, else cpu."""
    reward: RewardConfig = field(default_factory=RewardConfig)


# ---------------------------------------------------------------------------------------------------------------------
# The protocol as pure functions


def select_prompts(num_available: int, num_prompts: int, prompt_seed: int) -> list[int]:
    """Indices into the prompt set of prompts j = 0 .. num_prompts - 1: the first entries of a permutation of the
    whole set seeded by `prompt_seed` (so a smaller `num_prompts` keeps a prefix of a larger one)."""
    if not 1 <= num_prompts <= num_available:
        raise ValueError(f"--num-prompts must be between 1 and the {num_available:,} prompts of the set, "
                         f"got {num_prompts:,}.")
    order = torch.randperm(num_available, generator=torch.Generator().manual_seed(prompt_seed))
    return order[:num_prompts].tolist()


def image_seed(base: int, prompt: int, num_repeats: int, repeat: int) -> int:
    """ALGORITHM.md §8: the seed of repeat r of prompt j is `image_seed + j * num_repeats + r`."""
    return base + prompt * num_repeats + repeat


def rank_prompts(num_prompts: int, rank: int, world: int) -> range:
    """Prompts j of one rank: j = rank, rank + world, ... (counts differ by at most one between ranks)."""
    return range(rank, num_prompts, world)


def unshard(gathered: torch.Tensor, num_prompts: int, world: int) -> torch.Tensor:
    """Per-prompt rows in j order from the concatenation of every rank's rows, each rank padded to
    ceil(num_prompts / world) rows: `[world * per, ...]` -> `[num_prompts, ...]`."""
    per = math.ceil(num_prompts / world)
    assert gathered.shape[0] == world * per, (gathered.shape, num_prompts, world)
    rows = [(j % world) * per + j // world for j in range(num_prompts)]
    return gathered[rows]


def check_config(cfg: EvalConfig) -> tuple[list[str], bool]:
    """User errors before anything loads. Returns the reward-model metrics and whether diversity is asked for."""
    metrics = list(cfg.metrics)
    unknown = [name for name in metrics if name not in METRICS]
    if unknown or not metrics:
        raise ValueError(f"unknown metric(s) {', '.join(unknown) or '(none given)'}; --metrics takes one or more of "
                         f"{', '.join(METRICS)}.")
    if len(set(metrics)) != len(metrics):
        raise ValueError(f"--metrics names a metric twice: {' '.join(metrics)}.")
    if cfg.num_repeats < 1:
        raise ValueError(f"--num-repeats must be >= 1, got {cfg.num_repeats}.")
    if DIVERSITY in metrics:
        if cfg.num_repeats < 2:
            raise ValueError(f"{DIVERSITY} compares the images of a prompt with each other: it needs --num-repeats "
                             f">= 2 (the paper uses 4), got {cfg.num_repeats}.")
        if not dreamsim_available():
            raise ValueError(INSTALL_HINT)
    if cfg.num_prompts is not None and cfg.num_prompts < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {cfg.num_prompts}.")
    if cfg.batch_size < 1 or cfg.num_steps < 1:
        raise ValueError(f"--batch-size and --num-steps must be >= 1, got {cfg.batch_size} and {cfg.num_steps}.")
    if cfg.resolution < 16 or cfg.resolution % 16:
        raise ValueError(f"--resolution must be a positive multiple of 16, got {cfg.resolution}.")
    return [name for name in metrics if name != DIVERSITY], DIVERSITY in metrics


# ---------------------------------------------------------------------------------------------------------------------
# Running it


@dataclass
class Plan:
    prompts: list[str]  # prompt j of the protocol
    set_indices: list[int]  # its position among the set's prompts
    num_repeats: int
    image_seed: int


def make_plan(cfg: EvalConfig) -> Plan:
    """The prompts j = 0 .. num_prompts - 1 and the image seed base, from the set and the two seeds."""
    base_seed, prompt_seed = (cfg.seed, cfg.seed) if cfg.seed is not None else (cfg.image_seed, cfg.prompt_seed)
    all_prompts = load_prompt_set(cfg.prompt_set)
    indices = select_prompts(len(all_prompts), cfg.num_prompts or len(all_prompts), prompt_seed)
    return Plan([all_prompts[i] for i in indices], indices, cfg.num_repeats, base_seed)


def evaluate(cfg: EvalConfig) -> dict:
    """Generate, score and aggregate; rank 0 prints the table and writes --out / --save-images/index.jsonl.
    Returns the results (the same dict on every rank)."""
    from fdfo.generation import describe, load_generator

    start = time.perf_counter()
    reward_names, want_diversity = check_config(cfg)
    plan = make_plan(cfg)

    device = distributed.init(cfg.device)
    generator = load_generator(cfg.checkpoint, pretrained_model=cfg.pretrained_model, device=device,
                               guidance_scale=cfg.guidance_scale, num_steps=cfg.num_steps, resolution=cfg.resolution)
    scorer = build_metrics(reward_names, cfg.reward, device) if reward_names else None
    embedder = None
    if want_diversity:
        with distributed.rank0_first():  # one download of the DreamSim weights
            embedder = DreamSimEmbedder.load(str(Path(cfg.dreamsim_cache).expanduser()), device)
    distributed.print0(f"evaluating {describe(generator)}; {len(plan.prompts):,} prompts x {plan.num_repeats} of "
                       f"{cfg.prompt_set} on {distributed.get_world_size()} process(es)")

    scores, diversity = generate_and_score(plan, generator, scorer, embedder, cfg.batch_size, cfg.save_images)
    scores = gather_prompts(scores, len(plan.prompts), device)
    diversity = gather_prompts(diversity, len(plan.prompts), device) if diversity is not None else None

    names = list(scorer.names) if scorer is not None else []
    results = summarize(names, scores, diversity, cfg, generator, time.perf_counter() - start)
    if distributed.get_rank() == 0:
        print(format_table(results), flush=True)
        if cfg.out:
            Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(Path(cfg.out), results)
            print(f"wrote {cfg.out}", flush=True)
        if cfg.save_images:
            write_index(Path(cfg.save_images), plan, names, scores, diversity)
    distributed.barrier()
    return results


def generate_and_score(plan: Plan, generator, scorer, embedder, batch_size: int, save_dir: str | None
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """This rank's images, in batches of `batch_size`, scored. Returns scores `[per, R, M]` (metric columns in
    `scorer.names` order) and, with an embedder, the diversity of each prompt `[per]`, where per =
    ceil(num_prompts / world) and the rows past this rank's prompts are NaN."""
    from tqdm import tqdm

    rank, world = distributed.get_rank(), distributed.get_world_size()
    num_prompts, repeats = len(plan.prompts), plan.num_repeats
    per = math.ceil(num_prompts / world)
    tasks = [(j, r) for j in rank_prompts(num_prompts, rank, world) for r in range(repeats)]
    # Rank 0 has the most prompts, so its batch count is every rank's: ranks with fewer images make empty calls to the
    # scorer, because an FSDP-sharded VLM must run its forward passes on all ranks together.
    num_batches = math.ceil(per * repeats / batch_size)
    columns = len(scorer.names) if scorer is not None else 0
    scores = torch.full((per * repeats, columns), math.nan)
    embeddings = []
    if save_dir:
        Path(save_dir).mkdir(parents=True, exist_ok=True)
    for b in tqdm(range(num_batches), desc="images", unit="batch", disable=rank != 0):
        batch = tasks[b * batch_size: (b + 1) * batch_size]
        prompts = [plan.prompts[j] for j, _ in batch]
        if batch:
            images = generator.generate(prompts, [image_seed(plan.image_seed, j, repeats, r) for j, r in batch])
        else:
            images = torch.zeros(0, 3, generator.resolution, generator.resolution)
        if scorer is not None:
            parts = scorer.components(prompts, images)
            scores[b * batch_size: b * batch_size + len(batch)] = torch.stack([parts[n] for n in scorer.names], -1)
        if not batch or (embedder is None and not save_dir):
            continue
        pictures = [to_pil(image) for image in images]
        if embedder is not None:
            embeddings.append(embedder(pictures))
        if save_dir:
            for (j, r), picture in zip(batch, pictures):
                picture.save(Path(save_dir) / image_name(j, r))
    diversity = None
    if embedder is not None:
        diversity = torch.full((per,), math.nan, dtype=torch.float64)
        if embeddings:
            own = torch.cat(embeddings)
            diversity[: own.shape[0] // repeats] = mean_pairwise_sq_distance(own.view(-1, repeats, own.shape[-1]))
    return scores.view(per, repeats, columns), diversity


def gather_prompts(local: torch.Tensor, num_prompts: int, device: torch.device) -> torch.Tensor:
    """Every rank's `[per, ...]` rows -> `[num_prompts, ...]` in prompt order, on CPU, on every rank."""
    if local.numel() == 0:  # no columns to send (e.g. only dreamsim_diversity asked for)
        return local.new_zeros((num_prompts, *local.shape[1:]))
    gathered = distributed.all_gather_cat(local.to(device)).cpu()
    return unshard(gathered, num_prompts, distributed.get_world_size())


def image_name(prompt: int, repeat: int) -> str:
    return f"{prompt:05d}-{repeat:02d}.png"


# ---------------------------------------------------------------------------------------------------------------------
# Aggregation and output


def summarize(names: list[str], scores: torch.Tensor, diversity: torch.Tensor | None, cfg: EvalConfig, generator,
              elapsed: float) -> dict:
    """Means over all images (diversity: over prompts), with std and count, plus what was evaluated and how."""
    values = {name: scores[:, :, m].double().flatten() for m, name in enumerate(names)}
    if diversity is not None:
        values[DIVERSITY] = diversity.double()
    stats = {name: {"mean": _number(v.mean()), "std": _number(v.std(correction=0)), "count": v.numel()}
             for name, v in values.items()}
    return {
        "metrics": {name: s["mean"] for name, s in stats.items()},
        "stats": stats,
        "checkpoint": generator.checkpoint_description,
        "pretrained_model": generator.base.pretrained_model,
        "guidance_scale": generator.guidance_scale,
        "num_steps": generator.num_steps,
        "resolution": generator.resolution,
        "prompt_set": cfg.prompt_set,
        "num_prompts": scores.shape[0],
        "num_repeats": scores.shape[1],
        "world_size": distributed.get_world_size(),
        "elapsed_s": round(elapsed, 3),
        "config": dataclasses.asdict(cfg),
    }


def _number(x: torch.Tensor) -> float | None:
    value = float(x)
    return value if math.isfinite(value) else None  # JSON has no NaN


def format_table(results: dict) -> str:
    lines = [f"{'metric':<20} {'mean':>12} {'std':>12} {'count':>8}"]
    for name, s in results["stats"].items():
        mean, std = (f"{v:.4f}" if v is not None else "nan" for v in (s["mean"], s["std"]))
        lines.append(f"{name:<20} {mean:>12} {std:>12} {s['count']:>8}")
    lines.append(f"({results['num_prompts']:,} prompts x {results['num_repeats']} of {results['prompt_set']}, "
                 f"{results['checkpoint']}, {results['elapsed_s']:.0f} s)")
    return "\n".join(lines)


def write_index(folder: Path, plan: Plan, names: list[str], scores: torch.Tensor, diversity: torch.Tensor | None
                ) -> None:
    """`folder/index.jsonl`: one line per image with its file, prompt, seed and scores."""
    with open(folder / "index.jsonl", "w", encoding="utf-8") as handle:
        for j, prompt in enumerate(plan.prompts):
            for r in range(plan.num_repeats):
                record = {"file": image_name(j, r), "prompt": prompt, "prompt_index": j,
                          "set_index": plan.set_indices[j], "repeat": r,
                          "seed": image_seed(plan.image_seed, j, plan.num_repeats, r)}
                record |= {name: _number(scores[j, r, m]) for m, name in enumerate(names)}
                if diversity is not None:
                    record[DIVERSITY] = _number(diversity[j])  # of the prompt, repeated on each of its lines
                handle.write(json.dumps(record) + "\n")


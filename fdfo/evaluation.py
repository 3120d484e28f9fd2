"""The evaluation protocol of docs/algorithm.md §8 (metrics.py): which prompts, which seeds, which rank does what, and
the aggregation into one table.

* The prompt set, in file order, is shuffled by numpy's `np.random.RandomState(prompt_seed).shuffle` and its first
  `num_prompts` are kept; they are numbered j = 0 .. num_prompts - 1 in that order (the published subsets).
* Image r of prompt j is generated from seed `image_seed + j * num_repeats + r` (each image has its own generator).
* Every image is rounded to 8 bits, `uint8((x * 255 + 0.5).clamp(0, 255))` evaluated in the pipeline's output dtype
  (bf16 on CUDA, as the authors round it), before any metric sees it; the scorers get that / 255, DreamSim and
  --save-images the same 8-bit image.
* Rank k of W takes prompts j = k, k + W, k + 2W, ...; all repeats of a prompt stay on one rank (diversity needs
  them together). Scores are all-gathered and put back in j order.
Images therefore depend on (checkpoint, prompt, seed) only, not on the number of GPUs or the batch size, and the
means are over the same images whatever the launch. Means come with 95 % t-intervals over prompts (fdfo/stats.py);
`--compare` scores a second checkpoint on the same prompts and seeds and reports the paired differences.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fdfo import distributed, stats
from fdfo.cli import check_device
from fdfo.diversity import INSTALL_HINT, DreamSimEmbedder, dreamsim_available, mean_pairwise_sq_distance
from fdfo.eval_table import check_scored, format_comparison, format_table
from fdfo.files import atomic_path, make_folder, write_json_atomic
from fdfo.images import to_uint8, uint8_to_pil
from fdfo.outputs import check_output_path
from fdfo.prompts import load_prompt_set
from rewards import EVAL_METRICS, RewardConfig, build_metrics
from rewards.build import EXTERNAL_KINDS, SMOKE_METRICS, check_specs, metric_specs

DIVERSITY = "dreamsim_diversity"
METRICS = (*EVAL_METRICS, *SMOKE_METRICS, DIVERSITY)


@dataclass
class EvalConfig:
    checkpoint: str | None = None
    """LoRA to evaluate: one of our run checkpoints (runs/.../checkpoints/epoch-XXXXXXX; runs/<run>:best for the best \
held-out one), a PEFT folder, a https://huggingface.co/<org>/<repo>/tree/main/<folder> URL or \
hf:<org>/<repo>/<subfolder>; omit for the base model."""
    prompt_set: str = "hpdv2"
    """Prompts: pickscore_train, hpdv2 (see `python -m fdfo.prompts download`), or the path of a text file."""
    num_prompts: int | None = None
    """Prompts kept after the seeded shuffle; default: the whole set."""
    num_repeats: int = 1
    """Images per prompt, each with its own seed (dreamsim_diversity needs >= 2)."""
    metrics: tuple[str, ...] = ("pickscore", "hpsv2", "clip_h14", "clip_l14")
    """Metrics to compute: pickscore, hpsv2, clip_h14, clip_l14, vlm_alignment, vlm_quality, vlm_photo, \
dreamsim_diversity; redness, brightness (analytic, no download: smoke runs); your own reward \
"plugin:1:my_rewards.py:Aesthetic" or a reward server "remote:1:http://127.0.0.1:8000" (docs/rewards.md)."""
    pretrained_model: str | None = None
    """Hugging Face id or local folder of the base model the LoRA belongs to (an SD3 / SD3.5 or a FLUX pipeline); \
default: the one recorded in our run checkpoints, else stabilityai/stable-diffusion-3.5-medium."""
    guidance_scale: float | None = None
    """Guidance; default: the one the checkpoint was trained with, else the model's. SD3: the CFG scale (1.0 for the \
base model: no CFG); FLUX: the distilled guidance fed to the network (3.5 for the base model; never CFG)."""
    num_steps: int | None = None
    """Euler steps per image; default 40, or on a built-in tiny model (builtin:tiny-sd3, builtin:tiny-flux, e.g. a
    smoke run's checkpoint) the steps the checkpoint was trained with (else 6)."""
    resolution: int | None = None
    """Image height and width in pixels (a multiple of 16); default 512, or on a built-in tiny model the checkpoint's
    training size (else 64)."""
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
    compare: str | None = None
    """A second checkpoint (any form --checkpoint takes; "base" for the base model) to score on the same prompts and \
seeds: reports per metric the mean difference (checkpoint - compare), its 95 % interval and a paired t-test's \
p-value. Its guidance scale is its own default unless --guidance-scale is given (then both use it); its steps and \
size are the checkpoint's."""
    reward: RewardConfig = field(default_factory=RewardConfig)


# ---------------------------------------------------------------------------------------------------------------------
# The protocol as pure functions


def select_prompts(num_available: int, num_prompts: int, prompt_seed: int) -> list[int]:
    """Indices into the prompt set (file order) of prompts j = 0 .. num_prompts - 1: the set shuffled in place by
    `np.random.RandomState(prompt_seed).shuffle`, first `num_prompts` kept (docs/algorithm.md §8; a smaller
    `num_prompts` keeps a prefix of a larger one). Shuffling the positions draws the same swaps as shuffling the
    prompts themselves."""
    if not 1 <= num_prompts <= num_available:
        raise ValueError(f"--num-prompts must be between 1 and the {num_available:,} prompts of the set, "
                         f"got {num_prompts:,}.")
    order = list(range(num_available))
    np.random.RandomState(prompt_seed).shuffle(order)
    return order[:num_prompts]


def image_seed(base: int, prompt: int, num_repeats: int, repeat: int) -> int:
    """docs/algorithm.md §8: the seed of repeat r of prompt j is `image_seed + j * num_repeats + r`, j the prompt's
    global position (the published code numbers j per rank, so its seeds depend on the GPU count; ours do not)."""
    return base + prompt * num_repeats + repeat


# RewardConfig fields shared with train.py that mean nothing to an evaluation: refused rather than ignored
TRAINING_ONLY_REWARD_OPTIONS = {"specs": "--reward.specs", "offload": "--reward.offload",
                                "overlap_preprocessing": "--reward.overlap-preprocessing",
                                "vlm_fp32_buffers": "--reward.vlm-fp32-buffers"}  # metrics: always fp32


def check_config(cfg: EvalConfig) -> tuple[list[str], bool]:
    """User errors before anything loads. Returns the reward-model metrics and whether diversity is asked for."""
    check_device("--device", cfg.device)
    metrics = list(cfg.metrics)
    unknown = [name for name in metrics if name not in METRICS and name.split(":", 1)[0] not in EXTERNAL_KINDS]
    if unknown or not metrics:
        raise ValueError(f"unknown metric(s) {', '.join(unknown) or '(none given)'}; --metrics takes one or more of "
                         f"{', '.join(METRICS)}, or a plug-in \"plugin:1:file.py:Attr\" / a reward server "
                         f"\"remote:1:URL\".")
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
    flag, prompt_seed = ("--seed", cfg.seed) if cfg.seed is not None else ("--prompt-seed", cfg.prompt_seed)
    if not 0 <= prompt_seed < 2**32:  # the seed of numpy's shuffle (select_prompts)
        raise ValueError(f"{flag} {prompt_seed} is invalid: it must be in [0, 2**32 - 1].")
    defaults = RewardConfig()
    for option, flag in TRAINING_ONLY_REWARD_OPTIONS.items():
        if getattr(cfg.reward, option) != getattr(defaults, option):
            raise ValueError(f"{flag} {getattr(cfg.reward, option)!r} is a train.py option; metrics.py computes the "
                             f"--metrics it is given and would ignore it: leave it out.")
    if cfg.batch_size < 1 or (cfg.num_steps is not None and cfg.num_steps < 1):
        raise ValueError(f"--batch-size and --num-steps must be >= 1, got {cfg.batch_size} and {cfg.num_steps}.")
    from fdfo.generation import check_guidance_scale, check_resolution

    if cfg.resolution is not None:
        check_resolution(cfg.resolution)
    check_guidance_scale(cfg.guidance_scale)
    if cfg.out:
        check_output_path("--out", Path(cfg.out), folder=False)
    if cfg.save_images:
        check_output_path("--save-images", Path(cfg.save_images), folder=True)
    reward_names = [name for name in metrics if name != DIVERSITY]
    if reward_names:
        check_specs(metric_specs(reward_names), cfg.reward, cfg.resolution)  # plug-ins import, servers answer
    return reward_names, DIVERSITY in metrics


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


def load_samplers(cfg: EvalConfig, device: torch.device):
    """(the sampler of --checkpoint, that of --compare or None), sharing one base model, at the same steps and size
    (on a tiny model: what a checkpoint was trained at); both checkpoints are found and checked (their recorded
    SHA-256) before any model loads."""
    from fdfo.generation import load_generator, shared_settings
    from fdfo.hub import resolve_checkpoint

    with distributed.rank0_first():
        checkpoint = resolve_checkpoint(cfg.checkpoint)
        compare = resolve_checkpoint(cfg.compare) if cfg.compare is not None else None
    pretrained, steps, size, why = shared_settings([c for c in (checkpoint, compare) if c is not None],
                                                   cfg.pretrained_model, cfg.num_steps, cfg.resolution)
    generator = load_generator(checkpoint, pretrained, device, cfg.guidance_scale, steps, size)
    other = None
    if compare is not None:
        other = load_generator(compare, base=generator.base, guidance_scale=cfg.guidance_scale, num_steps=steps,
                               resolution=size)
    for gen in (generator, other) if other is not None else (generator,):
        gen.sampling_source = why
    return generator, other


def evaluate(cfg: EvalConfig) -> dict:
    """Generate, score and aggregate; rank 0 prints the table and writes --out / --save-images/index.jsonl.
    Returns the results (the same dict on every rank). With --compare, both checkpoints are scored on the same
    prompts and seeds (one base model in memory) and the results hold both and their paired differences."""
    from fdfo.generation import describe

    start = time.perf_counter()
    reward_names, want_diversity = check_config(cfg)
    plan = make_plan(cfg)

    device = distributed.init(cfg.device)
    from fdfo.offline import ensure_hub_reachable, reward_sources  # offline: one line, not minutes of download retries

    ensure_hub_reachable([cfg.pretrained_model, *reward_sources(metric_specs(reward_names), cfg.reward)])
    generator, other = load_samplers(cfg, device)
    scorer = build_metrics(reward_names, cfg.reward, device) if reward_names else None
    embedder = None
    if want_diversity:
        with distributed.rank0_first():  # one download of the DreamSim weights
            embedder = DreamSimEmbedder.load(str(Path(cfg.dreamsim_cache).expanduser()), device)
    names = list(scorer.names) if scorer is not None else []
    runs = [("a", generator)] + ([("b", other)] if other is not None else [])
    summaries = {}
    for label, gen in runs:
        distributed.print0(f"evaluating {describe(gen)}; {len(plan.prompts):,} prompts x {plan.num_repeats} of "
                           f"{cfg.prompt_set} on {distributed.get_world_size()} process(es)")
        save_dir = None if not cfg.save_images else str(Path(cfg.save_images) / label) if other else cfg.save_images
        scores, diversity = generate_and_score(plan, gen, scorer, embedder, cfg.batch_size, save_dir)
        scores = gather_prompts(scores, len(plan.prompts), device)
        diversity = gather_prompts(diversity, len(plan.prompts), device) if diversity is not None else None
        summaries[label] = (scores, diversity)
        if distributed.get_rank() == 0 and save_dir:
            write_index(Path(save_dir), plan, names, scores, diversity)

    elapsed = time.perf_counter() - start
    results = summarize(names, *summaries["a"], cfg, generator, elapsed)
    if other is not None:
        results = compare_results(results, summarize(names, *summaries["b"], cfg, other, elapsed),
                                  metric_values(names, *summaries["a"]), metric_values(names, *summaries["b"]))
    if distributed.get_rank() == 0:
        print(format_comparison(results) if other is not None else format_table(results), flush=True)
        if cfg.out:
            make_folder(Path(cfg.out).parent)
            write_json_atomic(Path(cfg.out), results)
            print(f"wrote {cfg.out}", flush=True)
    distributed.barrier()
    check_scored(results)  # every rank: a metric that scored no image is an error, after the table and --out
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
    tasks = [(j, r) for j in distributed.round_robin(num_prompts, rank, world) for r in range(repeats)]
    # Rank 0 has the most prompts, so its batch count is every rank's: ranks with fewer images make empty calls to the
    # scorer, because an FSDP-sharded VLM must run its forward passes on all ranks together.
    num_batches = math.ceil(per * repeats / batch_size)
    columns = len(scorer.names) if scorer is not None else 0
    scores = torch.full((per * repeats, columns), math.nan)
    embeddings = []
    if save_dir:
        make_folder(Path(save_dir))
    for b in tqdm(range(num_batches), desc="images", unit="batch", disable=rank != 0):
        batch = tasks[b * batch_size: (b + 1) * batch_size]
        prompts = [plan.prompts[j] for j, _ in batch]
        if batch:
            images = generator.generate(prompts, [image_seed(plan.image_seed, j, repeats, r) for j, r in batch])
        else:
            images = torch.zeros(0, 3, generator.resolution, generator.resolution)
        pixels = to_uint8(images)  # every metric scores the 8-bit image, rounded in the pipeline's dtype (§8)
        if scorer is not None:
            parts = scorer.components(prompts, pixels.float() / 255)
            scores[b * batch_size: b * batch_size + len(batch)] = torch.stack([parts[n] for n in scorer.names], -1)
        if not batch or (embedder is None and not save_dir):
            continue
        pictures = [uint8_to_pil(image) for image in pixels]
        if embedder is not None:
            embeddings.append(embedder(pictures))
        if save_dir:
            for (j, r), picture in zip(batch, pictures):
                with atomic_path(Path(save_dir) / image_name(j, r), durable=False) as tmp:  # full disk: one line
                    picture.save(tmp, format="PNG")
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
    return distributed.unshard(gathered, num_prompts, distributed.get_world_size())


def image_name(prompt: int, repeat: int) -> str:
    return f"{prompt:05d}-{repeat:02d}.png"


# ---------------------------------------------------------------------------------------------------------------------
# Aggregation and output


def metric_values(names: list[str], scores: torch.Tensor, diversity: torch.Tensor | None) -> dict[str, np.ndarray]:
    """Per metric: `[N, R]` scores of the images, or `[N]` diversity of the prompts (float64)."""
    values = {name: scores[:, :, m].double().numpy() for m, name in enumerate(names)}
    if diversity is not None:
        values[DIVERSITY] = diversity.double().numpy()
    return values


def summarize(names: list[str], scores: torch.Tensor, diversity: torch.Tensor | None, cfg: EvalConfig, generator,
              elapsed: float) -> dict:
    """Per metric the mean over all images (diversity: over prompts), its 95 % t-interval over prompts (fdfo/stats.py:
    the repeats of a prompt are averaged first, they are not independent) and n (prompts), plus what was evaluated
    and how."""
    summaries = {name: stats.summary(v) for name, v in metric_values(names, scores, diversity).items()}
    return {
        "metrics": {name: s["mean"] for name, s in summaries.items()},
        "stats": summaries,
        "interval": "95 % Student t-interval over prompts (per-prompt mean of the repeats)",
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


def compare_results(a: dict, b: dict, values_a: dict[str, np.ndarray], values_b: dict[str, np.ndarray]) -> dict:
    """The --compare results: both summaries and, per metric, the paired difference A - B over prompts."""
    return {
        "a": a,
        "b": b,
        "difference": {name: stats.paired(values_a[name], values_b[name]) for name in values_a},
        "test": f"difference = a - b per prompt; 95 % t-interval; p-value of the {stats.PAIRED_TEST}",
    }


def _number(x: torch.Tensor) -> float | None:
    value = float(x)
    return value if math.isfinite(value) else None  # JSON has no NaN


def write_index(folder: Path, plan: Plan, names: list[str], scores: torch.Tensor, diversity: torch.Tensor | None
                ) -> None:
    """`folder/index.jsonl`: one line per image with its file, prompt, seed and scores."""
    make_folder(folder)
    with atomic_path(folder / "index.jsonl") as tmp, open(tmp, "w", encoding="utf-8") as handle:
        for j, prompt in enumerate(plan.prompts):
            for r in range(plan.num_repeats):
                record = {"file": image_name(j, r), "prompt": prompt, "prompt_index": j,
                          "set_index": plan.set_indices[j], "repeat": r,
                          "seed": image_seed(plan.image_seed, j, plan.num_repeats, r)}
                record |= {name: _number(scores[j, r, m]) for m, name in enumerate(names)}
                if diversity is not None:
                    record[DIVERSITY] = _number(diversity[j])  # of the prompt, repeated on each of its lines
                handle.write(json.dumps(record) + "\n")


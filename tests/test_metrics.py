"""metrics.py and the evaluation protocol of docs/algorithm.md §8: prompt selection and seeds against hand values, the
split over ranks, the 8-bit rounding every metric sees, the diversity math, the DreamSim plumbing, user errors, and
end-to-end runs through the published hub ids (fake offline cache) that must reproduce the scorers applied directly to
independently regenerated images, with one process and with two torchrun processes, and a paired --compare run."""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fdfo import distributed, evaluation, outputs
from fdfo.distributed import round_robin, unshard
from fdfo.diversity import INSTALL_HINT, DreamSimEmbedder, dreamsim_available, mean_pairwise_sq_distance
from fdfo.evaluation import (
    EvalConfig,
    Plan,
    check_config,
    generate_and_score,
    image_seed,
    select_prompts,
)
from fdfo.images import to_uint8
from rewards import RewardConfig, Term, WeightedReward, build_metrics
from rewards.analytic import Brightness
from tests.fake_hub import FDFO_REPO, NO_CFG, build_checkpoint_cache, hub_env
from tests.tiny_rewards import build_fake_hf_cache, tiny_reward_repos

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red bicycle", "a cat on a sofa", "an oil painting of a boat", "a snowy mountain", "a bowl of fruit"]



# ---------------------------------------------------------------------------------------------------------------------
# The protocol on hand values


def numpy_subset(lines: list[str], seed: int, count: int) -> list[str]:
    """docs/algorithm.md §8 written out: numpy's in-place shuffle of the lines themselves, first `count` kept."""
    lines = list(lines)
    np.random.RandomState(seed).shuffle(lines)
    return lines[:count]


def test_prompt_selection():
    # np.random.RandomState(0).shuffle on range(10) gives [2, 8, 4, 9, 1, 6, 7, 3, 0, 5] (pinned: a change would change
    # every result; a torch permutation would give [4, 1, 7, 5, ...])
    assert select_prompts(10, 4, prompt_seed=0) == [2, 8, 4, 9]
    assert select_prompts(10, 10, prompt_seed=0) == [2, 8, 4, 9, 1, 6, 7, 3, 0, 5]
    assert select_prompts(10, 4, prompt_seed=1) == [2, 9, 6, 4]
    # against numpy's shuffle of the prompt strings, on a set of the published size, and the prefix property
    lines = [f"prompt {i}" for i in range(3200)]
    for seed in (0, 7):
        full = [lines[i] for i in select_prompts(3200, 3200, seed)]
        assert full == numpy_subset(lines, seed, 3200)
        assert [lines[i] for i in select_prompts(3200, 100, seed)] == full[:100]
    for bad in (0, 11):
        with pytest.raises(ValueError, match="--num-prompts must be between 1 and the 10 prompts"):
            select_prompts(10, bad, prompt_seed=0)


def test_image_seeds_and_rank_split():
    assert image_seed(100, prompt=3, num_repeats=4, repeat=2) == 114
    seeds = [image_seed(7, j, 4, r) for j in range(3) for r in range(4)]
    assert seeds == list(range(7, 19))  # consecutive, no two images share a seed
    assert list(round_robin(5, 0, 2)) == [0, 2, 4] and list(round_robin(5, 1, 2)) == [1, 3]
    assert list(round_robin(2, 2, 3)) == []  # more ranks than prompts: an idle rank
    # rank 0 sends rows for j = 0, 2, 4, rank 1 for j = 1, 3 and a padding row
    gathered = torch.tensor([0.0, 2.0, 4.0, 1.0, 3.0, float("nan")])
    assert unshard(gathered, 5, 2).tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert unshard(torch.tensor([[0, 0], [1, 1], [2, 2]]), 3, 1).tolist() == [[0, 0], [1, 1], [2, 2]]


def test_plan_from_the_prompt_file_and_seeds(tmp_path):
    (tmp_path / "set.txt").write_text("\n".join(PROMPTS))
    plan = evaluation.make_plan(EvalConfig(prompt_set=str(tmp_path / "set.txt"), num_prompts=3, image_seed=9,
                                           prompt_seed=1, num_repeats=4))
    # RandomState(1).shuffle of 5 entries gives [2, 1, 4, 0, 3]
    assert plan.set_indices == [2, 1, 4] and plan.prompts == [PROMPTS[2], PROMPTS[1], PROMPTS[4]]
    assert plan.prompts == numpy_subset(PROMPTS, 1, 3)
    assert (plan.image_seed, plan.num_repeats) == (9, 4)
    plan = evaluation.make_plan(EvalConfig(prompt_set=str(tmp_path / "set.txt"), seed=1, image_seed=9))
    assert plan.set_indices == [2, 1, 4, 0, 3] and len(plan.prompts) == 5 and plan.image_seed == 1  # --seed: both
    with pytest.raises(ValueError, match="between 1 and the 5 prompts of the set, got 6"):
        evaluation.make_plan(EvalConfig(prompt_set=str(tmp_path / "set.txt"), num_prompts=6))


class FakeGenerator:
    """Images whose pixels encode the seed (in steps of 1/255, exact in 8 bits), so a wrong seed shows."""

    resolution = 8

    def __init__(self):
        self.seeds = []

    def generate(self, prompts, seeds):
        assert len(prompts) == len(seeds) > 0
        self.seeds += list(seeds)
        return torch.stack([torch.full((3, 8, 8), (s % 256) / 255) for s in seeds])


class CountingScorer(WeightedReward):
    def __init__(self):
        super().__init__([Term("brightness", 1.0, Brightness())], "cpu")
        self.calls = 0

    def components(self, prompts, images):
        self.calls += 1
        return super().components(prompts, images)


class ColourEmbedder:
    """Stands in for DreamSim: the embedding of an image is its mean colour."""

    def __call__(self, pictures):
        return torch.tensor(np.stack([np.asarray(p, dtype=np.float64).mean(axis=(0, 1)) / 255 for p in pictures]))


@pytest.mark.parametrize("world", [2, 3, 4])
def test_results_do_not_depend_on_the_number_of_ranks(world, monkeypatch):
    plan = Plan(prompts=[f"p{j}" for j in range(7)], set_indices=list(range(7)), num_repeats=2, image_seed=5)

    def run(world, batch_size):
        rank_scores, rank_diversity, calls, seeds = [], [], [], []
        monkeypatch.setattr(distributed, "get_world_size", lambda: world)
        for rank in range(world):
            monkeypatch.setattr(distributed, "get_rank", lambda rank=rank: rank)
            generator, scorer = FakeGenerator(), CountingScorer()
            scores, diversity = generate_and_score(plan, generator, scorer, ColourEmbedder(), batch_size, None)
            rank_scores.append(scores), rank_diversity.append(diversity), calls.append(scorer.calls)
            seeds.append(generator.seeds)
        return (unshard(torch.cat(rank_scores), 7, world), unshard(torch.cat(rank_diversity), 7, world), calls,
                seeds)

    scores1, diversity1, _, seeds1 = run(1, batch_size=4)
    assert seeds1 == [list(range(5, 19))]
    expected = torch.tensor([[(5 + 2 * j + r) / 255 for r in range(2)] for j in range(7)])
    assert torch.allclose(scores1[:, :, 0], expected)
    # mean colour embeddings (c, c, c) of the two repeats differ by 1/255 per channel: squared distance 3/255^2
    assert torch.allclose(diversity1, torch.full((7,), 3 / 255**2, dtype=torch.float64))

    scores, diversity, calls, seeds = run(world, batch_size=3)
    assert torch.equal(scores, scores1) and torch.allclose(diversity, diversity1)
    assert sorted(sum(seeds, [])) == seeds1[0]
    # every rank calls the scorer equally often (a sharded VLM needs all ranks in each forward), idle ones included
    assert len(set(calls)) == 1 and calls[0] == -(-len(round_robin(7, 0, world)) * 2 // 3)


# ---------------------------------------------------------------------------------------------------------------------
# 8-bit rounding before every metric


def eight_bit(x: np.ndarray) -> np.ndarray:
    """docs/algorithm.md §8 in numpy float32 arithmetic: uint8((x * 255 + 0.5).clamp(0, 255))."""
    y = np.asarray(x, dtype=np.float32) * np.float32(255) + np.float32(0.5)
    return np.floor(np.clip(y, 0, 255)).astype(np.uint8)


# x * 255 = 0.5 and 2.5 exactly in float32: half-up gives 1 and 3, round-half-even (torch.round) 0 and 2
PIXELS = [2 / 1020, 10 / 1020, 0.25, 0.5, 1.0, -0.2, 1.3, 0.7]


class RecordingScorer:
    names = ("brightness",)

    def __init__(self):
        self.received = []

    def components(self, prompts, images):
        self.received.append(images.clone())
        return {"brightness": images.mean(dim=(1, 2, 3))}


class RecordingEmbedder:
    def __init__(self):
        self.received = []

    def __call__(self, pictures):
        self.received += [np.asarray(p) for p in pictures]
        return torch.zeros(len(pictures), 2)


class ValueGenerator:
    """Image of seed s: every pixel PIXELS[s % len(PIXELS)] (float32)."""

    resolution = 4

    def generate(self, prompts, seeds):
        return torch.stack([torch.full((3, 4, 4), PIXELS[s % len(PIXELS)], dtype=torch.float32) for s in seeds])


def test_every_metric_sees_the_8_bit_image(tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "get_world_size", lambda: 1)
    monkeypatch.setattr(distributed, "get_rank", lambda: 0)
    plan = Plan(prompts=["a", "b", "c", "d"], set_indices=[0, 1, 2, 3], num_repeats=2, image_seed=0)
    scorer, embedder = RecordingScorer(), RecordingEmbedder()
    scores, _ = generate_and_score(plan, ValueGenerator(), scorer, embedder, 3, str(tmp_path / "images"))
    expected = eight_bit(PIXELS)
    assert expected[:2].tolist() == [1, 3]  # half up, not half to even
    received = torch.cat(scorer.received)[:, 0, 0, 0]
    assert torch.equal(received, torch.from_numpy(expected.astype(np.float32) / np.float32(255)))  # float32 v / 255
    assert torch.cat(scorer.received).dtype == torch.float32
    assert [int(p[0, 0, 0]) for p in embedder.received] == expected.tolist()  # DreamSim: the same 8-bit image
    saved = [int(np.asarray(Image.open(tmp_path / "images" / f"{j:05d}-{r:02d}.png"))[0, 0, 0])
             for j in range(4) for r in range(2)]
    assert saved == expected.tolist()
    assert scores[:, :, 0].flatten().tolist() == pytest.approx([v / 255 for v in expected])
    assert to_uint8(torch.tensor(PIXELS)).tolist() == expected.tolist()


# ---------------------------------------------------------------------------------------------------------------------
# Diversity


def test_diversity_math_on_hand_values():
    e = torch.tensor([
        [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]],  # pairs: 1, 1, 2 -> 4/3
        [[2.0, 3.0], [2.0, 3.0], [2.0, 3.0]],  # identical repeats -> 0
    ])
    assert mean_pairwise_sq_distance(e).tolist() == pytest.approx([4 / 3, 0.0])
    assert mean_pairwise_sq_distance(torch.tensor([[[0.0, 0.0], [3.0, 4.0]]])).tolist() == [25.0]
    with pytest.raises(ValueError, match="needs >= 2"):
        mean_pairwise_sq_distance(torch.zeros(2, 1, 4))


def test_dreamsim_embedder_with_a_stand_in_package(monkeypatch):
    loaded = {}

    def dreamsim(pretrained, device, cache_dir):
        loaded.update(pretrained=pretrained, device=device, cache_dir=cache_dir)
        model = types.SimpleNamespace(embed=lambda x: x.mean(dim=(2, 3)) / 255)  # [B, 3]
        return model, lambda picture: torch.from_numpy(np.asarray(picture, dtype=np.float32)).permute(2, 0, 1)[None]

    monkeypatch.setitem(sys.modules, "dreamsim", types.SimpleNamespace(dreamsim=dreamsim))
    embedder = DreamSimEmbedder.load("/tmp/weights", "cpu")
    assert loaded == {"pretrained": True, "device": "cpu", "cache_dir": "/tmp/weights"}
    pictures = [Image.new("RGB", (4, 4), (255, 0, 0)), Image.new("RGB", (4, 4), (0, 0, 255))]
    out = embedder(pictures)
    # dreamsim 0.2.1's embed() is already unit length: the embedder passes it on unchanged
    assert torch.equal(out, torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]))
    # orthogonal unit vectors: ||a - b||^2 = 2 = 2 * DreamSim distance (1 - cos)
    assert mean_pairwise_sq_distance(out[None]).item() == pytest.approx(2.0)
    half = embedder([Image.new("RGB", (4, 4), (0, 0, 51))])
    assert torch.allclose(half, torch.tensor([[0.0, 0.0, 0.2]]))  # not renormalised

    monkeypatch.setitem(sys.modules, "dreamsim", None)  # what a missing package looks like to `import`
    with pytest.raises(ValueError, match="requirements-eval.txt"):
        DreamSimEmbedder.load("/tmp/weights", "cpu")


def test_user_errors_before_anything_loads(monkeypatch):
    with pytest.raises(ValueError, match="needs --num-repeats >= 2"):
        check_config(EvalConfig(metrics=("pickscore", "dreamsim_diversity"), num_repeats=1))
    with pytest.raises(ValueError, match="unknown metric.*fid.*dreamsim_diversity"):
        check_config(EvalConfig(metrics=("pickscore", "fid")))
    with pytest.raises(ValueError, match="names a metric twice"):
        check_config(EvalConfig(metrics=("hpsv2", "hpsv2")))
    with pytest.raises(ValueError, match="multiple of 16"):
        check_config(EvalConfig(resolution=100))
    monkeypatch.setattr(evaluation, "dreamsim_available", lambda: False)
    with pytest.raises(ValueError) as error:
        check_config(EvalConfig(metrics=("dreamsim_diversity",), num_repeats=4))
    assert str(error.value) == INSTALL_HINT
    assert check_config(EvalConfig(metrics=("clip_l14", "vlm_photo"))) == (["clip_l14", "vlm_photo"], False)
    for option, flag in (("specs", "--reward.specs"), ("offload", "--reward.offload"),
                         ("overlap_preprocessing", "--reward.overlap-preprocessing"),
                         ("vlm_fp32_buffers", "--reward.vlm-fp32-buffers")):
        value = ("pickscore:1.0",) if option == "specs" else True
        with pytest.raises(ValueError, match=f"{flag} .* is a train.py option; metrics.py computes the --metrics"):
            check_config(EvalConfig(reward=RewardConfig(**{option: value})))


def test_unusable_output_paths_are_refused(tmp_path, monkeypatch):
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "folder").mkdir()
    cases = [
        ({"out": str(tmp_path / "folder")}, f"--out {str(tmp_path / 'folder')!r} is a folder; give a file path"),
        ({"out": str(tmp_path / "file.txt/sub/results.json")}, f"{str(tmp_path / 'file.txt')!r} is a file"),
        ({"save_images": str(tmp_path / "file.txt")}, "--save-images"),
        ({"save_images": str(tmp_path / "file.txt/images")}, f"{str(tmp_path / 'file.txt')!r} is a file"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message.replace("[", r"\[")):
            check_config(EvalConfig(metrics=("pickscore",), **kwargs))
    # usable: new paths below a writable folder, an existing folder for the images, an existing file to replace
    check_config(EvalConfig(out=str(tmp_path / "new/results.json"), save_images=str(tmp_path / "new/images")))
    check_config(EvalConfig(out=str(tmp_path / "file.txt"), save_images=str(tmp_path / "folder")))
    # a read-only folder (os.access stands in: this check runs as root here, which may write anywhere)
    monkeypatch.setattr(outputs.os, "access", lambda path, mode: Path(path) != tmp_path / "folder")
    with pytest.raises(ValueError, match="--out .* cannot be created: the folder .*folder' is not writable"):
        check_config(EvalConfig(out=str(tmp_path / "folder/a/results.json")))
    with pytest.raises(ValueError, match="--save-images .*folder' is not writable"):
        check_config(EvalConfig(save_images=str(tmp_path / "folder")))


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into read-only folders")
def test_read_only_output_folder(tmp_path):
    (tmp_path / "ro").mkdir(mode=0o555)
    with pytest.raises(ValueError, match="--out .* the folder .* is not writable"):
        check_config(EvalConfig(out=str(tmp_path / "ro/results.json")))


def run_metrics(*args, cwd=ROOT, env=None, nproc=None, timeout=300):
    launcher = [sys.executable] if nproc is None else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    env = env or {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*launcher, str(ROOT / "metrics.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def assert_user_error(result, *fragments):
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


@pytest.mark.parametrize("args, fragments", [
    (["--metrics", "hpsv2", "dreamsim_diversity", "--num-repeats", "1"], ["needs --num-repeats >= 2"]),
    (["--metrics", "pickscore", "aesthetic"], ["unknown metric(s) aesthetic", "vlm_quality"]),
    (["--prompt-set", "hpdv2", "--metrics", "pickscore"], ["prompt_sets/hpdv2.json not found",
                                                           "`python -m fdfo.prompts download hpdv2`"]),
    (["--out", ".", "--metrics", "pickscore"], ["--out '.' is a folder; give a file path"]),
    (["--device", "tpu", "--metrics", "pickscore"], ["--device 'tpu'", "use cpu, cuda or cuda:<index>"]),
])
def test_bad_input_is_one_clear_error(tmp_path, args, fragments):
    assert_user_error(run_metrics(*args, cwd=tmp_path), *fragments)  # cwd: a folder without prompt_sets/


@pytest.mark.skipif(dreamsim_available(), reason="the dreamsim package is installed here")
def test_missing_dreamsim_package_gives_the_install_hint(tmp_path):
    result = run_metrics("--metrics", "dreamsim_diversity", "--num-repeats", "2", cwd=tmp_path)
    assert_user_error(result, "requirements-eval.txt")


# ---------------------------------------------------------------------------------------------------------------------
# End to end through the published ids, offline

REWARD_IDS = {"pickscore_model": "yuvalkirstain/PickScore_v1",
              "pickscore_processor": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
              "clip_l14_model": "openai/clip-vit-large-patch14",
              "vlm_model": "Qwen/Qwen2.5-VL-7B-Instruct"}
METRICS = ["pickscore", "clip_l14", "vlm_alignment"]
ARGS = ["--checkpoint", f"hf:{FDFO_REPO}/{NO_CFG}", "--num-prompts", "3", "--num-repeats", "2",
        "--metrics", *METRICS, "--num-steps", "2", "--resolution", "64", "--batch-size", "3",
        "--image-seed", "10", "--prompt-seed", "3", "--device", "cpu"]  # cpu: the comparison below runs on CPU


def snapshot(cache: Path, repo_id: str) -> Path:
    root = cache / f"models--{repo_id.replace('/', '--')}"
    return root / "snapshots" / (root / "refs/main").read_text().strip()


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("metrics")
    info = build_checkpoint_cache(tmp / "hub")
    build_fake_hf_cache(info["cache"], {k: v for k, v in tiny_reward_repos().items() if k in REWARD_IDS.values()})
    (tmp / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return info, tmp


@pytest.fixture(scope="module")
def single_run(hub):
    info, tmp = hub
    out = tmp / "one"
    result = run_metrics(*ARGS, "--prompt-set", str(tmp / "prompts.txt"), "--out", str(out / "results.json"),
                         "--save-images", str(out / "images"), env=hub_env(info, tmp))
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stdout


def test_metrics_equal_the_scorers_on_regenerated_images(hub, single_run):
    from fdfo.generation import load_generator

    info, tmp = hub
    out, stdout = single_run
    results = json.loads((out / "results.json").read_text())
    assert list(results["metrics"]) == METRICS
    assert (results["num_prompts"], results["num_repeats"], results["guidance_scale"]) == (3, 2, 1.0)
    assert results["config"]["prompt_seed"] == 3 and results["elapsed_s"] > 0
    assert "pickscore" in stdout and f"{results['metrics']['pickscore']:.4f}" in stdout  # the table

    # The protocol, written out independently: numpy-shuffle with the prompt seed, keep 3, seed = 10 + 2 j + r, 8 bits.
    subset = numpy_subset(PROMPTS, 3, 3)
    order = [PROMPTS.index(prompt) for prompt in subset]
    prompts = [prompt for prompt in subset for _ in range(2)]
    seeds = [10 + 2 * j + r for j in range(3) for r in range(2)]
    cache = info["cache"]
    generator = load_generator(str(snapshot(cache, FDFO_REPO) / NO_CFG),
                               pretrained_model=str(snapshot(cache, "stabilityai/stable-diffusion-3.5-medium")),
                               device=torch.device("cpu"), guidance_scale=1.0, num_steps=2, resolution=64)
    # the run's batches (--batch-size 3): the same float rounding, so the same 8-bit images bit for bit
    images = torch.cat([generator.generate(prompts[i:i + 3], seeds[i:i + 3]) for i in range(0, 6, 3)])
    pixels = torch.from_numpy(eight_bit(images.numpy()))
    config = RewardConfig(**{field: str(snapshot(cache, repo)) for field, repo in REWARD_IDS.items()})
    direct = build_metrics(METRICS, config, "cpu").components(prompts, pixels.float() / 255)
    for name in METRICS:
        assert results["metrics"][name] == pytest.approx(direct[name].double().mean().item(), rel=1e-5, abs=1e-5)
        per_prompt = direct[name].double().view(3, 2).mean(1).numpy()  # the interval is over the 3 prompts
        half = 4.302652729749462 * per_prompt.std(ddof=1) / np.sqrt(3)  # t quantile 0.975 with 2 degrees of freedom
        assert results["stats"][name]["ci95"] == pytest.approx([per_prompt.mean() - half, per_prompt.mean() + half],
                                                               rel=1e-5, abs=1e-5)
        assert (results["stats"][name]["n"], results["stats"][name]["n_images"]) == (3, 6)
        assert f"{results['stats'][name]['ci95'][0]:.4f}" in stdout

    index = [json.loads(line) for line in (out / "images/index.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["seed"], r["repeat"]) for r in index] == list(zip(prompts, seeds, [0, 1] * 3))
    assert [r["set_index"] for r in index[::2]] == order
    assert [r["pickscore"] for r in index] == pytest.approx(direct["pickscore"].tolist(), rel=1e-5, abs=1e-5)
    saved = torch.stack([torch.from_numpy(np.array(Image.open(out / "images" / r["file"]))) for r in index])
    assert torch.equal(saved, pixels.permute(0, 2, 3, 1))


def test_two_processes_give_the_same_numbers(hub, single_run):
    info, tmp = hub
    out = tmp / "two"
    result = run_metrics(*ARGS, "--prompt-set", str(tmp / "prompts.txt"), "--out", str(out / "results.json"),
                         "--save-images", str(out / "images"), env=hub_env(info, tmp), nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    one = json.loads((single_run[0] / "results.json").read_text())
    two = json.loads((out / "results.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    # Other batch compositions round differently in the last float bits; where a pixel sits at a .5 step, the 8-bit
    # rounding turns that into one step of 1/255. So: the same 8-bit images up to a few such pixels, and scores that
    # agree to what those pixels can move (a step of 1/255 is not kernel noise any more for the tiny scorers).
    for one_png in sorted((single_run[0] / "images").glob("*.png")):
        a, b = (np.asarray(Image.open(path)).astype(int) for path in (one_png, out / "images" / one_png.name))
        assert np.abs(a - b).max() <= 1 and (a != b).mean() < 1e-3, one_png.name
    for name, value in one["metrics"].items():
        assert two["metrics"][name] == pytest.approx(value, rel=1e-3, abs=1e-3)
    lines = [(out / "images/index.jsonl").read_text(), (single_run[0] / "images/index.jsonl").read_text()]
    index_two, index_one = ([json.loads(line) for line in text.splitlines()] for text in lines)
    assert [r["seed"] for r in index_two] == [r["seed"] for r in index_one]
    assert [r["clip_l14"] for r in index_two] == pytest.approx([r["clip_l14"] for r in index_one], rel=1e-3,
                                                               abs=1e-3)
    assert sorted(p.name for p in (out / "images").glob("*.png")) == [f"{j:05d}-{r:02d}.png" for j in range(3)
                                                                       for r in range(2)]


def test_compare_two_adapters_on_the_same_prompts_and_seeds(hub, single_run):
    info, tmp = hub
    out = tmp / "compare"
    nft = "hf:worstcoder/SD3.5M-DiffusionNFT-MultiReward"
    args = ARGS[:ARGS.index("--metrics") + 1] + ["pickscore", "clip_l14"] + ARGS[ARGS.index("--num-steps"):]
    result = run_metrics(*args, "--prompt-set", str(tmp / "prompts.txt"), "--compare", nft, "--out",
                         str(out / "results.json"), "--save-images", str(out / "images"), env=hub_env(info, tmp))
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    one = json.loads((single_run[0] / "results.json").read_text())
    assert list(results["difference"]) == ["pickscore", "clip_l14"]
    for name in results["difference"]:  # A is the single run again: same prompts, seeds and images
        assert results["a"]["metrics"][name] == pytest.approx(one["metrics"][name], rel=1e-5, abs=1e-5)
    assert results["b"]["checkpoint"] != results["a"]["checkpoint"] and "ttest_rel" in results["test"]
    index = {side: [json.loads(line) for line in (out / "images" / side / "index.jsonl").read_text().splitlines()]
             for side in ("a", "b")}
    assert [r["seed"] for r in index["a"]] == [r["seed"] for r in index["b"]] == [10, 11, 12, 13, 14, 15]
    assert [r["prompt"] for r in index["a"]] == [r["prompt"] for r in index["b"]]
    for name in results["difference"]:
        a, b = (np.array([r[name] for r in index[side]]).reshape(3, 2).mean(1) for side in ("a", "b"))
        d = a - b
        assert np.abs(d).max() > 0  # different adapters, different images
        half = 4.302652729749462 * d.std(ddof=1) / np.sqrt(3)
        t = d.mean() / (d.std(ddof=1) / np.sqrt(3))
        p = 1 - abs(t) / np.sqrt(2 + t * t)  # two-sided p of Student's t with 2 degrees of freedom, closed form
        diff = results["difference"][name]
        assert diff["mean_difference"] == pytest.approx(d.mean(), rel=1e-5, abs=1e-6)
        assert diff["ci95"] == pytest.approx([d.mean() - half, d.mean() + half], rel=1e-4, abs=1e-6)
        assert diff["p_value"] == pytest.approx(p, rel=1e-4, abs=1e-6) and diff["n"] == 3
    assert "A - B" in result.stdout and "paired t-test over prompts" in result.stdout

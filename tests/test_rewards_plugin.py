"""Users' own rewards: a plug-in from a file outside the repository trains, is logged and scored by metrics.py; bad
plug-ins are one clear error before anything exists; the two example plug-ins against independent computations."""

import dataclasses
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fdfo import train_loop
from fdfo.config import check_config
from fdfo.evaluation import EvalConfig, evaluate
from rewards import RewardConfig, build_from_specs, build_metrics
from tests.test_train import _adapter, read_log, tiny_config

ROOT = Path(__file__).resolve().parents[1]

PLUGIN = textwrap.dedent(
    """
    import json, os, torch

    LOG = os.path.join(os.path.dirname(__file__), "calls.jsonl")

    def _note(**record):
        with open(LOG, "a") as f:
            f.write(json.dumps(record) + "\\n")

    class Greenness:
        '''Mean of the green channel; notes how it is built and called.'''

        def __init__(self, device="cpu"):
            _note(built=str(device))

        def to(self, device):
            _note(moved=str(device))
            return self

        def __call__(self, prompts, images):
            _note(batch=len(prompts), grad=torch.is_grad_enabled())
            return images[:, 1].mean(dim=(1, 2))

    def make_blueness():  # a factory
        class Blue:
            name = "blue"
            def __call__(self, prompts, images):
                return images[:, 2].mean(dim=(1, 2))
        return Blue()

    def wrong_shape(prompts, images):  # a plain reward function
        return images.mean(dim=(1, 2))

    def wrong_dtype(prompts, images):
        return torch.zeros(len(prompts), dtype=torch.int64)

    def wrong_device(prompts, images):
        return torch.zeros(len(prompts), device="meta")

    def a_list(prompts, images):
        return [0.0] * len(prompts)

    def nan_for_second(prompts, images):
        scores = images[:, 0].mean(dim=(1, 2)).clone()
        scores[1] = float("nan")
        return scores

    class Named:
        name = "reward"
        def __call__(self, prompts, images):
            return images.mean(dim=(1, 2, 3))

    NOT_CALLABLE = 3
    """
)


@pytest.fixture
def plugin(tmp_path):
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "my_rewards.py").write_text(PLUGIN)
    return folder / "my_rewards.py"


def calls(path):
    return [json.loads(line) for line in (path.parent / "calls.jsonl").read_text().splitlines()]


def test_plugin_trains_is_logged_recorded_and_scored_by_metrics(tmp_path, plugin, capsys):
    specs = ("redness:1.0", f"plugin:0.5:{plugin}:Greenness")
    cfg = tiny_config(tmp_path / "run", num_epochs=1)
    cfg.reward = RewardConfig(specs=specs, chunk_size=3)
    train_loop.train(cfg)
    epoch = [r for r in read_log(tmp_path / "run") if "reward_mean" in r][0]
    assert epoch["reward_mean"] == pytest.approx(epoch["redness_mean"] + 0.5 * epoch["greenness_mean"], abs=1e-6)
    assert 0.2 < epoch["greenness_mean"] < 0.8
    record = calls(plugin)
    assert [r for r in record if "built" in r] == [{"built": "cpu"}]  # built once, with the device
    batches = [r for r in record if "batch" in r]
    assert all(r["batch"] <= 3 and not r["grad"] for r in batches)  # chunks of --reward.chunk-size, no gradients
    # the probe's 2 images, the held-out evaluation of the starting model (tiny_config's 2 prompts), the epoch's 4 pairs
    assert sum(r["batch"] for r in batches) == 2 + cfg.eval.num_prompts + 8 and cfg.eval.num_prompts == 2
    assert json.loads((tmp_path / "run/config.json").read_text())["reward"]["specs"] == list(specs)

    # resume refuses another reward (and writes nothing)
    changed = RewardConfig(specs=(specs[0], f"plugin:0.25:{plugin}:Greenness"))
    other = dataclasses.replace(cfg, num_epochs=2, reward=changed)
    with pytest.raises(ValueError, match="cannot resume .*--reward.specs"):
        train_loop.train(other)

    # metrics.py: the same plug-in (weight 1) and the analytic rewards as metrics, on the trained adapter vs the base
    checkpoint = str(tmp_path / "run/checkpoints/epoch-0000001")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red car\na green field\na blue lake\n")
    metrics = ("redness", "brightness", f"plugin:1:{plugin}:Greenness")
    results = evaluate(EvalConfig(checkpoint=checkpoint, compare="base", prompt_set=str(prompts), num_prompts=3,
                                  num_repeats=2, metrics=metrics, num_steps=2, resolution=64, batch_size=4,
                                  save_images=str(tmp_path / "images"), device="cpu"))
    table = capsys.readouterr().out
    assert list(results["difference"]) == ["redness", "brightness", "greenness"]
    for side in ("a", "b"):  # each metric equals its formula on the saved 8-bit images, per prompt
        index = [json.loads(line) for line in (tmp_path / "images" / side / "index.jsonl").read_text().splitlines()]
        pixels = np.stack([np.asarray(Image.open(tmp_path / "images" / side / r["file"])) for r in index]) / 255
        expected = {"redness": (pixels[..., 0] - (pixels[..., 1] + pixels[..., 2]) / 2).mean((1, 2)),
                    "brightness": pixels.mean((1, 2, 3)), "greenness": pixels[..., 1].mean((1, 2))}
        for name, values in expected.items():
            assert [r[name] for r in index] == pytest.approx(values, abs=1e-6)
            assert results[side]["metrics"][name] == pytest.approx(values.mean(), abs=1e-6)
            per_prompt = values.reshape(3, 2).mean(1)
            half = 4.302652729749462 * per_prompt.std(ddof=1) / np.sqrt(3)  # t(0.975, 2 dof)
            assert results[side]["stats"][name]["ci95"] == pytest.approx([per_prompt.mean() - half,
                                                                          per_prompt.mean() + half], abs=1e-6)
    for name in metrics[:2] + ("greenness",):
        a, b = results["a"]["metrics"][name], results["b"]["metrics"][name]
        assert results["difference"][name]["mean_difference"] == pytest.approx(a - b, abs=1e-6)
        assert name in table
    assert results["difference"]["redness"]["mean_difference"] != 0  # the trained adapter changes the images


def test_plugin_forms_factory_module_and_names(plugin, monkeypatch):
    monkeypatch.syspath_prepend(str(plugin.parent))
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    reward = build_from_specs([f"plugin:2:{plugin}:make_blueness", "plugin:1:my_rewards:Greenness",
                               "plugin:1:rewards.examples.jpeg:JpegCompressibility"], RewardConfig(), "cpu")
    assert reward.names == ("blue", "greenness", "jpeg_compressibility")
    parts = reward.components(["a"] * 3, images)
    assert torch.equal(parts["blue"], images[:, 2].mean(dim=(1, 2)))
    assert torch.allclose(parts["reward"], 2 * parts["blue"] + parts["greenness"] + parts["jpeg_compressibility"])
    twice = build_metrics(["brightness", f"plugin:1:{plugin}:Greenness", f"plugin:1:{plugin}:Greenness"],
                          RewardConfig(), "cpu")
    assert twice.names == ("brightness", "greenness", "greenness_2")
    with pytest.raises(ValueError, match="metrics are raw scores, unweighted; write the weight as 1"):
        build_metrics([f"plugin:0.5:{plugin}:Greenness"], RewardConfig(), "cpu")


@pytest.mark.parametrize("target, error, fragments", [
    ("no_such_file.py:Greenness", FileNotFoundError, ["no_such_file.py", "does not exist"]),
    ("no_such_pkg.rewards:Greenness", ValueError, ["no module named 'no_such_pkg.rewards'"]),
    ("{file}:Missing", ValueError, ["has no attribute 'Missing'", "Greenness"]),
    ("{file}:NOT_CALLABLE", ValueError, ["NOT_CALLABLE", "is a int, not callable"]),
    ("{file}", ValueError, ["plugin:WEIGHT:path/to/file.py:Attr"]),
    ("{file}:wrong_shape", ValueError, ["shape [2, 64] ", "for 2 images", "shape [2] on cpu"]),
    ("{file}:wrong_dtype", ValueError, ["torch.int64 tensor", "a float tensor"]),
    ("{file}:wrong_device", ValueError, ["on meta for 2 images", "on cpu"]),
    ("{file}:a_list", ValueError, ["returned a list"]),
    ("{file}:Named", ValueError, ["name 'reward' cannot be a log key"]),
])
def test_bad_plugins_are_clear_errors(plugin, target, error, fragments):
    spec = f"plugin:1:{target.format(file=plugin)}"
    with pytest.raises(error) as raised:
        build_from_specs([spec], RewardConfig(), "cpu")
    for fragment in [spec.split(":", 2)[2] if "{file}" not in target else "plugin:1:", *fragments]:
        assert fragment in str(raised.value)


def test_nan_scores_of_a_plugin_are_invalid_pairs(tmp_path, plugin):
    cfg = tiny_config(tmp_path / "run")
    cfg.reward = RewardConfig(specs=(f"plugin:1:{plugin}:nan_for_second",))
    train_loop.train(cfg)
    epoch = [r for r in read_log(tmp_path / "run") if "reward_mean" in r][0]
    assert epoch["invalid_pairs"] == 1  # one call scores the epoch's 4 pairs: the first pair's second sample is NaN
    assert all(torch.isfinite(v).all() for v in _adapter(tmp_path / "run", 1).values())


def test_a_bad_plugin_stops_train_py_before_the_run_folder_exists(tmp_path, plugin):
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--preset", "smoke", "--run-dir", str(run_dir),
                             "--reward.specs", f"plugin:1:{plugin}:Missing"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "has no attribute 'Missing'" in errors[0] and not run_dir.exists()
    with pytest.raises(ValueError, match="has no attribute 'Missing'"):  # found by the flag checks, before any load
        missing = RewardConfig(specs=(f"plugin:1:{plugin}:Missing",))
        check_config(dataclasses.replace(tiny_config(run_dir), reward=missing))


def test_a_wrong_answer_stops_training_before_sd3_loads(tmp_path, plugin, monkeypatch):
    def no_policy(*args):
        raise AssertionError("the SD3 policy was built before the reward was checked")

    monkeypatch.setattr(train_loop, "build_policy", no_policy)
    specs = (f"plugin:1:{plugin}:wrong_shape",)
    cfg = dataclasses.replace(tiny_config(tmp_path / "run"), reward=RewardConfig(specs=specs))
    check_config(cfg)  # the import and the attribute are fine: only the probe call tells
    with pytest.raises(ValueError, match="wrong_shape' returned a torch.float32 tensor of shape"):
        train_loop.train(cfg)
    assert not (tmp_path / "run").exists()


def test_jpeg_compressibility_is_minus_the_quality_95_size_in_kb():
    from rewards.examples.jpeg import JpegCompressibility

    images = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(1))
    images[1] = 0.5  # a flat image compresses far better
    expected = []
    for image in images:
        array = np.round(image.permute(1, 2, 0).numpy() * 255).clip(0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, "JPEG", quality=95)
        expected.append(-len(buffer.getvalue()) / 1000)
    scores = JpegCompressibility()(["a", "b"], images)
    assert scores.dtype == torch.float32 and scores.tolist() == pytest.approx(expected, abs=1e-6)
    assert scores[1] > scores[0]


AESTHETIC_CHILD = textwrap.dedent(
    """
    import json, torch
    from rewards import RewardConfig, build_from_specs
    images = torch.randint(0, 256, (3, 3, 40, 40), generator=torch.Generator().manual_seed(0)).float() / 255
    reward = build_from_specs(["plugin:1:rewards/examples/aesthetic.py:Aesthetic"], RewardConfig(), "cpu")
    print(json.dumps(reward.components(["a", "b", "c"], images)["aesthetic"].tolist()))
    """
)


@pytest.mark.slow  # ~10 s: a subprocess (the hub reads its cache settings at import) and two tiny CLIP loads
def test_aesthetic_example_loads_a_clip_and_a_head_from_the_hub_offline(tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    from rewards.examples.aesthetic import AestheticHead
    from tests.tiny_rewards import build_fake_hf_cache, save_tiny_clip

    torch.manual_seed(7)
    state = {k: torch.randn_like(v) * 0.3 for k, v in AestheticHead(16).state_dict().items()}  # tiny CLIP: 16-d

    def head(folder):
        folder.mkdir(parents=True)
        torch.save(state, folder / "aesthetic-model.pth")

    def clip(folder):
        save_tiny_clip(folder, seed=3)

    cache = build_fake_hf_cache(tmp_path / "hub", {"openai/clip-vit-large-patch14": clip,
                                                   "trl-lib/ddpo-aesthetic-predictor": head})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "home"),
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", AESTHETIC_CHILD], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    scores = json.loads(result.stdout.strip().splitlines()[-1])

    # independently: the CLIP from its folder, its image embedding normalised, the five Linear layers by hand
    root = cache / "models--openai--clip-vit-large-patch14"
    folder = root / "snapshots" / (root / "refs/main").read_text()
    images = torch.randint(0, 256, (3, 3, 40, 40), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    pixels = CLIPProcessor.from_pretrained(folder).image_processor(images=list(images), return_tensors="pt",
                                                                   input_data_format="channels_first").pixel_values
    with torch.no_grad():
        x = CLIPModel.from_pretrained(folder).get_image_features(pixel_values=pixels).pooler_output
        x = x / x.norm(dim=-1, keepdim=True)
        for i in (0, 2, 4, 6, 7):
            x = x @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    assert scores == pytest.approx(x.squeeze(-1).tolist(), abs=1e-5)
    assert max(scores) - min(scores) > 1e-3  # the images are told apart

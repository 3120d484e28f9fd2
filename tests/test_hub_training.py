"""The real loading path: train.py with the published hub ids, resolved offline from a fake Hugging Face cache that
holds tiny models of the same architectures (SD3.5-M pipeline, PickScore + its laion processor, Qwen2.5-VL-7B)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from fdfo.models import tiny_sd3 as tiny
from fdfo.models.sd3 import SD35_MEDIUM
from tests.tiny_rewards import build_fake_hf_cache, tiny_reward_repos

ROOT = Path(__file__).resolve().parents[1]


def test_combined_reward_training_through_the_real_hub_ids(tmp_path):
    wanted = ("yuvalkirstain/PickScore_v1", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "Qwen/Qwen2.5-VL-7B-Instruct")
    repos = {k: v for k, v in tiny_reward_repos().items() if k in wanted}
    repos[SD35_MEDIUM] = lambda folder: shutil.copytree(tiny.tiny_sd3_path(), folder)
    cache = build_fake_hf_cache(tmp_path / "hub", repos)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "hf-home")}
    # The smoke preset with the paper's model id and reward preset: nothing builtin, everything through the hub cache.
    # Its held-out evaluation (epoch 0) samples an SD3.5-M id as the protocol does, 40 steps at 512 px: 2 prompts, not
    # the preset's 16 (27 s), still score through the hub-loaded terms.
    args = ["--preset", "smoke", "--pretrained-model", SD35_MEDIUM, "--reward-preset", "combined", "--num-epochs", "1",
            "--total-pairs-per-epoch", "4", "--sample.num-solver-steps", "2", "--eval.num-prompts", "2",
            "--run-dir", str(tmp_path / "run")]
    result = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run/log.jsonl").read_text().splitlines()]
    epoch = records[-1]
    assert {"pickscore_mean", "vlm_alignment_mean", "reward_mean"} <= set(epoch)
    # the logged total is the preset's weighting of the logged components (means are linear)
    assert abs(epoch["reward_mean"] - (epoch["pickscore_mean"] + 0.1 * epoch["vlm_alignment_mean"])) < 1e-4
    assert 0 < epoch["vlm_alignment_mean"] < 100
    (heldout,) = [r for r in records if "heldout_reward_mean" in r]
    assert heldout["epoch"] == 0 and heldout["heldout_num_prompts"] == 2
    assert abs(heldout["heldout_reward_mean"] - (heldout["heldout_pickscore_mean"]
                                                 + 0.1 * heldout["heldout_vlm_alignment_mean"])) < 1e-4

    # an id missing from the cache is one clear message, not a traceback
    args[args.index(SD35_MEDIUM)] = "stabilityai/stable-diffusion-3.5-large"
    result = subprocess.run([sys.executable, "train.py", *args[:-1], str(tmp_path / "run2")], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "could not load the SD3 pipeline 'stabilityai/stable-diffusion-3.5-large'" in result.stderr
    assert not (tmp_path / "run2").exists()

"""Loading rewards by their real hub ids from a (fake) offline Hugging Face cache, and the not-found message.

huggingface_hub reads HF_HUB_OFFLINE / HF_HUB_CACHE when it is imported, so the loading runs in a subprocess whose
environment sets them; it prints its scores as JSON, which the test compares with the same models loaded by folder.
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import torch

from rewards import RewardConfig, build_reward
from tests.tiny_rewards import build_fake_hf_cache, tiny_reward_repos

REPO = pathlib.Path(__file__).resolve().parents[1]
COMBINED_IDS = ("yuvalkirstain/PickScore_v1", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "Qwen/Qwen2.5-VL-7B-Instruct")

CHILD = textwrap.dedent(
    """
    import json, sys, torch
    from rewards import RewardConfig, build_reward
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    reward = build_reward("combined", RewardConfig(), "cpu")
    parts = reward.components(["a photo of a cat", 'a "red" car'], images)
    errors = {}
    for field, value in [("vlm_model", "Qwen/Qwen2.5-VL-3B-Instruct"), ("pickscore_model", "/no/such/folder")]:
        try:
            build_reward("combined", RewardConfig(**{field: value}), "cpu")
        except FileNotFoundError as error:
            errors[field] = str(error)
    print(json.dumps({"parts": {k: v.tolist() for k, v in parts.items()}, "errors": errors}))
    """
)



def snapshot(cache: pathlib.Path, repo_id: str) -> str:
    org, name = repo_id.split("/")
    root = cache / f"models--{org}--{name}"
    return str(root / "snapshots" / (root / "refs" / "main").read_text())


def test_combined_loads_by_real_ids_offline_and_missing_ids_say_how_to_fetch(tmp_path):
    cache = build_fake_hf_cache(tmp_path / "hub", {i: b for i, b in tiny_reward_repos().items() if i in COMBINED_IDS})
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(cache),
        "HF_HOME": str(tmp_path / "hf_home"),  # no user token or settings leak in
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(
        [sys.executable, "-c", CHILD], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    child = json.loads(result.stdout.strip().splitlines()[-1])

    # The same tiny models loaded from their snapshot folders give the same scores: the ids resolved to them.
    pickscore, laion, qwen = (snapshot(cache, repo_id) for repo_id in COMBINED_IDS)
    by_folder = RewardConfig(pickscore_model=pickscore, pickscore_processor=laion, vlm_model=qwen)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    parts = build_reward("combined", by_folder, "cpu").components(["a photo of a cat", 'a "red" car'], images)
    assert set(child["parts"]) == {"pickscore", "vlm_alignment", "reward"}
    for name, values in child["parts"].items():
        torch.testing.assert_close(torch.tensor(values), parts[name], rtol=1e-5, atol=1e-5)

    missing = child["errors"]["vlm_model"]
    assert "'Qwen/Qwen2.5-VL-3B-Instruct'" in missing and "HF_HUB_OFFLINE" in missing
    assert "hf download Qwen/Qwen2.5-VL-3B-Instruct" in missing and "--reward.vlm-model" in missing
    assert "'/no/such/folder'" in child["errors"]["pickscore_model"]
    assert "does not exist" in child["errors"]["pickscore_model"]
    assert "--reward.pickscore-model" in child["errors"]["pickscore_model"]

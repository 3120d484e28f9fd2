"""The VLM reward sharded with FSDP over two CPU processes (gloo) scores like the unsharded model.

The test launches this file under `torchrun --nproc_per_node=2`; each rank writes its results to a JSON file. Rank 0
scores three images and rank 1 one (chunk size 2), so rank 1 must run a dummy chunk to keep FSDP's collectives in
step, which is what `VLMScorer` promises. Two models: untied LM head (like Qwen2.5-VL-7B) and tied (like 3B).
"""

import json
import os
import pathlib
import subprocess
import sys

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
PROMPTS = ["a photo of a cat", 'a "red" car at night ☕', "an oil painting of a boat"]
MODELS = ("untied", "tied")


def worker(root: str) -> None:
    """One rank: build each reward through `build_from_specs` (vlm_fsdp=None resolves to on), compare with the
    unsharded model on the same images, report whether parameters really are sharded."""
    sys.path.insert(0, str(REPO))
    from torch.distributed.tensor import DTensor

    from fdfo import distributed
    from rewards import RewardConfig, build_from_specs
    from rewards.vlm import ALIGNMENT_QUESTION, VLMScorer

    torch.set_num_threads(1)
    device = distributed.init("cpu")
    rank = distributed.get_rank()
    count = 3 if rank == 0 else 1
    images = torch.rand(3, 3, 96, 96, generator=torch.Generator().manual_seed(7))[rank : rank + count]
    prompts = PROMPTS[rank : rank + count]
    result = {}
    for name in MODELS:
        model_dir = str(pathlib.Path(root, name))
        cfg = RewardConfig(vlm_model=model_dir, chunk_size=2)
        with distributed.rank0_first():  # as train.py builds it: rank 0 fills the hub cache, then the others load
            sharded = build_from_specs(["vlm_alignment:1.0"], cfg, device).terms[0].scorer
        plain = VLMScorer.load(model_dir, device="cpu", chunk_size=2, question=ALIGNMENT_QUESTION, fsdp=False)
        weight = sharded.model.model.language_model.layers[0].mlp.up_proj.weight
        result[name] = {
            "sharded": sharded.sharded,
            "is_dtensor": isinstance(weight, DTensor),
            "local_rows": weight.to_local().shape[0] if isinstance(weight, DTensor) else weight.shape[0],
            "full_rows": plain.model.model.language_model.layers[0].mlp.up_proj.weight.shape[0],
            "got": sharded(prompts, images).tolist(),
            "expected": plain(prompts, images).tolist(),
        }
    pathlib.Path(root, f"rank{rank}.json").write_text(json.dumps(result))
    distributed.shutdown()


# ~15-25 s on two shared cores (torchrun, two processes, two models): kept in the default suite, it is the only
# check of the FDFO sharding path that CI can run
def test_fsdp_sharded_vlm_on_two_cpu_processes(tmp_path):
    from tests.tiny_rewards import save_tiny_qwen_vl

    for name in MODELS:
        save_tiny_qwen_vl(tmp_path / name, seed=5, tie_word_embeddings=name == "tied")
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
               str(tmp_path)]
    result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for name in MODELS:
        outs = [ranks[0][name], ranks[1][name]]
        assert sum(out["local_rows"] for out in outs) == outs[0]["full_rows"]  # each rank holds its part
        for out, count in zip(outs, (3, 1)):
            assert out["sharded"] and out["is_dtensor"] and out["local_rows"] < out["full_rows"]
            assert len(out["got"]) == count
            torch.testing.assert_close(torch.tensor(out["got"]), torch.tensor(out["expected"]), rtol=1e-5, atol=1e-5)


if __name__ == "__main__":
    worker(sys.argv[1])

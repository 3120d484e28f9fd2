"""The training loop on the tiny offline SD3 pipeline: LoRA init, what a step changes, exact resume, bad rewards."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from fdfo import train_loop
from fdfo.config import smoke_config
from fdfo.errors import RunError
from fdfo.models.sd3 import SD3Policy


def tiny_config(run_dir, **overrides):
    """The smoke preset shrunk to seconds: 4 pairs, 3 solver steps, 2 optimizer steps per epoch; its held-out
    evaluation (epoch 0 and every 4 epochs) on 2 of its 16 prompts."""
    cfg = smoke_config()
    cfg.run_dir = str(run_dir)
    cfg.total_pairs_per_epoch = 4
    cfg.gradient_steps_per_epoch = 2
    cfg.sample.num_solver_steps = 3
    cfg.image_log_freq = 0
    cfg.num_epochs = 1
    cfg.save_freq = 1
    cfg.eval.num_prompts = 2
    return dataclasses.replace(cfg, **overrides)


def read_log(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_lora_starts_as_the_base_model():
    from diffusers import StableDiffusion3Pipeline

    from fdfo.models import tiny_sd3 as tiny

    torch.manual_seed(0)
    policy = SD3Policy(tiny.TINY_SD3, torch.device("cpu"), lora_rank=4, lora_alpha=8)
    base = StableDiffusion3Pipeline.from_pretrained(str(tiny.tiny_sd3_path())).transformer
    cond = policy.encode(["a red apple", "a blue boat"])
    x = torch.randn(2, *policy.latent_shape(64))
    sigma = torch.tensor([0.9, 0.3])
    expected = base(hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=cond["embeds"],
                    pooled_projections=cond["pooled"], return_dict=False)[0]
    assert torch.equal(policy.velocity(x, sigma, cond), expected)
    lora = policy.adapter_state()
    assert len(lora) > 0 and all(p.dtype == torch.float32 for p in policy.trainable_parameters())
    assert all((v == 0).all() for k, v in lora.items() if "lora_B" in k)
    assert all((v != 0).any() for k, v in lora.items() if "lora_A" in k)


def test_training_changes_every_lora_tensor_and_no_base_weight(tmp_path):
    captured = {}
    original = train_loop.build_policy

    def spy(cfg, device):
        policy = original(cfg, device)
        captured["policy"] = policy
        captured["lora"] = {k: v.clone() for k, v in policy.adapter_state().items()}
        captured["base"] = {k: v.clone() for k, v in policy.transformer.named_parameters() if "lora_" not in k}
        return policy

    cfg = tiny_config(tmp_path / "run")
    cfg.train.weight_decay = 0.0  # so that a change can only come from the gradient
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_loop, "build_policy", spy)
        train_loop.train(cfg)
    policy = captured["policy"]
    after = policy.adapter_state()
    assert set(after) == set(captured["lora"])
    unchanged = sorted(k for k, v in after.items() if torch.equal(v, captured["lora"][k]))
    # Two optimizer steps: B moves at step 1, A (whose gradient needs B != 0) at step 2. The one exception is the
    # context query of the last block: that block is context_pre_only, its context output is discarded, so
    # add_q_proj cannot affect the velocity and its LoRA gets exactly zero gradient (true of SD3.5-M as well).
    last = policy.pipe.transformer.config.num_layers - 1
    assert unchanged == sorted(k for k in after if f"transformer_blocks.{last}.attn.add_q_proj.lora_" in k)
    for k, v in policy.transformer.named_parameters():
        if "lora_" not in k:
            assert torch.equal(v, captured["base"][k]), k
    saved = load_file(tmp_path / "run/checkpoints/epoch-0000001/adapter_model.safetensors")
    assert len(saved) == len(after)
    records = read_log(tmp_path / "run")
    steps = [r for r in records if "policy_loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(0 <= r["clipfrac"] <= 1 for r in steps)
    epoch = [r for r in records if "reward_mean" in r]
    assert len(epoch) == 1 and epoch[0]["invalid_pairs"] == 0 and epoch[0]["time_total"] > 0


def _adapter(run_dir, epoch):
    return load_file(run_dir / f"checkpoints/epoch-{epoch:07d}/adapter_model.safetensors")


def test_resume_is_exact(tmp_path, no_reward_curve):
    train_loop.train(tiny_config(tmp_path / "a", num_epochs=2))
    train_loop.train(tiny_config(tmp_path / "b", num_epochs=1))
    train_loop.train(tiny_config(tmp_path / "b", num_epochs=2))  # same --run-dir: resumes after epoch 1
    a, b = _adapter(tmp_path / "a", 2), _adapter(tmp_path / "b", 2)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], _adapter(tmp_path / "a", 1)[k]) for k in a)
    # an explicit --resume-from into a fresh folder gives the same result
    train_loop.train(tiny_config(tmp_path / "c", num_epochs=2,
                                 resume_from=str(tmp_path / "b/checkpoints/epoch-0000001")))
    c = _adapter(tmp_path / "c", 2)
    assert all(torch.equal(a[k], c[k]) for k in a)
    state = json.loads((tmp_path / "b/checkpoints/epoch-0000002/state.json").read_text())
    assert state["epoch"] == 2 and state["global_step"] == 4 and state["prompt_position"] == 8


def test_damaged_checkpoint_is_a_loud_error(tmp_path):
    train_loop.train(tiny_config(tmp_path / "run"))
    (tmp_path / "run/checkpoints/epoch-0000001/training_state.pt").unlink()
    with pytest.raises(ValueError, match="incomplete or damaged: missing training_state.pt"):
        train_loop.train(tiny_config(tmp_path / "run", num_epochs=2))


class _NaNReward:
    """Brightness, except that the listed samples score NaN / inf."""

    def __init__(self, bad):
        self.bad = bad

    def components(self, prompts, images):
        r = images.mean(dim=(1, 2, 3))
        for i in self.bad:
            if i < len(r):  # a held-out evaluation's batch may be smaller
                r[i] = float("nan") if i % 2 else float("inf")
        return {"brightness": r, "reward": r}

    def offload(self):
        return self


def test_non_finite_rewards_drop_their_pair(tmp_path, monkeypatch):
    heldout = smoke_config().eval  # the preset's 16 held-out prompts: its evaluation at epoch 0 scores NaN / inf too
    monkeypatch.setattr(train_loop, "build_reward_model", lambda cfg, device: _NaNReward([1, 4]))
    train_loop.train(tiny_config(tmp_path / "run", eval=heldout))
    epoch = [r for r in read_log(tmp_path / "run") if "reward_mean" in r][0]
    assert epoch["invalid_pairs"] == 2
    assert all(torch.isfinite(v).all() for v in _adapter(tmp_path / "run", 1).values())

    monkeypatch.setattr(train_loop, "build_reward_model", lambda cfg, device: _NaNReward(range(8)))
    with pytest.raises(RunError, match="all 4 pairs got a non-finite reward"):
        train_loop.train(tiny_config(tmp_path / "run2", eval=heldout))


def test_the_run_says_where_it_writes_and_sums_up_at_the_end(tmp_path, capsys):
    run = tmp_path / "run"
    train_loop.train(tiny_config(run, num_epochs=2, image_log_freq=1, image_log_pairs=1))
    out = capsys.readouterr().out.splitlines()
    epochs = [r for r in read_log(run) if "reward_mean" in r]
    start = out.index(f"run folder: {run}")
    assert start < min(i for i, line in enumerate(out) if line.startswith("epoch 0: "))
    a, b = epochs[0]["reward_mean"], epochs[-1]["reward_mean"]
    h = [r for r in read_log(run) if "heldout_reward_mean" in r][0]["heldout_reward_mean"]  # the smoke preset's
    assert out[-6:] == [
        f"done: {run}",
        f"  reward (mean over the epoch's samples): {a:.4g} at epoch 0 -> {b:.4g} at epoch 1 ({b - a:+.4g})",
        f"  held-out reward (2 prompts): {h:.4g} at epoch 0 -> {h:.4g} at epoch 0; no best.json (no evaluated "
        f"checkpoint)",
        f"  newest checkpoint: {run / 'checkpoints' / 'epoch-0000002'}",
        f"  reward curve: {run / 'reward_curve.png'}",
        f"  rollout pairs: {run / 'images'}/ (2 pictures, epochs 0, 1)",
    ]
    assert (run / "reward_curve.png").is_file() and len(list((run / "images").glob("epoch-*.png"))) == 2
    assert (run / "images/heldout-epoch-0000000.png").is_file()  # the starting model's held-out grid
    state = json.loads((run / "checkpoints" / "epoch-0000002" / "state.json").read_text())
    assert (state["resolution"], state["num_solver_steps"]) == (64, 3)  # what generate.py samples it at by default

"""FLUX through the entry points, on the tiny FLUX: train.py (and its held-out evaluation), generate.py, metrics.py
and the export, whose file FluxPipeline.load_lora_weights loads into the same images; the guidance flag's meaning per
model; a checkpoint of one model family refused on another."""

import json

import pytest
import torch

from fdfo import train_loop
from fdfo.config import PRESETS, smoke_config
from tests.lora_by_hand import merge_by_hand

CPU = torch.device("cpu")
PROMPTS = ["a red apple on a table", "a blue boat at sunset"]


def _tiny_flux_run(run_dir, **eval_settings):
    """--preset smoke_flux shrunk to seconds: 4 pairs, 3 steps, 1 epoch."""
    cfg = PRESETS["smoke_flux"]()
    cfg.run_dir, cfg.total_pairs_per_epoch, cfg.num_epochs, cfg.image_log_freq = str(run_dir), 4, 1, 0
    cfg.sample.num_solver_steps = 3
    cfg.eval.every = 0
    for key, value in eval_settings.items():
        setattr(cfg.eval, key, value)
    return cfg


@pytest.fixture(scope="module")
def flux_run(tmp_path_factory):
    """One tiny smoke_flux run with a held-out evaluation after its epoch (2 prompts)."""
    run_dir = tmp_path_factory.mktemp("flux") / "run"
    train_loop.train(_tiny_flux_run(run_dir, every=1, num_prompts=2))
    return run_dir


def test_smoke_flux_is_the_smoke_preset_on_the_tiny_flux():
    flux, smoke = PRESETS["smoke_flux"](), smoke_config()
    assert (flux.pretrained_model, flux.preset, flux.run_name) == ("builtin:tiny-flux", "smoke_flux", "smoke_flux")
    assert (flux.train.learning_rate, flux.total_pairs_per_epoch) == (3e-3, 48)  # the tiny FLUX's (its docstring)
    flux.pretrained_model, flux.preset, flux.run_name = smoke.pretrained_model, smoke.preset, smoke.run_name
    flux.train.learning_rate, flux.total_pairs_per_epoch = smoke.train.learning_rate, smoke.total_pairs_per_epoch
    assert flux == smoke  # everything else as the smoke run, guidance left to the model (FLUX: 3.5)
    assert flux.sample.guidance_scale is None


def test_a_flux_run_records_its_model_and_distilled_guidance(flux_run):
    config = json.loads((flux_run / "config.json").read_text())
    assert (config["pretrained_model"], config["sample"]["guidance_scale"]) == ("builtin:tiny-flux", 3.5)
    state = json.loads((flux_run / "checkpoints" / "epoch-0000001" / "state.json").read_text())
    assert (state["model_family"], state["guidance_scale"], state["resolution"]) == ("flux", 3.5, 64)
    records = [json.loads(line) for line in (flux_run / "log.jsonl").read_text().splitlines()]
    heldout = [r for r in records if "heldout_reward_mean" in r]
    assert [r["epoch"] for r in heldout] == [0, 1] and all(0 < r["heldout_reward_mean"] < 1 for r in heldout)


def test_heldout_record_is_metrics_py_on_the_checkpoint(flux_run):
    """The held-out evaluation samples the run's policy through FluxPipeline exactly as metrics.py samples its
    checkpoint: the same redness for the same prompts and seeds."""
    from fdfo.evaluation import EvalConfig, evaluate

    records = [json.loads(line) for line in (flux_run / "log.jsonl").read_text().splitlines()]
    heldout = next(r for r in records if r.get("epoch") == 1 and "heldout_reward_mean" in r)
    cfg = smoke_config().eval
    results = evaluate(EvalConfig(checkpoint=str(flux_run / "checkpoints" / "epoch-0000001"), metrics=("redness",),
                                  prompt_set=cfg.prompts, num_prompts=2, seed=cfg.seed, device="cpu"))
    assert results["guidance_scale"] == 3.5 and (results["num_steps"], results["resolution"]) == (3, 64)
    assert results["metrics"]["redness"] == pytest.approx(heldout["heldout_reward_mean"], rel=1e-6, abs=1e-7)


def test_generate_py_samples_a_flux_checkpoint_with_flux_pipeline(flux_run, tmp_path):
    """generate.py's sampler is FluxPipeline itself with the checkpoint's unmerged LoRA: the same images as a fresh
    FluxPipeline with the adapter merged by hand, at the run's 64 px and 3 steps and its guidance 3.5."""
    from diffusers import FluxPipeline
    from safetensors.torch import load_file

    from fdfo.generation import describe, load_generator
    from fdfo.models.tiny_flux import tiny_flux_path

    gen = load_generator(str(flux_run))
    assert "guidance scale 3.5 (from the checkpoint's state.json), 3 Euler steps, 64 px" in describe(gen)
    assert type(gen.base.pipe).__name__ == "FluxPipeline"
    images = gen.generate(PROMPTS, [7, 8])
    pipe = FluxPipeline.from_pretrained(tiny_flux_path())
    pipe.set_progress_bar_config(disable=True)
    state = load_file(str(flux_run / "checkpoints" / "epoch-0000001" / "adapter_model.safetensors"))
    merge_by_hand(pipe.transformer, state, smoke_config().lora_alpha / smoke_config().lora_rank)
    expected = pipe(prompt=PROMPTS, generator=[torch.Generator().manual_seed(s) for s in (7, 8)], height=64,
                    width=64, num_inference_steps=3, guidance_scale=3.5, output_type="pt").images
    torch.testing.assert_close(images, expected, atol=1e-4, rtol=0)
    assert (images - load_generator(None, base=gen.base).generate(PROMPTS, [7, 8])).abs().max() > 1e-3


def test_export_loads_into_flux_pipeline_with_the_same_images(flux_run, tmp_path, capsys):
    from diffusers import FluxPipeline

    from fdfo.export import main
    from fdfo.generation import load_generator
    from fdfo.models.tiny_flux import tiny_flux_path

    out = tmp_path / "export"
    main([str(flux_run), str(out)])
    assert "load it with FluxPipeline.load_lora_weights" in capsys.readouterr().out
    ours = load_generator(str(flux_run)).generate(PROMPTS, [3, 4])
    pipe = FluxPipeline.from_pretrained(tiny_flux_path())
    pipe.set_progress_bar_config(disable=True)
    base = pipe(prompt=PROMPTS, generator=[torch.Generator().manual_seed(s) for s in (3, 4)], height=64, width=64,
                num_inference_steps=3, output_type="pt").images
    pipe.load_lora_weights(str(out))
    loaded = pipe(prompt=PROMPTS, generator=[torch.Generator().manual_seed(s) for s in (3, 4)], height=64, width=64,
                  num_inference_steps=3, output_type="pt").images
    torch.testing.assert_close(loaded, ours, atol=1e-5, rtol=0)
    assert (loaded - base).abs().max() > 1e-3  # the LoRA is loaded, not silently skipped


def test_a_checkpoint_is_refused_on_another_model_family(flux_run, tmp_path):
    from fdfo.generation import load_generator

    checkpoint = flux_run / "checkpoints" / "epoch-0000001"
    with pytest.raises(ValueError, match=rf"^checkpoint {checkpoint} is a LoRA of a FLUX model, not of the SD3 model "
                                         rf"builtin:tiny-sd3: pass --pretrained-model builtin:tiny-flux$"):
        load_generator(str(flux_run), pretrained_model="builtin:tiny-sd3")
    cfg = dataclass_copy(smoke_config(), run_dir=str(tmp_path / "sd3"), resume_from=str(checkpoint))
    with pytest.raises(ValueError, match=rf"^checkpoint {checkpoint} is a LoRA of a FLUX model, not of the SD3 model "
                                         rf"builtin:tiny-sd3: pass --pretrained-model builtin:tiny-flux$"):
        train_loop.train(cfg)
    assert not (tmp_path / "sd3").exists()  # refused before anything is written


def test_entry_points_refuse_another_family_in_one_line(flux_run, tmp_path):
    """generate.py, metrics.py and the export, as subprocesses: exit status 2, one `error:` line, no traceback, nothing
    written."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    checkpoint = flux_run / "checkpoints" / "epoch-0000001"
    expected = (f"error: checkpoint {checkpoint} is a LoRA of a FLUX model, not of the SD3 model builtin:tiny-sd3: "
                f"pass --pretrained-model builtin:tiny-flux")
    commands = {"generate.py": ["generate.py", "--checkpoint", str(flux_run), "--pretrained-model", "builtin:tiny-sd3",
                                "--out", str(tmp_path / "grid.png")],
                "metrics.py": ["metrics.py", "--checkpoint", str(checkpoint), "--pretrained-model", "builtin:tiny-sd3",
                               "--metrics", "redness", "--prompt-set", str(root / "prompt_sets" / "smoke_heldout.txt"),
                               "--num-prompts", "2", "--out", str(tmp_path / "m.json")]}
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    for name, argv in commands.items():
        proc = subprocess.run([sys.executable, *argv], cwd=root, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, (name, proc.stderr[-2000:])
        assert [line for line in proc.stderr.splitlines() if line.startswith("error: ")] == [expected], name
    assert not list(tmp_path.iterdir())


def test_an_unknown_model_family_in_state_json_is_refused(flux_run, tmp_path):
    """A state.json naming a family this version does not know: the export (as a subprocess) refuses it in one line
    before reading the adapter, as it refuses a damaged SHA-256."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    checkpoint = tmp_path / "epoch-0000001"
    shutil.copytree(flux_run / "checkpoints" / "epoch-0000001", checkpoint)
    state = json.loads((checkpoint / "state.json").read_text())
    (checkpoint / "state.json").write_text(json.dumps(dict(state, model_family="sdxl")))
    proc = subprocess.run([sys.executable, "-m", "fdfo.export", str(checkpoint), str(tmp_path / "out")],
                          cwd=Path(__file__).resolve().parents[1], env=dict(os.environ, HF_HUB_OFFLINE="1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert "state.json 'model_family' is 'sdxl', not one of sd3, flux" in line, line
    assert not (tmp_path / "out" / "pytorch_lora_weights.safetensors").exists()


def dataclass_copy(cfg, **changes):
    import dataclasses

    return dataclasses.replace(cfg, **changes)


def test_help_says_what_the_guidance_flag_means_for_each_model():
    import subprocess
    import sys

    for script, flag in (("train.py", "--sample.guidance-scale"), ("generate.py", "--guidance-scale"),
                         ("metrics.py", "--guidance-scale")):
        text = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True,
                              env={"COLUMNS": "80", "PATH": "", "HOME": "/tmp"}).stdout  # one column of options
        lines = [line.strip("│ ") for line in text.splitlines()]
        start = next(i for i, line in enumerate(lines) if line.startswith(flag + " "))
        end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("--"))
        help_text = " ".join(" ".join(lines[start + 1:end]).split())
        for said in ("SD3", "CFG", "FLUX", "distilled guidance", "3.5"):
            assert said in help_text, (script, help_text)


@pytest.mark.slow
def test_smoke_flux_preset_improves_the_reward(tmp_path):
    """python train.py --preset smoke_flux (about 4 CPU-minutes): the training reward rises by many standard errors
    of an epoch mean, and the held-out reward of the last epoch is above that of the base model, as the smoke run's."""
    import subprocess
    import sys
    from pathlib import Path

    run = tmp_path / "run"
    result = subprocess.run([sys.executable, "train.py", "--preset", "smoke_flux", "--run-dir", str(run)],
                            cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=2400)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    epochs = [r for r in records if "reward_mean" in r]
    first, last = epochs[0], epochs[-1]
    stderr = max(first["reward_std"], last["reward_std"]) / (2 * 48) ** 0.5
    assert len(epochs) == 16 and last["reward_mean"] - first["reward_mean"] > 4 * stderr, (first, last)
    heldout = [r for r in records if "heldout_reward_mean" in r]
    assert heldout[-1]["heldout_reward_mean"] - heldout[0]["heldout_reward_mean"] > heldout[0]["heldout_reward_ci95"]

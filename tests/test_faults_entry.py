"""The last gaps of the main entry points (train.py, generate.py, metrics.py, fdfo.export): an empty or foreign
--run-dir, a run folder that cannot be made, a rollout geometry that cannot fit, a negative seed, a non-finite guidance
scale, a modified adapter, a full disk while a picture is written, an over-long prompt, and an exception inside a
reward term. Bad input is one `error:` line before anything loads; a bug keeps its traceback."""

import errno
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fdfo import phases, prompts, runlog, safety, train_loop
from fdfo.checkpoints import state_problem
from fdfo.config import batch_geometry, smoke_config
from fdfo.errors import RunError
from fdfo.hub import resolve_checkpoint
from tests.test_faults_inputs import main_error
from tests.test_train import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def no_model_loads(monkeypatch):
    """Fail the test if train.py gets as far as loading the policy."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(train_loop, "load_policy", refuse)


# -- 1. --run-dir "" and a folder that is not a run's ------------------------------------------------------------------


def test_an_empty_run_dir_is_refused_and_nothing_is_written_in_the_current_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("mine\n")
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--preset", "smoke", "--run-dir", "",
                             "--prompt-file", str(ROOT / "prompt_sets/smoke.txt")], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: --run-dir '' is empty (an unset variable in a job script?); pass a folder path, or "
                      "leave --run-dir out for a new runs/<id>-smoke/"], result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_run_dir_holding_files_that_are_not_a_runs_is_refused(tmp_path, capsys, monkeypatch):
    no_model_loads(monkeypatch)
    folder = tmp_path / "project"
    folder.mkdir()
    for name in ("train.py", "README.md", "config.json"):
        (folder / name).write_text("x")
    line = main_error(capsys, "--run-dir", str(folder))
    assert line == (f"error: --run-dir {folder} is a folder holding files that are not a run's (README.md, train.py); "
                    f"pass a new or empty folder, or an earlier run's folder to resume it")
    assert "--run-dir '  ' is empty" in main_error(capsys, "--run-dir", "  ")  # whitespace only: empty too
    # an earlier run's folder, with what a killed run leaves behind, and an empty folder are accepted
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for name in ("config.json", "log.jsonl", ".lock", "reward_curve.png", "wandb_id.txt", ".log.jsonl.tmp-123",
                 ".reward_curve.png.tmp"):
        (run / name).write_text("x")
    (tmp_path / "empty").mkdir()
    for path in (run, tmp_path / "empty", tmp_path / "new"):
        train_loop.check_run_location(tiny_config(path))
    assert not (tmp_path / "new").exists() and not list(tmp_path.glob("*/.fdfo-probe-*"))  # the probe is removed


# -- 7. a run folder that cannot be made -------------------------------------------------------------------------------


@pytest.mark.parametrize("code, words", [(errno.EPERM, "Operation not permitted (EPERM)"),
                                         (errno.EACCES, "Permission denied (EACCES)"),
                                         (errno.EDQUOT, "the disk is full")])
def test_a_run_folder_that_cannot_be_made_is_one_line_before_the_models_load(tmp_path, capsys, monkeypatch, code,
                                                                              words):
    no_model_loads(monkeypatch)
    real_mkdir = os.mkdir

    def refused(path, *args, **kwargs):  # what root gets from an immutable folder, a read-only mount or a quota
        if str(path).startswith(str(tmp_path)):
            raise OSError(code, os.strerror(code), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", refused)
    line = main_error(capsys, "--run-dir", str(tmp_path / "a" / "run"))
    assert words in line and str(tmp_path / "a" / "run") in line, line
    monkeypatch.chdir(tmp_path)  # the default runs/ root too
    assert words in main_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_run_folder_that_fails_after_the_check_is_still_one_error(tmp_path, monkeypatch):
    def refused(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refused)
    with pytest.raises(RunError, match=f"cannot create the run folder {tmp_path}/run: Permission denied"):
        train_loop.prepare_run_dir(tiny_config(tmp_path / "run"), [])


# -- 5. rollouts that cannot fit ---------------------------------------------------------------------------------------


def test_a_geometry_whose_rollouts_exceed_host_memory_is_refused_before_any_model_loads(tmp_path, capsys, monkeypatch):
    no_model_loads(monkeypatch)
    line = main_error(capsys, "--total-pairs-per-epoch", "1000000000", "--run-dir", str(tmp_path / "run"))
    # 2e9 samples x 6 timesteps x 16x8x8 latents x (2 + 2) bytes = 49,152 GB (the smoke preset: 64 px, 6 steps)
    assert "--total-pairs-per-epoch 1000000000: the epoch's rollouts need at least 49,152 GB" in line, line
    assert "of host memory" in line and "--train.timesteps-per-sample" in line and "--sample.resolution" in line
    assert not (tmp_path / "run").exists()


def test_the_rollout_check_uses_the_gpu_or_the_host_memory(monkeypatch):
    cfg = smoke_config()  # the paper's 512 px and 40 steps, on one 80 GB GPU
    cfg.sample.resolution, cfg.sample.num_solver_steps, cfg.total_pairs_per_epoch = 512, 40, 432
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: type("P", (), {"total_memory": 80e9}))
    cuda = torch.device("cuda:0")
    phases.check_rollout_memory(cfg, batch_geometry(cfg, 1), cuda)  # 864 x 40 x 16x64x64 x 4 B = 9.06 GB: fits
    cfg.total_pairs_per_epoch = 4000  # 8000 x 40 x 65536 x 4 B = 83.9 GB > 80 GB
    with pytest.raises(ValueError, match=r"need at least 84 GB \(83\.9 GB per rank: 8,000 samples x 40 timesteps x "
                                         r"16x64x64 latents x 4 bytes\), more than the 80 GB of cuda:0's memory.*"
                                         r"--train.rollout-device cpu"):
        phases.check_rollout_memory(cfg, batch_geometry(cfg, 1), cuda)
    phases.check_rollout_memory(cfg, batch_geometry(cfg, 2), cuda)  # two GPUs: 41.9 GB each
    cfg.train.rollout_device = "cpu"
    monkeypatch.setattr(os, "sysconf", lambda name: {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 10**7}[name])  # 41 GB
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"need at least 84 GB .* of host memory \(2 ranks on this node\)"):
        phases.check_rollout_memory(cfg, batch_geometry(cfg, 2), cuda)


# -- 8. seeds and tyro's parse errors ----------------------------------------------------------------------------------


def test_a_negative_seed_and_every_parse_error_name_the_flag(tmp_path, capsys, monkeypatch):
    import train

    no_model_loads(monkeypatch)
    assert "--seed -5 is invalid: it must be >= 0" in main_error(capsys, "--seed", "-5", "--run-dir",
                                                                 str(tmp_path / "run"))
    for argv, flag in [(["--num-epochs", "abc"], "--num-epochs"), (["--train.betas", "0.9"], "--train.betas"),
                       (["--algorithm", "bogus"], "--algorithm"), (["--seed"], "--seed"),
                       (["--sample.guidance-scale", "x"], "--sample.guidance-scale")]:
        with pytest.raises(SystemExit) as info:
            train.main(["--preset", "smoke", *argv])
        assert info.value.code == 2 and flag in capsys.readouterr().err, argv
    assert not (tmp_path / "run").exists()


# -- 2, 4, 8: generate.py, metrics.py and fdfo.export on a modified adapter or a bad guidance scale --------------------

DRIVER = r"""
import contextlib, io, json, sys, traceback
import generate, metrics
from fdfo import export
out = []
for tool, argv in json.loads(sys.argv[1]):
    err, code = io.StringIO(), 0
    with contextlib.redirect_stderr(err):
        try:
            {"generate": generate.main, "metrics": metrics.main, "export": export.main}[tool](argv)
        except SystemExit as e:
            code = e.code
        except BaseException:
            code, _ = "traceback", traceback.print_exc()
    out.append([code, err.getvalue()])
print(json.dumps(out))
"""


def fake_checkpoint(folder, adapter=b"adapter bytes", recorded=b"adapter bytes", **state):
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(adapter)
    state = {"epoch": 1, "global_step": 2, "adapter_sha256": hashlib.sha256(recorded).hexdigest(),
             "guidance_scale": 1.0} | state
    (folder / "state.json").write_text(json.dumps(state))
    return folder


def test_readers_check_the_recorded_hash_and_guidance_scale_before_loading(tmp_path):
    modified = fake_checkpoint(tmp_path / "modified", adapter=b"adapter bytes, edited")
    nan_scale = fake_checkpoint(tmp_path / "nan", guidance_scale=float("nan"))
    text_scale = fake_checkpoint(tmp_path / "text", guidance_scale="4.5x")
    (tmp_path / "prompts.txt").write_text("a cat\n")
    out, common = str(tmp_path / "out.png"), ["--prompt-set", str(tmp_path / "prompts.txt"), "--metrics", "pickscore"]
    cases = [
        ("generate", ["--checkpoint", str(modified), "--out", out]),
        ("metrics", ["--checkpoint", "base", "--compare", str(modified), *common]),
        ("export", [str(modified), str(tmp_path / "exported")]),
        ("generate", ["--guidance-scale", "nan", "--out", out]),
        ("metrics", ["--guidance-scale", "nan", *common]),
        ("generate", ["--checkpoint", str(nan_scale), "--out", out]),
        ("metrics", ["--checkpoint", str(text_scale), *common]),
        ("metrics", ["--seed", "-5", *common]),
    ]
    result = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(cases)], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    hash_problem = "adapter_model.safetensors has SHA-256 "
    expected = [
        [f"checkpoint {modified} is damaged: {hash_problem}", "the file was modified or truncated"],
        [f"checkpoint {modified} is damaged: {hash_problem}"],
        [f"checkpoint {modified} is damaged: {hash_problem}"],
        ["--guidance-scale nan is invalid: it must be a finite number (1 disables CFG; FLUX: its distilled guidance)"],
        ["--guidance-scale nan is invalid"],
        [f"checkpoint {nan_scale} is damaged: state.json 'guidance_scale' is nan, not a finite number"],
        [f"checkpoint {text_scale} is damaged: state.json 'guidance_scale' is '4.5x', not a finite number"],
        ["--seed -5 is invalid: it must be in [0, 2**32 - 1]"],
    ]
    for (tool, argv), (code, err), fragments in zip(cases, json.loads(result.stdout), expected):
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert code == 2 and "Traceback" not in err and len(errors) == 1, (tool, argv, code, err)
        assert all(fragment in errors[0] for fragment in fragments), (tool, argv, errors[0])
    assert not (tmp_path / "exported").exists() and not (tmp_path / "out.png").exists()


def test_a_checkpoint_without_the_record_is_read_as_before(tmp_path):
    intact = fake_checkpoint(tmp_path / "intact", guidance_scale=4.5)
    assert resolve_checkpoint(str(intact)).guidance_scale == 4.5
    published = fake_checkpoint(tmp_path / "published-cfg-2.0", adapter=b"edited")
    state = json.loads((published / "state.json").read_text())
    del state["adapter_sha256"], state["guidance_scale"]
    (published / "state.json").write_text(json.dumps(state))
    assert resolve_checkpoint(str(published)).guidance_scale == 2.0  # from the folder name, as before
    assert state_problem(published, state) is None
    assert "SHA-256" in state_problem(published, state | {"adapter_sha256": "0" * 64})
    assert "'guidance_scale' is True" in state_problem(published, {"guidance_scale": True})


# -- 3. a full disk while a picture is written -------------------------------------------------------------------------


def fill_then_fail(path, *args, **kwargs):
    Path(path).write_bytes(b"\x89PNG half")  # some bytes made it, then the disk is full
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_while_drawing_the_curve_or_a_pair_is_one_error_and_leaves_no_temporary_file(tmp_path,
                                                                                                 monkeypatch, capsys):
    from matplotlib.figure import Figure
    from PIL import Image

    from fdfo.cli import guarded

    logger = runlog.RunLogger(tmp_path, {})
    logger.log({"epoch": 0, "reward_mean": 0.5, "reward_std": 0.1, "clipfrac": 0.0})
    logger.draw_curve()
    before = (tmp_path / "reward_curve.png").read_bytes()
    monkeypatch.setattr(Figure, "savefig", lambda self, path, **kwargs: fill_then_fail(path))
    with pytest.raises(SystemExit) as info:
        guarded(logger.draw_curve)
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    assert err.startswith(f"error: the disk is full: could not write reward_curve.png in {tmp_path}"), err
    assert (tmp_path / "reward_curve.png").read_bytes() == before  # the last complete picture stays
    monkeypatch.setattr(Image.Image, "save", lambda self, path, **kwargs: fill_then_fail(path))
    pair = torch.rand(2, 3, 16, 16)
    with pytest.raises(RunError, match=f"the disk is full: could not write epoch-0000000-pair-00.png in "
                                       f"{tmp_path / 'images'}"):
        logger.log_pairs(0, pair, ["a cat"], torch.tensor([0.1, 0.2]))
    logger.close()
    leftovers = [p.name for p in (*tmp_path.iterdir(), *(tmp_path / "images").iterdir()) if p.name.startswith(".")]
    assert leftovers == [] and not list((tmp_path / "images").iterdir())


# -- 6. an over-long prompt --------------------------------------------------------------------------------------------


def test_an_over_long_prompt_is_cut_on_load_with_one_warning(tmp_path, capsys):
    huge = "a red apple " * (10 * 2**20 // 12)  # one ~10 MB line
    lines = ["a cat", "", huge, "x" * prompts.MAX_PROMPT_CHARS, "b" * (prompts.MAX_PROMPT_CHARS + 1), "a dog"]
    path = tmp_path / "p.txt"
    path.write_text("\n".join(lines) + "\n")
    got = prompts.load_prompts(path)
    assert got == ["a cat", huge.strip()[:prompts.MAX_PROMPT_CHARS], lines[3], "b" * prompts.MAX_PROMPT_CHARS,
                   "a dog"]
    err = capsys.readouterr().err.splitlines()
    assert err == [f"warning: prompt file {path} line 3 (and 1 more line) holds {len(huge.strip()):,} characters; "
                   f"the text encoders read at most 77 + 128 tokens, so it is cut to its first 8,192 characters (what "
                   f"they read is unchanged)"], err
    (tmp_path / "p.json").write_text(json.dumps(["a cat", huge]))
    assert prompts.load_prompt_set(str(tmp_path / "p.json")) == ["a cat", huge[:prompts.MAX_PROMPT_CHARS]]
    assert "entry 2 holds" in capsys.readouterr().err
    assert prompts.load_prompts(ROOT / "prompt_sets/smoke.txt") and capsys.readouterr().err == ""


def test_the_cut_keeps_every_token_the_encoders_read():
    """The longest prompts the encoders read in full: their longest whole-word token, repeated. A cut below
    (longest token + a space) x 128 T5 tokens would change what T5 reads."""
    from fdfo.models import tiny_sd3 as tiny
    from fdfo.models.sd3 import T5_MAX_LENGTH

    for tokenizer, length, marker in ((tiny.tiny_clip_tokenizer(), 77, "</w>"),
                                      (tiny.tiny_t5_tokenizer(), T5_MAX_LENGTH, "\u2581")):
        words = [w.replace(marker, "") for w in tokenizer.get_vocab()]
        words = [w for w in words if w.isalpha()]
        word = max(words, key=len)  # "strawberry", "illustration": one token each
        text = " ".join([word] * 4000)
        ids = [tokenizer(t, max_length=length, truncation=True)["input_ids"]
               for t in (text, text[:prompts.MAX_PROMPT_CHARS])]
        assert ids[0] == ids[1] and len(ids[0]) == length and len(set(ids[0][1:-1])) == 1, word


# -- 9. an exception inside reward code --------------------------------------------------------------------------------


def test_an_exception_inside_a_reward_keeps_its_traceback_and_names_the_term(monkeypatch):
    from fdfo.cli import guarded
    from rewards import Term, WeightedReward
    from rewards.analytic import Brightness, Redness
    from rewards.weighted import RewardTermError

    def broken(self, inputs):
        raise ValueError("operands could not be broadcast together")  # what a library might raise

    monkeypatch.setattr(Redness, "score", broken)
    reward = WeightedReward([Term("brightness", 1.0, Brightness()), Term("redness", 0.5, Redness())], "cpu")
    with pytest.raises(RewardTermError, match="reward term 'redness' raised ValueError: operands could not be "
                                              "broadcast") as info:
        guarded(lambda: reward.components(["a", "b"], torch.rand(2, 3, 8, 8)))  # not turned into a one-line exit
    cause = info.value.__cause__
    assert isinstance(cause, ValueError) and cause.__traceback__.tb_next is not None  # down to the raising line
    assert not isinstance(info.value, safety.RunError)
    monkeypatch.setattr(Redness, "score", lambda self, inputs: (_ for _ in ()).throw(RunError("every reward is NaN")))
    with pytest.raises(RunError, match="^every reward is NaN$"):  # the run's own errors pass through unchanged
        reward.components(["a", "b"], torch.rand(2, 3, 8, 8))

"""Held-out evaluation during training (fdfo/heldout.py): which prompts, what is evaluated (metrics.py's numbers for
the checkpoint, a baseline's EMA), that it changes nothing the run trains, best.json and RUN:best, the
over-optimisation warning and --eval.stop-after, and resuming around an evaluation."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from fdfo import heldout, train_loop
from fdfo.config import smoke_config
from fdfo.errors import Interrupted
from fdfo.evaluation import EvalConfig, evaluate, select_prompts
from fdfo.heldout import heldout_plan, overoptimisation, warnings_in_a_row
from fdfo.heldout_config import SMOKE_HELDOUT_PROMPTS, HeldoutConfig
from fdfo.hub import resolve_checkpoint
from fdfo.prompts import load_prompts, prompt_indices
from tests.test_algorithms_sd3 import tiny_config as baseline_config
from tests.test_train import read_log, tiny_config

# On the tiny model the held-out evaluation samples at the run's steps and size (what generate.py defaults to there);
# metrics.py's defaults are the protocol's 40 steps at 512 px, so the comparisons pass the run's.
TINY_SAMPLING = dict(num_steps=3, resolution=64)


def with_eval(cfg, **fields):
    """`cfg` with held-out evaluation every epoch on 3 prompts of the smoke held-out file, as `fields` override."""
    return dataclasses.replace(cfg, eval=dataclasses.replace(
        HeldoutConfig(every=1, num_prompts=3, prompts=SMOKE_HELDOUT_PROMPTS), **fields))


def heldout_records(run_dir):
    return [r for r in read_log(run_dir) if "heldout_reward_mean" in r]


def _adapter(run_dir, epoch):
    return load_file(run_dir / f"checkpoints/epoch-{epoch:07d}/adapter_model.safetensors")


def _state(run_dir, epoch):
    return torch.load(run_dir / f"checkpoints/epoch-{epoch:07d}/training_state.pt", weights_only=True)


def _equal_states(a, b):
    """torch.equal on every tensor of two nested training states."""
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal_states(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal_states(x, y) for x, y in zip(a, b))
    return a == b


# ----------------------------------------------------------------------------------------------------------------------
# Prompts


def test_heldout_prompts_never_appear_in_the_training_stream(tmp_path):
    cfg = smoke_config()
    training = load_prompts(cfg.prompt_file)
    plan = heldout_plan(cfg, training)
    assert len(plan.prompts) == cfg.eval.num_prompts == 16 and len(set(plan.prompts)) == 16
    stream = {training[i] for i in prompt_indices(len(training), cfg.seed, 0, 100 * cfg.total_pairs_per_epoch)}
    assert stream == set(training)  # 100 epochs visit every training prompt ...
    assert not stream & set(plan.prompts)  # ... and none of the held-out ones
    # a held-out file that shares prompts with the training file: those are left out before the seeded choice
    mixed = tmp_path / "mixed.txt"
    mixed.write_text(f"{training[3]}\nnew one\n{training[0]}\nnew two\nnew three\n")
    cfg.eval = HeldoutConfig(prompts=str(mixed), num_prompts=3, seed=5)
    plan = heldout_plan(cfg, training)
    assert sorted(plan.prompts) == ["new one", "new three", "new two"]
    assert [["new one", "new two", "new three"][i] for i in select_prompts(3, 3, 5)] == plan.prompts
    cfg.eval.num_prompts = 4
    with pytest.raises(ValueError, match="--eval.num-prompts 4 is more than the 3 held-out prompts"):
        heldout_plan(cfg, training)


def test_missing_default_heldout_set_is_one_line_before_anything_is_made(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # prompt_sets/pickscore_test.txt is looked up in the working directory
    cfg = dataclasses.replace(tiny_config(tmp_path / "run"), eval=HeldoutConfig())  # the paper presets' default
    with pytest.raises(FileNotFoundError) as error:
        train_loop.train(cfg)
    message = str(error.value)
    assert "\n" not in message and "--eval.prompts pickscore_test" in message
    assert "`python -m fdfo.prompts download pickscore_test`" in message and "--eval.every 0" in message
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("fields, fragment", [
    (dict(every=-1), "--eval.every -1 is invalid: it must be >= 0"),
    (dict(num_prompts=0), "--eval.num-prompts 0 is invalid: it must be >= 1"),
    (dict(seed=2**32), f"--eval.seed {2**32} is invalid"),
    (dict(stop_after=2, every=0), "--eval.stop-after 2 is invalid with --eval.every 0"),
    (dict(metrics=("dreamsim_diversity",)), "--eval.metrics dreamsim_diversity is invalid"),
    (dict(metrics=("redness",)), "--eval.metrics redness is invalid: a metric named twice, or a term of the run's"),
])
def test_bad_eval_flags_are_refused_before_anything_is_made(tmp_path, fields, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(")):
        train_loop.train(with_eval(tiny_config(tmp_path / "run"), **fields))
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------------------------------
# What is evaluated


def test_records_are_metrics_py_on_the_checkpoint_and_best_resolves(tmp_path):
    """The record of epoch E is metrics.py's number for checkpoint E on the same prompts and seeds (the reward's term
    and an --eval.metrics metric); best.json names the best evaluated checkpoint, and RUN:best resolves to it in
    generate.py and metrics.py."""
    run = tmp_path / "run"
    train_loop.train(with_eval(tiny_config(run, num_epochs=2), num_prompts=5, seed=3, metrics=("brightness",)))
    records = heldout_records(run)
    assert [r["epoch"] for r in records] == [0, 1, 2] and all(r["heldout_num_prompts"] == 5 for r in records)
    assert len({r["heldout_reward_mean"] for r in records}) == 3  # the policy changes, and so does its reward
    for record in records[1:]:
        folder = run / f"checkpoints/epoch-{record['epoch']:07d}"
        results = evaluate(EvalConfig(checkpoint=str(folder), prompt_set=SMOKE_HELDOUT_PROMPTS, num_prompts=5, seed=3,
                                      metrics=("redness", "brightness"), batch_size=8, **TINY_SAMPLING))  # 4 x 2
        assert record["heldout_redness_mean"] == record["heldout_reward_mean"]
        assert record["heldout_reward_mean"] == results["metrics"]["redness"]  # same images, batches, rounding
        assert record["heldout_brightness_mean"] == results["metrics"]["brightness"]
        low, high = results["stats"]["redness"]["ci95"]
        assert record["heldout_reward_ci95"] == pytest.approx((high - low) / 2, rel=1e-5)
    best = max(records[1:], key=lambda r: r["heldout_reward_mean"])
    assert json.loads((run / "best.json").read_text()) == {
        "epoch": best["epoch"], "checkpoint": f"checkpoints/epoch-{best['epoch']:07d}",
        "heldout_reward_mean": best["heldout_reward_mean"]}
    resolved = resolve_checkpoint(f"{run}:best")  # what generate.py and metrics.py call
    assert resolved.adapter_dir == run / f"checkpoints/epoch-{best['epoch']:07d}"
    results = evaluate(EvalConfig(checkpoint=f"{run}:best", prompt_set=SMOKE_HELDOUT_PROMPTS, num_prompts=5, seed=3,
                                  metrics=("redness",), **TINY_SAMPLING))
    assert results["metrics"]["redness"] == pytest.approx(best["heldout_reward_mean"], rel=1e-6, abs=1e-7)
    from fdfo.grid import generate_grid
    from generate import GenerateConfig

    out = generate_grid(GenerateConfig(checkpoint=(f"{run}:best",), out=str(tmp_path / "best.png"), num_prompts=1,
                                       grid_cols=1))
    assert out.is_file()
    (run / "best.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no best.json; train.py writes it at its held-out evaluations"):
        resolve_checkpoint(f"{run}:best")


@pytest.mark.parametrize("algorithm", ["flow_grpo", "diffusion_nft"])
def test_a_baseline_evaluates_its_ema(algorithm, tmp_path):
    run = tmp_path / "run"
    train_loop.train(with_eval(baseline_config(algorithm, run, num_epochs=2), num_prompts=4))
    record = heldout_records(run)[-1]
    folder = run / "checkpoints/epoch-0000002"
    ema, theta = _adapter(run, 2), _state(run, 2)[f"{'nft' if algorithm == 'diffusion_nft' else 'grpo'}_theta"]
    assert not all(torch.equal(a, b) for a, b in zip(ema.values(), theta))  # the EMA is not the trained adapter
    results = evaluate(EvalConfig(checkpoint=str(folder), prompt_set=SMOKE_HELDOUT_PROMPTS, num_prompts=4, seed=0,
                                  metrics=("redness",), **TINY_SAMPLING))  # the saved adapter: the EMA
    assert record["heldout_reward_mean"] == pytest.approx(results["metrics"]["redness"], rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("algorithm", ["fdfo", "diffusion_nft"])
def test_evaluation_changes_nothing_the_run_trains(algorithm, tmp_path, no_reward_curve):
    """No optimizer step, no change of the random streams: with --eval.every the run trains the same adapter (and
    optimizer state, and a baseline's theta, EMA and old adapter), bit for bit, as without."""
    def config(name, every):
        cfg = (tiny_config(tmp_path / name, num_epochs=2, save_freq=2) if algorithm == "fdfo"
               else baseline_config(algorithm, tmp_path / name, num_epochs=2, save_freq=2))
        return with_eval(cfg, every=every)

    train_loop.train(config("with", 1))
    train_loop.train(config("without", 0))
    assert [r["epoch"] for r in heldout_records(tmp_path / "with")] == [0, 1, 2]
    assert not heldout_records(tmp_path / "without")
    a, b = _adapter(tmp_path / "with", 2), _adapter(tmp_path / "without", 2)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _equal_states(_state(tmp_path / "with", 2), _state(tmp_path / "without", 2))
    steps = [[r for r in read_log(tmp_path / name) if "step" in r] for name in ("with", "without")]
    assert [r["step"] for r in steps[0]] == [1, 2, 3, 4]
    assert steps[0] == steps[1]


def test_an_evaluation_keeps_the_random_state_and_the_adapter(tmp_path):
    run = train_loop.setup(with_eval(baseline_config("diffusion_nft", tmp_path / "run")), [])
    try:
        for copy in (run.copies.ema, run.copies.old):  # make the three adapters differ
            for i, tensor in enumerate(copy):
                tensor.add_(0.01 * (i + 1))
        before = {k: v.clone() for k, v in run.policy.adapter_state().items()}
        rng = torch.get_rng_state()
        record = run.heldout.evaluate(0, run.policy, run.copies)
        assert torch.equal(torch.get_rng_state(), rng)
        after = run.policy.adapter_state()
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert record["epoch"] == 0 and record["heldout_num_prompts"] == 3
    finally:
        run.logger.close()


# ----------------------------------------------------------------------------------------------------------------------
# Resuming


def test_stop_and_resume_give_the_records_of_one_run(tmp_path, monkeypatch, no_reward_curve):
    def config(name, epochs):
        cfg = with_eval(tiny_config(tmp_path / name, num_epochs=epochs))
        cfg.sample.batch_size = 1  # 2 images per pipeline call: each evaluation of 3 prompts makes 2 calls
        return cfg

    train_loop.train(config("once", 2))
    train_loop.train(config("twice", 1))
    first = heldout_records(tmp_path / "twice")
    train_loop.train(config("twice", 2))
    assert heldout_records(tmp_path / "twice")[:2] == first  # epoch 1's record (its time too) is kept, not redone
    # a run stopped during an evaluation: the one of epoch 1, after its first batch of images
    original, calls = heldout.KeepFirst.generate, []

    def interrupted(self, prompts, seeds):
        calls.append(len(prompts))
        if len(calls) == 3:
            raise Interrupted(15)
        return original(self, prompts, seeds)

    monkeypatch.setattr(heldout.KeepFirst, "generate", interrupted)
    with pytest.raises(Interrupted):
        train_loop.train(config("cut", 2))
    assert [r["epoch"] for r in heldout_records(tmp_path / "cut")] == [0]
    monkeypatch.setattr(heldout.KeepFirst, "generate", original)
    train_loop.train(config("cut", 2))

    once = heldout_records(tmp_path / "once")
    assert [r["epoch"] for r in once] == [0, 1, 2]
    for name in ("twice", "cut"):
        again = heldout_records(tmp_path / name)
        assert [r["epoch"] for r in again] == [0, 1, 2]  # one record per evaluated epoch, none repeated
        for a, b in zip(once, again):
            assert {k: v for k, v in a.items() if k != "time_heldout"} == {
                k: v for k, v in b.items() if k != "time_heldout"}
        assert (tmp_path / name / "best.json").read_text() == (tmp_path / "once" / "best.json").read_text()


def test_stop_after_ends_the_run_and_a_rerun_stays_stopped(tmp_path, capsys, no_reward_curve):
    run = tmp_path / "run"
    train_loop.train(with_eval(tiny_config(run, num_epochs=2)))
    lines = (run / "log.jsonl").read_text().splitlines()
    marked = [json.loads(line) for line in lines]
    for record in marked:
        if "heldout_reward_mean" in record and record["epoch"] >= 1:
            record["heldout_warning"] = "constructed"
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in marked))
    train_loop.train(with_eval(tiny_config(run, num_epochs=3), stop_after=2))
    assert "stopping after epoch 2: the over-optimisation warning fired at the last 2 evaluation(s)" in (
        capsys.readouterr().out)
    assert not (run / "checkpoints/epoch-0000003").exists()
    train_loop.train(with_eval(tiny_config(run, num_epochs=3), stop_after=3))  # a higher K: trains on
    assert (run / "checkpoints/epoch-0000003").is_dir()


# ----------------------------------------------------------------------------------------------------------------------
# The warning, from constructed logs


def _h(epoch, mean, ci=0.01, **extra):
    return {"epoch": epoch, "heldout_reward_mean": mean, "heldout_reward_ci95": ci, **extra}


def _training(*rewards):
    """Epoch records of the training reward, epoch 0, 1, ...; plus step records that must not count."""
    return [r for e, reward in enumerate(rewards)
            for r in ({"epoch": e, "step": 2 * e + 1, "loss": 9.0}, {"epoch": e, "reward_mean": reward})]


RISING = _training(0.10, 0.12, 0.14, 0.16, 0.18, 0.20)


def test_the_warning_fires_when_training_rises_and_heldout_falls_twice():
    heldout = [_h(0, 0.50), _h(2, 0.45), _h(4, 0.40)]
    warning = overoptimisation(heldout, RISING)
    assert warning is not None and "0.5 at epoch 0 -> 0.45 at 2 -> 0.4 at 4" in warning
    assert "0.11 in epochs 0-1 -> 0.15 in epochs 2-3" in warning


@pytest.mark.parametrize("heldout, training", [
    ([_h(0, 0.50), _h(2, 0.45)], RISING),  # two evaluations: one fall only
    ([_h(0, 0.50), _h(2, 0.52), _h(4, 0.40)], RISING),  # rose, then fell
    ([_h(0, 0.50), _h(2, 0.45), _h(4, 0.445)], RISING),  # the second fall is within the interval
    ([_h(0, 0.50, 0.06), _h(2, 0.45, 0.01), _h(4, 0.40)], RISING),  # the first fall is within the larger interval
    ([_h(0, 0.50), _h(2, 0.45), _h(4, 0.40)], _training(0.20, 0.18, 0.16, 0.14)),  # the training reward falls too
    ([_h(0, 0.50), _h(2, 0.45), _h(4, 0.40)], _training(0.10, 0.12, 0.12, 0.10)),  # ... is flat
    ([_h(0, 0.50), _h(2, 0.45), _h(4, 0.40)], _training(0.10, 0.12)),  # no training record after epoch 2
    ([_h(0, 0.50), _h(2, 0.45), _h(4, None, None)], RISING),  # a non-finite evaluation
    ([_h(0, 0.40), _h(2, 0.45), _h(4, 0.50)], RISING),  # both rise: all is well
])
def test_the_warning_stays_quiet_otherwise(heldout, training):
    assert overoptimisation(heldout, training) is None


def test_warnings_are_counted_back_from_the_last_evaluation():
    w = {"heldout_warning": "x"}
    assert warnings_in_a_row([_h(0, 1), _h(1, 1, **w), _h(2, 1, **w)]) == 2
    assert warnings_in_a_row([_h(0, 1, **w), _h(1, 1), _h(2, 1, **w)]) == 1
    assert warnings_in_a_row([_h(0, 1, **w), _h(1, 1, **w), _h(2, 1)]) == 0


def test_an_fp16_autocast_run_is_evaluated_under_its_autocast(tmp_path):
    """Under fp16 autocast the speed levers hold the frozen weights in fp16, so the evaluation's pipeline runs under
    the training's autocast (it failed with 'Input type (float) and bias type (c10::Half)' before): its record equals
    metrics.py's number for the checkpoint computed under the same autocast (the levers change no number)."""
    run = tmp_path / "run"
    cfg = with_eval(tiny_config(run, num_epochs=1), num_prompts=4)
    cfg.train.precision = "fp16"
    train_loop.train(cfg)
    records = heldout_records(run)
    assert [r["epoch"] for r in records] == [0, 1]
    with torch.autocast("cpu", dtype=torch.float16):
        results = evaluate(EvalConfig(checkpoint=str(run / "checkpoints/epoch-0000001"),
                                      prompt_set=SMOKE_HELDOUT_PROMPTS, num_prompts=4, metrics=("redness",),
                                      batch_size=8, **TINY_SAMPLING))
    assert records[1]["heldout_reward_mean"] == pytest.approx(results["metrics"]["redness"], rel=1e-6)

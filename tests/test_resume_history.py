"""Resuming a run made before a setting existed (issue 31, case 11): a key missing from its config.json counts as the
setting's default of the day it was added, and a different value is refused like any resume mismatch; every setting
of this version is in one of the two tables of fdfo/config_history.py, so that a new one cannot be forgotten."""

import dataclasses
import json
import re
import typing

import pytest

from fdfo import train_loop
from fdfo.config import Config, batch_geometry, smoke_config
from fdfo.config_history import ADDED_LATER, FIRST_RECORDED, FREE_IF_PREDATED
from fdfo.replay import fits
from fdfo.resume import RESUME_APPLIED, RESUME_FREE, _flat, check_resume_settings, resolved_config
from tests.test_train import tiny_config


def setting_hint(key: str):
    """The type of the dotted setting `key` of Config."""
    cls, *path, last = [Config, *key.split(".")]
    for part in path:
        cls = typing.get_type_hints(cls)[part]
    return typing.get_type_hints(cls)[last]


def test_every_setting_has_its_history():
    settings = {k for k in _flat(resolved_config(Config(), batch_geometry(Config(), 1), None))
                if not k.startswith("geometry.")}
    assert not FIRST_RECORDED & set(ADDED_LATER)
    missing = sorted(settings - FIRST_RECORDED - set(ADDED_LATER))
    assert not missing, (f"settings {missing} are new: add each to fdfo/config_history.py's ADDED_LATER with its "
                         f"default (the value a run made before it behaved as)")
    assert not (FIRST_RECORDED | set(ADDED_LATER)) - settings  # no entry for a setting that does not exist
    for key, value in ADDED_LATER.items():
        assert fits(setting_hint(key), value), key


def other_value(hint, value):
    """A value of type `hint` that differs from `value`."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Literal:
        return next(a for a in args if a != value)
    if hint is bool:
        return not value
    if value is None:
        return 3 if int in args else 0.5
    return value * 2 if isinstance(value, (int, float)) else value + "x"


def set_setting(cfg, key, value):
    *path, last = key.split(".")
    for part in path:
        cfg = getattr(cfg, part)
    setattr(cfg, last, value)


REFUSED = sorted(k for k in ADDED_LATER if k not in RESUME_FREE | RESUME_APPLIED | FREE_IF_PREDATED)


@pytest.mark.parametrize("key", REFUSED)
def test_a_setting_the_run_predates_counts_as_its_default_of_the_day(key, tmp_path):
    cfg = smoke_config()
    geom = batch_geometry(cfg, 1)
    saved = resolved_config(cfg, geom, tmp_path)
    *path, last = key.split(".")
    section = saved
    for part in path:
        section = section[part]
    del section[last]  # config.json of a run made before the setting existed
    (tmp_path / "config.json").write_text(json.dumps(saved))
    resume = tmp_path / "checkpoints" / "epoch-0000001"
    assert check_resume_settings(cfg, geom, resume) == []  # the default of the day: the run as it was
    changed = other_value(setting_hint(key), ADDED_LATER[key])
    set_setting(cfg, key, changed)
    flag = "--" + key.replace("_", "-")
    refused = f"{flag} {ADDED_LATER[key]!r} (the run predates this setting) -> {changed!r}"
    with pytest.raises(ValueError, match="cannot resume .*" + re.escape(refused)):
        check_resume_settings(cfg, geom, resume)


def test_a_run_from_before_the_trust_region_setting_resumes_only_with_the_published_ratio(tmp_path):
    cfg = tiny_config(tmp_path / "run")
    train_loop.train(cfg)
    path = tmp_path / "run" / "config.json"
    recorded = json.loads(path.read_text())
    del recorded["train"]["trust_region"]
    path.write_text(json.dumps(recorded))
    velocity = dataclasses.replace(cfg, num_epochs=2, train=dataclasses.replace(cfg.train, trust_region="velocity"))
    with pytest.raises(ValueError, match=r"--train\.trust-region 'separation' \(the run predates this setting\) -> "
                                         r"'velocity'"):
        train_loop.train(velocity)
    assert json.loads(path.read_text()) == recorded  # refused before anything was written


def test_a_run_from_before_held_out_evaluation_resumes_with_the_presets_evaluation(tmp_path):
    """The smoke preset evaluates 16 prompts of its own file; a smoke run made before held-out evaluation existed
    recorded no eval section and resumes with them (it has no held-out record to stay comparable with). A run that
    recorded its held-out settings still refuses another prompt count."""
    cfg = smoke_config()
    geom = batch_geometry(cfg, 1)
    saved = resolved_config(cfg, geom, tmp_path)
    recorded = json.loads(json.dumps(saved))
    del saved["eval"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    resume = tmp_path / "checkpoints" / "epoch-0000004"
    assert cfg.eval.num_prompts != ADDED_LATER["eval.num_prompts"] and cfg.eval.prompts != ADDED_LATER["eval.prompts"]
    assert check_resume_settings(cfg, geom, resume) == []
    (tmp_path / "config.json").write_text(json.dumps(recorded))
    cfg.eval.num_prompts = 8
    with pytest.raises(ValueError, match=re.escape("--eval.num-prompts 16 -> 8")):
        check_resume_settings(cfg, geom, resume)

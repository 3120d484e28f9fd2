"""--train.trust-region velocity on the SD3 training loop (fdfo/phases.py): the opt-in SPO ratio of
fdfo.objective.spo_loss_velocity_region replaces spo_loss, the default path calls only spo_loss, the setting is
recorded and cannot change on resume, and the baselines refuse it."""

import pytest
from safetensors.torch import load_file

from fdfo import phases, train_loop
from fdfo.config import check_config
from tests.test_algorithms_sd3 import tiny_config as baseline_config
from tests.test_train import tiny_config


def spy(monkeypatch, name, calls):
    real = getattr(phases, name)

    def counted(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(phases, name, counted)


def test_the_velocity_trust_region_is_the_loss_of_an_sd3_run_and_changes_the_update(tmp_path, monkeypatch):
    calls = []
    spy(monkeypatch, "spo_loss", calls)
    spy(monkeypatch, "spo_loss_velocity_region", calls)
    adapters = {}
    for region in ("separation", "velocity"):
        calls.clear()
        cfg = tiny_config(tmp_path / region)
        cfg.train.trust_region = region
        train_loop.train(cfg)
        assert set(calls) == {"spo_loss" if region == "separation" else "spo_loss_velocity_region"}, calls
        assert f'"trust_region": "{region}"' in (tmp_path / region / "config.json").read_text()
        adapters[region] = load_file(tmp_path / region / "checkpoints/epoch-0000001/adapter_model.safetensors")
    assert any(not (adapters["separation"][k] == adapters["velocity"][k]).all() for k in adapters["separation"])

    cfg = tiny_config(tmp_path / "separation", num_epochs=2)
    cfg.train.trust_region = "velocity"
    with pytest.raises(ValueError, match="--train.trust-region"):  # a resumed run keeps its objective
        train_loop.train(cfg)


def test_the_baselines_refuse_the_velocity_trust_region(tmp_path):
    cfg = baseline_config("flow_grpo", tmp_path / "run")
    cfg.train.trust_region = "velocity"
    with pytest.raises(ValueError, match="trust-region velocity is invalid: .*left out with --algorithm flow_grpo"):
        check_config(cfg)

"""Without a network: the hub's unreachability is said once, with the HF_HUB_OFFLINE=1 hint, and what the cache lacks
fails at once instead of after minutes of download retries. The "hub" is a closed port on the loopback interface."""

import logging
import socket

import pytest

from fdfo import offline, train_loop
from tests.test_train import tiny_config


@pytest.fixture
def no_network(monkeypatch):
    """huggingface_hub pointed at a loopback port nobody listens on; its offline switch restored afterwards."""
    from huggingface_hub import constants

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: connections are refused
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(offline, "_hub_checked", False)
    return constants


def test_which_names_need_the_hub(tmp_path):
    assert offline.needs_hub("stabilityai/stable-diffusion-3.5-medium") and offline.needs_hub("hf:org/repo/sub")
    assert offline.needs_hub("https://huggingface.co/org/repo")
    assert not any(offline.needs_hub(n) for n in ("builtin:tiny-sd3", str(tmp_path), "base", "", None))


def test_reward_sources_are_the_models_a_reward_loads():
    from rewards import RewardConfig

    cfg = RewardConfig(pickscore_model="p/model", pickscore_processor="p/processor", vlm_model="q/vlm")
    assert offline.reward_sources(["pickscore:1.0", "vlm_alignment:0.1", "redness:1", "bad spec"], cfg) == [
        "p/model", "p/processor", "q/vlm"]
    assert offline.reward_sources((), cfg, "combined") == ["p/model", "p/processor", "q/vlm"]
    assert offline.reward_sources((), cfg, "redness") == offline.reward_sources((), cfg, "bogus") == []


def test_an_unreachable_hub_is_said_once_and_the_process_goes_offline(no_network, capsys, caplog):
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    assert offline.hub_problem().startswith("ConnectError")
    offline.ensure_hub_reachable(["builtin:tiny-sd3"])  # nothing from the hub: no check, nothing said
    assert capsys.readouterr().err == "" and not no_network.HF_HUB_OFFLINE
    offline.ensure_hub_reachable(["fdfo-test/missing", "builtin:tiny-sd3"])
    offline.ensure_hub_reachable(["fdfo-test/other"])  # checked once per process
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: the Hugging Face hub {no_network.ENDPOINT} cannot be "
                                               f"reached (ConnectError")
    assert "for fdfo-test/missing. Without network access, set HF_HUB_OFFLINE=1" in err[0]
    assert no_network.HF_HUB_OFFLINE
    with caplog.at_level(logging.WARNING), pytest.raises(LocalEntryNotFoundError):
        hf_hub_download("fdfo-test/missing", "config.json")  # at once: no retries
    assert not [r for r in caplog.records if "Retry" in r.getMessage()]


def test_reachable_means_any_answer(monkeypatch):
    class Answer:
        def __init__(self, status):
            self.status_code = status

    from huggingface_hub import utils

    for status, problem in ((200, None), (404, None), (401, None), (503, "HTTP 503"), (407, "HTTP 407")):
        monkeypatch.setattr(utils, "get_session", lambda s=status: type("S", (), {
            "request": lambda self, *a, **k: Answer(s)})())
        assert offline.hub_problem() == problem


def test_training_without_network_fails_at_once_with_one_line(no_network, tmp_path, capsys, caplog):
    """The reward's models are not cached: one hub line, then the loader's error, and no retry with backoff (before,
    45 retry lines over four minutes for PickScore)."""
    cfg = tiny_config(tmp_path / "run", reward_preset="pickscore")
    cfg.reward.pickscore_model, cfg.reward.pickscore_processor = "fdfo-test/no-model", "fdfo-test/no-processor"
    with caplog.at_level(logging.WARNING), pytest.raises((OSError, ValueError), match="fdfo-test/no-"):
        train_loop.train(cfg)
    hub_lines = [line for line in capsys.readouterr().err.splitlines() if "cannot be reached" in line]
    assert len(hub_lines) == 1 and "fdfo-test/no-model, fdfo-test/no-processor" in hub_lines[0]
    assert not [r for r in caplog.records if "Retry" in r.getMessage()]
    assert not (tmp_path / "run").exists()

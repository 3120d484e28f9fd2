"""CPU threads (fdfo/threads.py): tiny runs compute on one thread unless OMP_NUM_THREADS is set, real runs keep
torch's default; the entry points that start tiny work apply the rule."""

import pytest
import torch

from fdfo.threads import single_thread_if_tiny


@pytest.fixture
def two_threads(monkeypatch):
    """torch on two threads and OMP_NUM_THREADS unset, as a user's shell would be; restored afterwards."""
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_one_thread_for_tiny_runs_unless_the_user_chose(two_threads, monkeypatch):
    import os

    assert single_thread_if_tiny(False) is False  # a real run: torch's default stays
    assert torch.get_num_threads() == 2 and "OMP_NUM_THREADS" not in os.environ
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's choice stays
    assert single_thread_if_tiny(True) is False
    assert torch.get_num_threads() == 2 and os.environ["OMP_NUM_THREADS"] == "2"
    monkeypatch.setenv("OMP_NUM_THREADS", "")  # empty: not a choice
    assert single_thread_if_tiny(True) is True
    assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"  # and for child processes


class Stop(Exception):
    pass


@pytest.mark.parametrize("args, tiny", [
    (["--preset", "smoke"], True),
    (["--preset", "smoke_diffusion_nft"], True),
    (["--pretrained-model", "builtin:tiny-sd3"], True),
    (["--preset", "smoke", "--pretrained-model", "stabilityai/stable-diffusion-3.5-medium"], False),
    ([], False),  # the paper's run
])
def test_train_py_applies_the_rule_before_training(two_threads, monkeypatch, args, tiny):
    import fdfo.train_loop
    import train

    seen = []

    def no_training(cfg):
        seen.append(torch.get_num_threads())
        raise Stop

    monkeypatch.setattr(fdfo.train_loop, "train", no_training)
    with pytest.raises(Stop):
        train._main(args)
    assert seen == [1 if tiny else 2]


@pytest.mark.parametrize("model, tiny", [("builtin:tiny-sd3", True), ("folder", False)])
def test_generate_and_metrics_apply_the_rule_before_loading_the_model(two_threads, monkeypatch, tmp_path, model,
                                                                      tiny):
    import fdfo.generation

    seen = []

    def no_model(name, device):
        seen.append(torch.get_num_threads())
        raise Stop

    monkeypatch.setattr(fdfo.generation, "BaseModel", no_model)
    with pytest.raises(Stop):
        fdfo.generation.load_generator(None, model if tiny else str(tmp_path), torch.device("cpu"))
    assert seen == [1 if tiny else 2]


@pytest.mark.parametrize("module", ["fdfo.toy.__main__", "fdfo.toy.sweep", "fdfo.toy.budget", "fdfo.toy.diversity"])
def test_the_toys_tools_use_one_thread(two_threads, module, capsys):
    import importlib

    with pytest.raises(SystemExit):
        importlib.import_module(module).main(["--help"])
    assert torch.get_num_threads() == 1


@pytest.mark.parametrize("args, tiny", [(["--tiny"], True), ([], False)])
def test_the_bench_applies_the_rule_before_its_work(two_threads, monkeypatch, args, tiny):
    from fdfo.bench import cli, epoch

    seen = []

    def no_run(parsed):
        seen.append(torch.get_num_threads())
        raise Stop

    monkeypatch.setattr(epoch, "run", no_run)
    with pytest.raises(Stop):
        cli.main(args + ["--device", "cpu"])
    assert seen == [1 if tiny else 2]

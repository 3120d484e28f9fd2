"""Sizes that cannot work are refused before they cost anything (issue 31, case 13): a VAE decode batch of 2^70
before the model loads, and a toy budget that would run for centuries after its first epoch, from the time it took."""

import types

import pytest

import train
from fdfo.toy import __main__ as toy_main
from fdfo.toy import methods
from fdfo.toy import run as toy_run


def test_a_huge_decode_batch_is_refused_before_anything_is_loaded(tmp_path, capsys, monkeypatch):
    from fdfo import train_loop

    def no_policy(*args):
        raise AssertionError("the SD3 policy was built")

    monkeypatch.setattr(train_loop, "build_policy", no_policy)
    with pytest.raises(SystemExit) as e:
        train.main(["--preset", "smoke", "--run-dir", str(tmp_path / "run"), "--sample.decode-batch-size", str(2**70)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert err.strip() == (f"error: --sample.decode-batch-size {2**70} is invalid: it must be in 1..65536 (images per "
                           f"VAE call; None decodes a whole sampling batch at once)")
    assert not (tmp_path / "run").exists()


def count_epochs(monkeypatch, limit):
    """methods.train_epoch, counted; a run still going after `limit` epochs fails the test instead of running on."""
    calls, real = [], methods.train_epoch

    def counted(*args, **kwargs):
        calls.append(1)
        if len(calls) > limit:
            raise AssertionError(f"still training after {limit} epochs")
        return real(*args, **kwargs)

    monkeypatch.setattr(methods, "train_epoch", counted)
    return calls


def test_an_absurd_toy_budget_is_refused_after_the_first_epoch(capsys, monkeypatch):
    calls = count_epochs(monkeypatch, 3)
    with pytest.raises(SystemExit) as e:
        toy_main.main(["--evaluations", "1000000000000000", "--samples-per-epoch", "8", "--eval-per-prompt", "2",
                       "--hidden", "8"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err and len(calls) == 1  # one epoch spent, then refused
    assert err.startswith("error: --evaluations 1000000000000000 would take about ")
    assert " years on this machine " in err


def test_a_long_toy_budget_is_announced(capsys, monkeypatch):
    now = iter(range(0, 10**6, 10))  # each clock reading 10 s after the previous: the first epoch "takes" 10 s
    monkeypatch.setattr(toy_run, "time", types.SimpleNamespace(perf_counter=lambda: float(next(now))))
    count_epochs(monkeypatch, 1)  # the estimate comes after the first epoch; the test stops the run at the second
    with pytest.raises(AssertionError, match="still training after 1 epochs"):
        toy_run.run(toy_run.ToyConfig(evaluations=8 * 400, samples_per_epoch=8, eval_per_prompt=2, hidden=8))
    assert capsys.readouterr().err == ("--evaluations 3200: about 1.1 hours on this machine (estimated from the first "
                                       "epoch)\n")  # 400 epochs x 10 s

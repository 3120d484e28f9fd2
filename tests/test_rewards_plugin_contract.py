"""What a plug-in reward may not do, each refused or contained (issue 31, cases 7-9), with small plug-in files
written by the test: exit the process, write into its images, answer right for the probe and wrong later, be no .py
file, score nothing finite, or return scores float32 cannot hold."""

import textwrap

import pytest
import torch

import train
from fdfo.errors import RunError
from rewards import RewardConfig, build_from_specs
from rewards.analytic import Redness

PLUGINS = textwrap.dedent(
    """
    import sys, torch

    class ExitsInInit:
        def __init__(self):
            sys.exit(0)

        def __call__(self, prompts, images):
            return images.mean(dim=(1, 2, 3))

    def exits_in_call(prompts, images):
        sys.exit(0)

    def zero_them(prompts, images):  # an in-place write into the images it is given
        images.zero_()
        return images.mean(dim=(1, 2, 3))

    def shape_after_probe(prompts, images):  # right for the probe's 2 images, one score too few after
        scores = images.mean(dim=(1, 2, 3))
        return scores if len(prompts) == 2 else scores[1:]

    def all_nan(prompts, images):
        return torch.full((len(prompts),), float("nan"))

    def nan_after_probe(prompts, images):
        return images.mean(dim=(1, 2, 3)) if len(prompts) == 2 else torch.full((len(prompts),), float("inf"))

    def too_large(prompts, images):
        return torch.full((len(prompts),), 1e39, dtype=torch.float64)
    """
)

SMOKE = ["--preset", "smoke", "--total-pairs-per-epoch", "4", "--gradient-steps-per-epoch", "2",
         "--sample.num-solver-steps", "3", "--image-log-freq", "0", "--num-epochs", "1"]


@pytest.fixture
def plugins(tmp_path):
    (tmp_path / "plugins.py").write_text(PLUGINS)
    (tmp_path / "exits_at_import.py").write_text("import sys\nsys.exit(0)\n\ndef reward(prompts, images):\n    pass\n")
    return tmp_path


def train_error(argv, capsys) -> str:
    """train.main(argv) must exit 2 with one `error:` line and no traceback; returns that line."""
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err, err[-3000:]
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    return line


@pytest.mark.parametrize("target, fragment", [
    ("exits_at_import.py:reward", "importing '{folder}/exits_at_import.py' failed: it called sys.exit(0)"),
    ("plugins.py:ExitsInInit", "building ExitsInInit() failed: it called sys.exit(0)"),
    ("plugins.py:exits_in_call", "it called sys.exit(0), which a plug-in must not do"),
])
def test_a_plugin_that_exits_is_an_error_naming_it(plugins, target, fragment, capsys):
    spec = f"plugin:1:{plugins / target}"
    line = train_error([*SMOKE, "--run-dir", str(plugins / "run"), "--reward.specs", spec], capsys)
    assert f"reward plug-in {spec!r}" in line and fragment.format(folder=plugins) in line
    assert not (plugins / "run").exists()


def test_a_plugin_that_writes_into_its_images_changes_nothing_else(plugins):
    images = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    given = images.clone()
    reward = build_from_specs([f"plugin:0:{plugins / 'plugins.py'}:zero_them", "redness:1"],
                              RewardConfig(chunk_size=2), "cpu")
    parts = reward.components(["a"] * 5, images)
    assert torch.equal(images, given)  # the caller's images are untouched
    assert torch.equal(parts["redness"], Redness()(["a"] * 5, given))  # the next term sees them as they were
    assert torch.equal(parts["zero_them"], torch.zeros(5))  # the plug-in saw (and zeroed) its own copy


def test_a_wrong_answer_after_the_probe_is_one_line(plugins, capsys):
    spec = f"plugin:1:{plugins / 'plugins.py'}:shape_after_probe"
    line = train_error([*SMOKE, "--run-dir", str(plugins / "run"), "--reward.specs", spec], capsys)
    assert line == (f"error: reward plug-in {spec!r} returned a torch.float32 tensor of shape [7] on cpu for 8 images; "
                    f"it must return a float tensor of shape [8] on cpu.")


@pytest.mark.parametrize("target, error, fragment", [
    ("plugins.txt:all_nan", ValueError, "'{folder}/plugins.txt' must be a Python file ending in .py"),
    ("plugins.py:all_nan", ValueError, "scored both probe images (two 64 px colour ramps) [nan, nan]"),
    ("plugins.py:too_large", ValueError, "torch.float64 scores beyond float32's range (e.g. 1e+39"),
])
def test_bad_answers_are_refused_at_the_probe(plugins, target, error, fragment):
    (plugins / "plugins.txt").write_text(PLUGINS)
    spec = f"plugin:1:{plugins / target}"
    with pytest.raises(error) as e:
        build_from_specs([spec], RewardConfig(), "cpu")
    assert str(e.value).startswith(f"reward plug-in {spec!r}") and fragment.format(folder=plugins) in str(e.value)


def test_an_epoch_without_a_finite_reward_names_the_term_and_the_specs(plugins):
    from fdfo import train_loop
    from tests.test_train import tiny_config

    specs = ("redness:1.0", f"plugin:0.5:{plugins / 'plugins.py'}:nan_after_probe")
    cfg = tiny_config(plugins / "run")
    cfg.reward = RewardConfig(specs=specs)
    with pytest.raises(RunError) as e:
        train_loop.train(cfg)
    assert str(e.value) == (f"epoch 0: all 4 pairs got a non-finite reward; non-finite scores of this process's 8 "
                            f"images: nan_after_probe (8 of 8); check those terms of the reward (--reward.specs "
                            f"{specs[0]!r} {specs[1]!r})")

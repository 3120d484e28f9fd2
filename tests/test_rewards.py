"""Reward specs, presets and the weighted sum (rewards/build.py, rewards/weighted.py, rewards/analytic.py)."""

import pytest
import torch

from rewards import EVAL_METRICS, PRESETS, RewardConfig, Term, WeightedReward, build_metrics, build_reward, parse_spec
from rewards.analytic import Brightness, Redness
from rewards.build import TermSpec
from rewards.vlm import ALIGNMENT_QUESTION
from tests.tiny_rewards import save_tiny_clip, save_tiny_qwen_vl

PROMPTS = ["a photo of a cat", 'a "red" car at night, very long ' + "and detailed " * 30]



@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory):
    """RewardConfig pointing every model option at tiny local folders."""
    root = tmp_path_factory.mktemp("tiny_rewards")
    return RewardConfig(
        pickscore_model=str(save_tiny_clip(root / "pickscore", seed=1, with_processor=False)),
        pickscore_processor=str(save_tiny_clip(root / "laion", seed=2)),
        vlm_model=str(save_tiny_qwen_vl(root / "qwen", seed=5)),
        chunk_size=2,
    )


def images(batch=2, seed=0, size=48):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --- specs -------------------------------------------------------------------------------------------------------


def test_parse_spec_forms():
    assert parse_spec("pickscore:1.0") == TermSpec("pickscore", 1.0, None)
    assert parse_spec(" vlm_alignment : 0.1 ") == TermSpec("vlm_alignment", 0.1, None)
    assert parse_spec("vlm:-2e-1:Is it: a dog?") == TermSpec("vlm", -0.2, "Is it: a dog?")  # colons stay in it


@pytest.mark.parametrize(
    "spec, message",
    [
        ("pickscore", "expected"),
        ("pickscroe:1", "unknown kind 'pickscroe'"),
        ("pickscore:abc", "'abc' is not a finite number"),
        ("pickscore:nan", "not a finite number"),
        ("pickscore:1:Is it good?", "only VLM kinds"),
        ("vlm:1", "give the question"),
        ("vlm_quality:1:", "give the question"),
    ],
)
def test_bad_spec_says_what_is_wrong(spec, message):
    with pytest.raises(ValueError, match="Bad reward spec") as info:
        parse_spec(spec)
    assert message in str(info.value)


def test_unknown_preset_and_metric_name_the_choices():
    with pytest.raises(ValueError, match="pickscore, vlm_alignment, combined, brightness, redness"):
        build_reward("pick_score", RewardConfig(), "cpu")
    with pytest.raises(ValueError, match="choose from pickscore, hpsv2"):
        build_metrics(["dreamsim_diversity"], RewardConfig(), "cpu")
    with pytest.raises(ValueError, match="chunk-size"):
        build_reward("brightness", RewardConfig(chunk_size=0), "cpu")


def test_presets_are_the_published_ones():
    assert PRESETS["pickscore"] == ("pickscore:1.0",)
    assert PRESETS["vlm_alignment"] == ("vlm_alignment:1.0",)
    assert PRESETS["combined"] == ("pickscore:1.0", "vlm_alignment:0.1")
    assert set(EVAL_METRICS) == {"pickscore", "hpsv2", "clip_h14", "clip_l14", "vlm_alignment", "vlm_quality",
                                 "vlm_photo"}


# --- analytic reward and the weighted sum ----------------------------------------------------------------------------


def test_brightness_is_the_scaled_mean():
    x = torch.zeros(3, 3, 4, 4)
    x[0] = 0.25
    x[1, 0] = 0.9  # one channel only: mean 0.3
    torch.testing.assert_close(Brightness()(["a"] * 3, x), torch.tensor([0.25, 0.3, 0.0]))
    torch.testing.assert_close(Brightness(scale=2.0)(["a"] * 3, x), torch.tensor([0.5, 0.6, 0.0]))
    reward = build_reward("brightness", RewardConfig(), "cpu")
    out = reward(["a"] * 3, x.double())
    assert out.dtype == torch.float32 and out.shape == (3,)
    with pytest.raises(ValueError, match="one prompt per image"):
        reward(["a"], x)


def test_redness_is_red_minus_the_mean_of_green_and_blue():
    x = torch.zeros(2, 3, 2, 2)
    x[0, 0] = 0.8  # red only
    x[1, 1], x[1, 2] = 0.4, 0.2  # green and blue only
    x[1, 0, 0, 0] = 1.0  # one red pixel of four
    torch.testing.assert_close(Redness()(["a"] * 2, x), torch.tensor([0.8, 0.25 - 0.3]))
    torch.testing.assert_close(build_reward("redness", RewardConfig(), "cpu")(["a"] * 2, x), torch.tensor([0.8, -0.05]))


def test_specs_override_the_preset_and_components_hold_raw_scores():
    reward = build_reward("combined", RewardConfig(specs=("brightness:2.0", "brightness:-0.5")), "cpu")
    assert reward.names == ("brightness", "brightness_2")
    x = images(batch=3)
    parts = reward.components(["p"] * 3, x)
    mean = x.mean(dim=(1, 2, 3))
    torch.testing.assert_close(parts["brightness"], mean)
    torch.testing.assert_close(parts["brightness_2"], mean)  # raw, unweighted
    torch.testing.assert_close(parts["reward"], 1.5 * mean)
    torch.testing.assert_close(reward(["p"] * 3, x), 1.5 * mean)


class _RecordingScorer:
    def __init__(self):
        self.moves = []

    def to(self, device):
        self.moves.append(str(device))
        return self

    def __call__(self, prompts, images):
        return torch.ones(len(prompts))


def test_offload_moves_scorers_to_cpu_and_back_on_next_call():
    scorer = _RecordingScorer()
    reward = WeightedReward([Term("fake", 1.0, scorer)], "cuda", offload=True)  # no GPU needed: nothing is moved
    reward.offload()
    assert scorer.moves == ["cpu"]
    reward(["a"], torch.zeros(1, 3, 2, 2))
    assert scorer.moves == ["cpu", "cuda"]
    reward(["a"], torch.zeros(1, 3, 2, 2))
    assert scorer.moves == ["cpu", "cuda"]  # already back
    quiet = _RecordingScorer()
    WeightedReward([Term("fake", 1.0, quiet)], "cuda", offload=False).offload()
    assert quiet.moves == []


# --- presets with the tiny models -------------------------------------------------------------------------------


def test_combined_is_pickscore_plus_a_tenth_of_vlm(tiny_cfg):
    combined = build_reward("combined", tiny_cfg, "cpu")
    assert combined.names == ("pickscore", "vlm_alignment")
    x = images()
    parts = combined.components(PROMPTS, x)
    pick = build_reward("pickscore", tiny_cfg, "cpu")(PROMPTS, x)
    vlm = build_reward("vlm_alignment", tiny_cfg, "cpu")(PROMPTS, x)
    torch.testing.assert_close(parts["pickscore"], pick, rtol=0, atol=0)
    torch.testing.assert_close(parts["vlm_alignment"], vlm, rtol=0, atol=0)
    torch.testing.assert_close(parts["reward"], pick + 0.1 * vlm)
    assert not torch.allclose(parts["reward"], pick + vlm)  # the weight matters at these values


def test_vlm_terms_share_one_model_and_keep_their_questions(tiny_cfg):
    cfg = RewardConfig(**{**vars(tiny_cfg), "specs": ("vlm_alignment:1", "vlm:0.5:Is {prompt} in it?")})
    reward = build_reward("pickscore", cfg, "cpu")
    first, second = (term.scorer for term in reward.terms)
    assert first.model is second.model
    assert first.question == ALIGNMENT_QUESTION and second.question == "Is {prompt} in it?"
    assert reward.names == ("vlm_alignment", "vlm")

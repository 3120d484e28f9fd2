"""CLIP-family scorers (rewards/clip.py) on tiny offline CLIP models, against the model's own forward."""

import math

import pytest
import torch
from transformers import CLIPModel, CLIPProcessor

from rewards.clip import CLIPScorer, clip_score
from tests.tiny_rewards import save_tiny_clip

PROMPTS = [
    "a photo of a cat",
    'a "red" car parked on a street at night, café ☕ 猫',
    "an oil painting of a boat " * 100,  # 2,600 characters: truncated at 77 tokens
    "",
]



@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    return save_tiny_clip(root / "model", seed=1, with_processor=False), save_tiny_clip(root / "processor", seed=2)


@pytest.fixture(scope="module")
def scorer(folders):
    model, processor = folders
    return CLIPScorer.load(
        str(model), str(processor), device="cpu", chunk_size=3, model_option="pickscore_model",
        processor_option="pickscore_processor", what="PickScore",
    )


def images(batch, seed=0):
    return torch.rand(batch, 3, 40, 56, generator=torch.Generator().manual_seed(seed))  # not square: crop matters


def test_clip_score_by_hand():
    text = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    image = torch.tensor([[2.0, 0.0], [4.0, -3.0]])
    scale = torch.tensor(math.log(100.0))
    torch.testing.assert_close(clip_score(text, image, scale), torch.tensor([100.0, 0.0]))


def test_scores_match_the_models_own_forward(folders, scorer):
    """exp(logit_scale) * cos from CLIPModel.forward's normalised embeddings, one pair at a time (no padding)."""
    model_dir, processor_dir = folders
    model = CLIPModel.from_pretrained(model_dir).eval()
    processor = CLIPProcessor.from_pretrained(processor_dir)
    x = images(len(PROMPTS))
    expected = []
    for prompt, image in zip(PROMPTS, x):
        inputs = processor(
            text=[prompt], images=[image], do_rescale=False, truncation=True, max_length=77, return_tensors="pt"
        )
        assert inputs.input_ids.shape[1] <= 77
        with torch.no_grad():
            out = model(**inputs)
        expected.append(model.logit_scale.exp() * (out.text_embeds * out.image_embeds).sum())
        torch.testing.assert_close(expected[-1], out.logits_per_image[0, 0])
    got = scorer(PROMPTS, x)  # chunks of 3 + 1, padded text within the first chunk
    assert got.dtype == torch.float32 and got.shape == (len(PROMPTS),)
    torch.testing.assert_close(got, torch.stack(expected), rtol=1e-5, atol=1e-5)
    assert got.unique().numel() == len(PROMPTS)  # the comparison is not between constants


def test_batching_does_not_change_scores_and_is_deterministic(scorer):
    x = images(len(PROMPTS), seed=1)
    batched = scorer(PROMPTS, x)
    singles = torch.cat([scorer(PROMPTS[i : i + 1], x[i : i + 1]) for i in range(len(PROMPTS))])
    torch.testing.assert_close(batched, singles, rtol=1e-5, atol=1e-5)
    assert torch.equal(scorer(PROMPTS, x), batched)


def test_the_prompt_and_the_image_both_matter(scorer):
    x = images(2, seed=2)
    base = scorer(["a photo of a cat", "a photo of a cat"], x)
    assert not torch.allclose(base[0], base[1])
    assert not torch.allclose(scorer(["a photo of a dog", "a photo of a cat"], x)[0], base[0])


def test_processor_comes_from_the_processor_id(folders):
    model_dir, _ = folders
    with pytest.raises(FileNotFoundError, match="--reward.pickscore-processor"):
        CLIPScorer.load(
            str(model_dir), str(model_dir), device="cpu", chunk_size=2, model_option="pickscore_model",
            processor_option="pickscore_processor", what="PickScore",
        )


def test_input_contract(scorer):
    with pytest.raises(ValueError, match="one prompt per image"):
        scorer(["a", "b"], images(3))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        scorer(["a"], torch.rand(1, 4, 8, 8))
    assert scorer([], images(0)).shape == (0,)

"""Qwen2.5-VL yes/no scorer (rewards/vlm.py) on a tiny offline model, against an independently built forward."""

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

from rewards.vlm import (
    ALIGNMENT_QUESTION,
    EVAL_ALIGNMENT_QUESTION,
    PHOTO_QUESTION,
    QUALITY_QUESTION,
    VLMScorer,
    left_pad,
    resize_for_vlm,
    yes_no_score,
)
from tests.tiny_rewards import save_tiny_qwen_vl

PROMPTS = [
    "a photo of a cat",
    'a "red" car parked on a street at night, café ☕ 猫 — «quoted»',
    "an oil painting of a small wooden boat on a quiet lake at dawn, highly detailed",
    "x",
]



@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_qwen_vl(tmp_path_factory.mktemp("qwen") / "model", seed=5)


@pytest.fixture(scope="module")
def scorer(folder):
    return VLMScorer.load(str(folder), device="cpu", chunk_size=3, question=ALIGNMENT_QUESTION)


def images(batch, seed=0):
    return torch.rand(batch, 3, 512, 512, generator=torch.Generator().manual_seed(seed))  # SD3.5 size: shrunk to 504


class _ImageTextProcessor(Qwen2_5_VLProcessor):
    """The stock processor minus its video part (which needs torchvision): an independent way to build inputs."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


def reference_scores(folder, prompts, x, question=ALIGNMENT_QUESTION, evaluation=False):
    """One unpadded forward per image through the stock processor, then 100 * sigmoid(Yes - No) at the end.

    Training path: plain bilinear 504 px, processor resize and rescale off. Evaluation path: the image rounded to
    8 bits as a PIL image, the processor with its defaults."""
    from PIL import Image
    from transformers import AutoImageProcessor, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    processor = _ImageTextProcessor(AutoImageProcessor.from_pretrained(folder), tokenizer)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    yes, no = tokenizer.convert_tokens_to_ids("Yes"), tokenizer.convert_tokens_to_ids("No")
    scores = []
    for prompt, image in zip(prompts, x):
        text = question.replace("{prompt}", prompt)
        chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        rendered = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        if evaluation:
            pil = Image.fromarray((image * 255 + 0.5).clamp(0, 255).byte().permute(1, 2, 0).numpy())
            inputs = processor(text=[rendered], images=[pil], return_tensors="pt")
        else:
            resized = F.interpolate(image[None], size=(504, 504), mode="bilinear", antialias=False)[0]
            inputs = processor(text=[rendered], images=[resized], do_resize=False, do_rescale=False,
                               return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).logits[0, -1]
        scores.append(100 * torch.sigmoid(logits[yes] - logits[no]))
    return torch.stack(scores)


def test_yes_no_score_by_hand():
    logits = torch.zeros(2, 5)
    logits[0, 3], logits[1, 4] = 2.0, 1.0  # row 0: Yes (3) ahead by 2; row 1: No (4) ahead by 1
    torch.testing.assert_close(yes_no_score(logits, 3, 4), 100 * torch.sigmoid(torch.tensor([2.0, -1.0])))


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_scores_match_an_independent_forward_per_image(folder, scorer):
    """Batched (chunks of 3 + 1, left padded) scores equal unpadded one-image forwards built another way."""
    x = images(len(PROMPTS))
    got = scorer(PROMPTS, x)
    assert got.dtype == torch.float32 and got.shape == (len(PROMPTS),)
    assert scorer.build_inputs(PROMPTS[:3], x[:3])["attention_mask"].min() == 0  # padding really happened
    torch.testing.assert_close(got, reference_scores(folder, PROMPTS, x), rtol=1e-5, atol=1e-5)
    assert got.unique().numel() == len(PROMPTS)
    assert torch.equal(scorer(PROMPTS, x), got)  # deterministic


def test_the_questions_are_the_spec_wording():
    assert ALIGNMENT_QUESTION == 'Does this image match the caption "{prompt}"? Answer Yes or No.'  # §7, training
    assert EVAL_ALIGNMENT_QUESTION == 'Does this image match the caption "{prompt}"? Answer with Yes or No.'  # §8
    assert QUALITY_QUESTION == "Is this image of professional quality? Answer with Yes or No."
    assert PHOTO_QUESTION == "Does this image look photorealistic? Answer with Yes or No."


def test_training_resize_is_plain_bilinear_by_hand():
    # 1-D bilinear 4 -> 3 with align_corners False samples x at (d + 0.5) * 4/3 - 0.5 = 1/6, 3/2, 17/6:
    # from [0, 1, 4, 9] that gives 1/6, 2.5, 4 + 5 * 5/6. A separable image x_i + 10 x_j resizes row and column alike.
    x = torch.tensor([0.0, 1.0, 4.0, 9.0])
    y = torch.tensor([1 / 6, 2.5, 4 + 25 / 6])
    image = (x[:, None] + 10 * x[None, :]).expand(1, 3, 4, 4)
    torch.testing.assert_close(resize_for_vlm(image, size=3), (y[:, None] + 10 * y[None, :]).expand(1, 3, 3, 3))
    # 512 -> 504 is a downscale, where antialiasing would blur: the two must differ
    x = images(1)
    antialiased = F.interpolate(x, size=(504, 504), mode="bilinear", align_corners=False, antialias=True)
    assert (resize_for_vlm(x) - antialiased).abs().max() > 0.02


def test_training_reward_and_metrics_ask_different_questions_through_different_resizes(folder):
    from rewards import RewardConfig, build_metrics, build_reward

    cfg = RewardConfig(vlm_model=str(folder), chunk_size=2)
    train = build_reward("vlm_alignment", cfg, "cpu")
    metrics = build_metrics(["vlm_alignment", "vlm_quality", "vlm_photo"], cfg, "cpu")
    (term,) = train.terms
    assert term.scorer.question == ALIGNMENT_QUESTION and not term.scorer.processor_resize
    questions = [t.scorer.question for t in metrics.terms]
    assert questions == [EVAL_ALIGNMENT_QUESTION, QUALITY_QUESTION, PHOTO_QUESTION]
    assert all(t.scorer.processor_resize for t in metrics.terms)
    x = (images(3, seed=3) * 255).round() / 255  # 8-bit images, as evaluation scores them
    prompts = PROMPTS[:3]
    torch.testing.assert_close(term.scorer(prompts, x), reference_scores(folder, prompts, x), rtol=1e-5, atol=1e-5)
    for t, question in zip(metrics.terms, questions):
        expected = reference_scores(folder, prompts, x, question, evaluation=True)
        torch.testing.assert_close(t.scorer(prompts, x), expected, rtol=1e-5, atol=1e-5)
    # the processor's default resize of 512 px is also 504 px (36 x 36 patches), but a different interpolation
    inputs = metrics.terms[0].scorer.build_inputs(prompts[:1], x[:1])
    assert inputs["image_grid_thw"].tolist() == [[1, 36, 36]]
    assert not torch.allclose(inputs["pixel_values"], term.scorer.build_inputs(prompts[:1], x[:1])["pixel_values"])


def test_inputs_are_504_pixels_and_the_exact_question(scorer):
    prompts = ["a cat", 'say "<|image_pad|>" and <|im_end|> ☕']  # control tokens in a prompt stay plain text
    inputs = scorer.build_inputs(prompts, images(2))
    assert inputs["image_grid_thw"].tolist() == [[1, 36, 36]] * 2  # 36 patches of 14 px = 504
    assert inputs["pixel_values"].shape == (2 * 36 * 36, 3 * 2 * 14 * 14)
    image_token = scorer.image_token_id
    assert ((inputs["input_ids"] == image_token).sum(dim=1) == 324).all()  # 36 * 36 / 2**2
    assert torch.equal(inputs["mm_token_type_ids"], (inputs["input_ids"] == image_token).int())
    for row, prompt in enumerate(prompts):
        ids = inputs["input_ids"][row][inputs["attention_mask"][row].bool()].tolist()
        text = scorer.tokenizer.decode([token for token in ids if token != image_token])
        question = f'Does this image match the caption "{prompt}"? Answer Yes or No.'
        assert f"<|im_start|>user\n<|vision_start|><|vision_end|>{question}<|im_end|>\n" in text
        assert text.endswith("<|im_start|>assistant\n")


def test_long_prompts_are_truncated_not_fatal(scorer):
    long_prompt = "a very long prompt about a boat, café ☕ " * 60  # 2,400 characters
    assert len(long_prompt) > 2000
    short = dataclasses.replace(scorer, max_caption_tokens=40)
    ids = short.build_inputs([long_prompt], images(1))["input_ids"][0]
    text = short.tokenizer.decode([t for t in ids.tolist() if t != short.image_token_id])
    caption = text.split('caption "')[1].split('"? Answer')[0]
    assert long_prompt.startswith(caption) and 0 < len(caption) < 200
    score = scorer([long_prompt], images(1))  # the default limit (512 tokens) on the real forward
    assert torch.isfinite(score).all()


def test_chat_template_only_in_chat_template_json(folder, tmp_path):
    """Repositories may keep the template only with the processor; the scorer then reads chat_template.json."""
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    template = (copy / "chat_template.jinja").read_text()
    (copy / "chat_template.jinja").unlink()
    (copy / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    loaded = VLMScorer.load(str(copy), device="cpu", chunk_size=1, question=ALIGNMENT_QUESTION)
    assert loaded.tokenizer.chat_template is None and loaded.chat_template == template
    original = VLMScorer.load(str(folder), device="cpu", chunk_size=1, question=ALIGNMENT_QUESTION)
    x = images(1)
    assert torch.equal(loaded.build_inputs(["a"], x)["input_ids"], original.build_inputs(["a"], x)["input_ids"])

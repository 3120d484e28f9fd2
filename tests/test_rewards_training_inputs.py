"""What the training rewards' models receive, as in the authors' training (docs/algorithm.md §7), while the evaluation
metrics (§8) keep their own path: PickScore's float preprocessing on the device (not the PIL processor's 8-bit
resize, whatever is installed) and the training VLM's bf16 buffers (rotary inv_freq), with --reward.vlm-fp32-buffers.
"""

import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rewards.build import build_from_specs
from rewards.clip import clip_preprocess
from rewards.config import RewardConfig
from tests.tiny_rewards import TINY_CLIP_IMAGE_SIZE, save_tiny_clip, save_tiny_qwen_vl

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP, also laion's ViT-H/14 processor
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PROMPTS = ["a photo of a cat", "an oil painting of a small wooden boat on a quiet lake"]


def _cubic(x, a=-0.5):
    """The bicubic kernel of antialiased resizing (Keys, a = -0.5, as PIL and torch's antialias path use)."""
    x = np.abs(x)
    return np.where(x < 1, (a + 2) * x**3 - (a + 3) * x**2 + 1,
                    np.where(x < 2, a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a, 0.0))


def _resize_matrix(n_in, n_out):
    """`[n_out, n_in]` weights of an antialiased bicubic downscale: the kernel stretched by the scale, centred at
    `(i + 0.5) * scale`, normalised per output pixel."""
    scale = n_in / n_out
    support = 2 * max(scale, 1.0)
    weights = np.zeros((n_out, n_in))
    for i in range(n_out):
        centre = (i + 0.5) * scale
        j = np.arange(max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), n_in))
        w = _cubic((j + 0.5 - centre) / max(scale, 1.0))
        weights[i, j] = w / w.sum()
    return weights


def test_clip_preprocess_is_antialiased_bicubic_short_side_centre_crop_and_clip_normalisation():
    images = torch.rand(2, 3, 72, 98, generator=torch.Generator().manual_seed(0), dtype=torch.float64).float()
    got = clip_preprocess(images, 32, (32, 32), CLIP_MEAN, CLIP_STD)
    # by hand: short side 72 -> 32, long side int(32 * 98 / 72) = int(43.6) = 43; crop columns int(11 / 2) = 5..37
    resized = F.interpolate(images, size=(32, 43), mode="bicubic", align_corners=False, antialias=True)
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    expected = (resized[..., :, 5:37] - mean) / std
    assert got.shape == (2, 3, 32, 32) and got.dtype == torch.float32
    assert torch.equal(got, expected)
    # the interpolation itself, from the kernel's definition in numpy (separable: rows, then columns)
    by_hand = np.einsum("ij,bcjk,lk->bcil", _resize_matrix(72, 32), images.double().numpy(), _resize_matrix(98, 43))
    assert np.abs(resized.double().numpy() - by_hand).max() < 1e-5
    # portrait images: the long side is the height, the crop is vertical
    tall = clip_preprocess(images.transpose(2, 3), 32, (32, 32), CLIP_MEAN, CLIP_STD)
    assert torch.allclose(tall, expected.transpose(2, 3), atol=1e-6)


@pytest.fixture(scope="module")
def clip_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    return save_tiny_clip(root / "model", seed=1, with_processor=False), save_tiny_clip(root / "processor", seed=2)


def test_pickscore_training_reward_scores_the_float_preprocessing_and_metrics_keep_the_processor(clip_folders):
    model_dir, processor_dir = clip_folders
    cfg = RewardConfig(pickscore_model=str(model_dir), pickscore_processor=str(processor_dir))
    train = build_from_specs(["pickscore:1.0"], cfg, "cpu").terms[0].scorer
    metric = build_from_specs(["pickscore:1.0"], cfg, "cpu", evaluation=True).terms[0].scorer
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    size = TINY_CLIP_IMAGE_SIZE
    pixels = clip_preprocess(images, size, (size, size), CLIP_MEAN, CLIP_STD)
    with torch.no_grad():
        model = train.model
        image_embeds = model.get_image_features(pixel_values=pixels).pooler_output
        text = train.processor.tokenizer(PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
        text_embeds = model.get_text_features(**text).pooler_output
        expected = model.logit_scale.exp() * F.cosine_similarity(text_embeds, image_embeds)

    # whatever backend the installed processor has, training only reads its sizes, mean and std (a namespace that
    # cannot be called stands in for it)
    ip = train.processor.image_processor
    train.processor.image_processor = types.SimpleNamespace(size=ip.size, crop_size=ip.crop_size,
                                                            image_mean=ip.image_mean, image_std=ip.image_std)
    torch.testing.assert_close(train(PROMPTS, images), expected, rtol=0, atol=1e-5)
    # the evaluation metric goes through the processor (8-bit PIL resize without torchvision): another number
    assert (metric(PROMPTS, images) - expected).abs().max() > 1e-3


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory):
    return save_tiny_qwen_vl(tmp_path_factory.mktemp("qwen") / "model", seed=5)


def _vlm(folder, evaluation=False, **options):
    cfg = RewardConfig(vlm_model=str(folder), **options)
    return build_from_specs(["vlm_alignment:1.0"], cfg, "cpu", evaluation=evaluation).terms[0].scorer


def test_training_vlm_has_bf16_buffers_as_the_authors_fsdp_policy_metrics_and_the_option_keep_fp32(qwen_folder):
    train, metric, fp32 = _vlm(qwen_folder), _vlm(qwen_folder, evaluation=True), _vlm(qwen_folder,
                                                                                      vlm_fp32_buffers=True)
    rotary = [name for name, _ in fp32.model.named_buffers() if name.endswith("inv_freq")]
    assert any("visual" in name for name in rotary) and any("language_model" in name for name in rotary)
    trained = dict(train.model.named_buffers())
    for name, buffer in fp32.model.named_buffers():  # every floating buffer cast, as FSDP's buffer_dtype does
        assert buffer.dtype == torch.float32 and dict(metric.model.named_buffers())[name].dtype == torch.float32
        assert trained[name].dtype == torch.bfloat16 and torch.equal(trained[name], buffer.to(torch.bfloat16))

    images = torch.rand(2, 3, 512, 512, generator=torch.Generator().manual_seed(2))
    scores, kept = train(PROMPTS, images), fp32(PROMPTS, images)
    # independently: the fp32 model with only its rotary frequencies rounded to bf16 by hand gives the same scores
    saved = {name: fp32.model.get_buffer(name).clone() for name in rotary}
    try:
        for name in rotary:
            fp32.model.get_buffer(name).copy_(saved[name].bfloat16().float())
        assert torch.equal(fp32(PROMPTS, images), scores)
    finally:
        for name in rotary:
            fp32.model.get_buffer(name).copy_(saved[name])
    # the rounding reaches the score: on this tiny model by about 1e-5 to 5e-5 points of 100 (docs/algorithm.md)
    assert not torch.equal(scores, kept) and (scores - kept).abs().max() < 1e-2

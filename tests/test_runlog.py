"""Run logging: wandb (offline) receives the same records as log.jsonl, plus the rollout pair images."""

import json

import pytest
import torch

from fdfo import runlog, train_loop
from tests.test_train import tiny_config


def test_wandb_offline_gets_the_jsonl_records_and_pair_images(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    sent = []
    real_init = wandb.init

    def spying_init(**kwargs):
        run = real_init(**kwargs)
        real_log = run.log

        def log(data, *args, **kw):
            sent.append(data)
            return real_log(data, *args, **kw)

        run.log = log
        return run

    monkeypatch.setattr(wandb, "init", spying_init)
    cfg = tiny_config(tmp_path / "run", log_wandb=True, image_log_freq=1, image_log_pairs=2)
    train_loop.train(cfg)

    records = [json.loads(line) for line in (tmp_path / "run/log.jsonl").read_text().splitlines()]
    scalars = [d for d in sent if "pairs" not in d and "heldout_images" not in d]
    assert scalars == [{k: v for k, v in r.items() if isinstance(v, (int, float))} for r in records]
    assert "heldout_reward_mean" in scalars[0] and scalars[0]["epoch"] == 0  # the starting model's evaluation
    pictures = [d for d in sent if "pairs" in d]
    assert len(pictures) == 1 and len(pictures[0]["pairs"]) == 2
    grids = [d for d in sent if "heldout_images" in d]  # the held-out grid of the evaluation, as saved in images/
    assert [d["epoch"] for d in grids] == [0] and (tmp_path / "run/images/heldout-epoch-0000000.png").is_file()
    offline = list((tmp_path / "run/wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb"))
    assert len(list(offline[0].glob("files/media/images/*.png"))) == 3
    assert len(list((tmp_path / "run/images").glob("epoch-0000000-pair-*.png"))) == 2


def test_pair_picture_uses_the_one_8_bit_rule():
    """x * 255 = 0.5, 2.5 and 127.5 exactly in float32: the half-up rule of docs/algorithm.md §8 gives 1, 3 and 128
    (round-half-even would give 0, 2 and 128); out-of-range values clamp to 0 and 255."""
    values = torch.tensor([2 / 1020, 10 / 1020, 0.5, -0.2, 1.3])
    a = values.view(1, 1, 5).expand(3, 4, 5)
    b = torch.ones(3, 4, 5)
    picture = runlog.pair_picture(a, b, "a prompt", 0.25, 0.75)
    scale = 64  # 4 x 5 px enlarged to at least 256 px: a whole factor, nearest pixel
    assert [picture.getpixel((x * scale, 0)) for x in range(5)] == [(v, v, v) for v in (1, 3, 128, 0, 255)]
    assert [picture.getpixel((x * scale + scale - 1, 4 * scale - 1)) for x in range(5)] == [
        (v, v, v) for v in (1, 3, 128, 0, 255)]
    assert picture.getpixel((5 * scale, 0)) == (255, 255, 255)


LONG_PROMPT = ("a watercolor painting of a lighthouse on a rocky coast during a storm, with seagulls circling the lamp,"
               " waves breaking over the rocks, a small fishing boat heading home and the last light of the evening on "
               "the clouds; Pneumonoultramicroscopicsilicovolcanoconiosis-and-other-very-long-unbreakable-words")


def test_wrapping_keeps_every_word_and_fits_the_width():
    from PIL import ImageFont

    font = ImageFont.load_default(size=16)
    lines = runlog.wrap_text(LONG_PROMPT, font, 200)
    assert len(lines) > 5 and all(font.getlength(line) <= 200 for line in lines)
    # nothing dropped or cut: the lines are the prompt's words in order (a too-long word split across lines)
    assert "".join(lines).replace(" ", "") == LONG_PROMPT.replace(" ", "")
    assert " ".join(lines).split() != LONG_PROMPT.split()  # the long word had to be split
    assert runlog.wrap_text("", font, 200) == [""]


def test_small_rollouts_are_enlarged_and_the_whole_prompt_is_drawn():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.rand(3, 64, 64, generator=gen), torch.rand(3, 64, 64, generator=gen)
    picture = runlog.pair_picture(a, b, LONG_PROMPT, 0.123456, -0.5)
    assert picture.width == 2 * 256  # each image 256 px: 64 px x 4, nearest pixel
    expected = runlog.to_pil(a).resize((256, 256), runlog.Image.NEAREST)
    assert picture.crop((0, 0, 256, 256)).tobytes() == expected.tobytes()
    # the text band below the images holds the rewards and every wrapped line: its last line has ink
    font = runlog.ImageFont.load_default(size=max(12, 256 // 20))
    lines = runlog.wrap_text(LONG_PROMPT, font, 2 * 256 - 8)
    line = int(font.size * 1.4)
    assert picture.height == 256 + (len(lines) + 1) * line + 8
    last_band = picture.crop((0, picture.height - line - 4, picture.width, picture.height - 4)).convert("L")
    assert last_band.getextrema()[0] < 128


def test_large_rollouts_keep_their_size():
    picture = runlog.pair_picture(torch.rand(3, 512, 512), torch.rand(3, 512, 512), "a cat", 1.0, 2.0)
    assert picture.width == 1024

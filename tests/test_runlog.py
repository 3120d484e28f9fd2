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
    scalars = [d for d in sent if "pairs" not in d]
    assert scalars == [{k: v for k, v in r.items() if isinstance(v, (int, float))} for r in records]
    pictures = [d for d in sent if "pairs" in d]
    assert len(pictures) == 1 and len(pictures[0]["pairs"]) == 2
    offline = list((tmp_path / "run/wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb"))
    assert len(list(offline[0].glob("files/media/images/*.png"))) == 2
    assert len(list((tmp_path / "run/images").glob("epoch-0000000-pair-*.png"))) == 2


def test_pair_picture_uses_the_one_8_bit_rule():
    """x * 255 = 0.5, 2.5 and 127.5 exactly in float32: the half-up rule of docs/algorithm.md §8 gives 1, 3 and 128
    (round-half-even would give 0, 2 and 128); out-of-range values clamp to 0 and 255."""
    values = torch.tensor([2 / 1020, 10 / 1020, 0.5, -0.2, 1.3])
    a = values.view(1, 1, 5).expand(3, 4, 5)
    b = torch.ones(3, 4, 5)
    picture = runlog.pair_picture(a, b, "a prompt", 0.25, 0.75)
    assert [picture.getpixel((x, 0)) for x in range(5)] == [(v, v, v) for v in (1, 3, 128, 0, 255)]
    assert picture.getpixel((5, 0)) == (255, 255, 255)

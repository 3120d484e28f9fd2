"""Run logging: wandb (offline) receives the same records as log.jsonl, plus the rollout pair images."""

import json

import pytest

from fdfo import train_loop
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

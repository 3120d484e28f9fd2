"""Batch geometry of docs/algorithm.md §5: the published cases and clear errors."""

import pytest

from fdfo.config import Config, SampleConfig, TrainConfig, batch_geometry


@pytest.mark.parametrize("world,pairs,sample,train,accum,max_batch", [
    (4, 108, 6, 6, 9, 6),
    (8, 54, 9, 9, 3, 13),
    (1, 432, 6, 6, 36, 6),
    (32, 12, 12, 6, 1, 13),  # 432 // 32 = 13 -> rounded down to a multiple of 2
])
def test_published_geometry(world, pairs, sample, train, accum, max_batch):
    geom = batch_geometry(Config(), world)
    assert (geom.pairs_per_gpu, geom.sample_batch, geom.train_batch, geom.grad_accum) == (pairs, sample, train, accum)
    assert geom.items_per_step == 2 * pairs // 4 == train * accum
    assert geom.total_pairs == pairs * world


def test_odd_gradient_steps_need_a_multiple_of_pairs():
    # 3 steps: 2 * pairs must be divisible by 3 -> pairs a multiple of 3
    geom = batch_geometry(Config(total_pairs_per_epoch=100, gradient_steps_per_epoch=3), 1)
    assert geom.pairs_per_gpu == 99 and geom.items_per_step == 66


def test_explicit_batches_are_used_or_rejected_with_the_valid_values():
    cfg = Config(total_pairs_per_epoch=16, gradient_steps_per_epoch=2, sample=SampleConfig(batch_size=4),
                 train=TrainConfig(batch_size=8))
    geom = batch_geometry(cfg, 1)
    assert (geom.sample_batch, geom.train_batch, geom.grad_accum) == (4, 8, 2)
    cfg.sample.batch_size = 5
    with pytest.raises(ValueError, match=r"--sample.batch-size 5 must divide the 16 pairs per GPU.*\[1, 2, 4, 8, 16\]"):
        batch_geometry(cfg, 1)
    cfg.sample.batch_size, cfg.train.batch_size = None, 3
    with pytest.raises(ValueError, match=r"--train.batch-size 3 must divide the 16 items per step"):
        batch_geometry(cfg, 1)


def test_too_few_pairs_for_the_world_size():
    with pytest.raises(ValueError, match=r"--total-pairs-per-epoch 6 is too small for 4 GPU\(s\).*>= 8"):
        batch_geometry(Config(total_pairs_per_epoch=6), 4)
    with pytest.raises(ValueError, match="gradient-steps-per-epoch must be >= 1"):
        batch_geometry(Config(gradient_steps_per_epoch=0), 1)


def test_a_zero_max_batch_size_is_an_error_not_the_default():
    cfg = Config(max_batch_size=0)
    with pytest.raises(ValueError, match="--max-batch-size must be >= 1, got 0"):
        batch_geometry(cfg, 1)

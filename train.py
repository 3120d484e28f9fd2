"""FDFO training: post-train SD3.5-Medium with a LoRA against a reward (see README.md and docs/algorithm.md); with
--algorithm, the Flow-GRPO and DiffusionNFT baselines in the same loop.

Single GPU or CPU:
    python train.py --num-epochs 5 --total-pairs-per-epoch 16
    python train.py --preset smoke                   # tiny offline model and analytic reward, on a CPU
    python train.py --preset flow_grpo               # the published baselines in the same loop (docs/algorithm.md §11);
    python train.py --preset diffusion_nft           # or --algorithm flow_grpo|diffusion_nft with your own flags

Multi-GPU (one node; add --nnodes and --rdzv-* for several, see README.md):
    torchrun --nproc_per_node=8 train.py --reward-preset pickscore

Rerunning with the same --run-dir resumes from its newest checkpoint. `python train.py --help` lists every flag.
`--config runs/<run>/config.json` starts from the settings that run recorded (flags after it override them).
"""

from fdfo.cli import guarded


def main(argv: list[str] | None = None) -> None:
    guarded(lambda: _main(argv))  # from the first heavy import on, Ctrl-C is one "interrupted" line, not a traceback


def _main(argv: list[str] | None) -> None:
    import sys

    from fdfo.cli import parse_with_preset, run_main
    from fdfo.config import PRESETS, Config
    from fdfo.models.registry import is_tiny
    from fdfo.replay import expand_config
    from fdfo.threads import single_thread_if_tiny

    cfg = parse_with_preset(Config, PRESETS, expand_config(sys.argv[1:] if argv is None else argv),
                            description=__doc__)
    single_thread_if_tiny(is_tiny(cfg.pretrained_model))  # the smoke presets: one CPU thread (fdfo/threads.py)
    from fdfo.train_loop import train

    run_main(train, cfg)


if __name__ == "__main__":
    main()

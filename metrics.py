r"""Evaluate a checkpoint by the protocol of docs/algorithm.md §8: seeded prompts, per-image seeds, 8-bit images, a
table of means with 95 % confidence intervals (t-interval over prompts) and a JSON file.

Single GPU or CPU:
    python metrics.py --checkpoint $CHECKPOINT --prompt-set pickscore_train --num-prompts 4096 \
        --metrics pickscore vlm_alignment --out results.json

Multi-GPU (the same images and numbers on any number of GPUs):
    torchrun --nproc_per_node=8 metrics.py --checkpoint $CHECKPOINT --prompt-set hpdv2 --num-prompts 3200 \
        --num-repeats 4 --metrics hpsv2 clip_h14 clip_l14 dreamsim_diversity

Two checkpoints on the same prompts and seeds (mean difference A - B, its 95 % interval, paired t-test p-value):
    python metrics.py --checkpoint $A --compare $B --prompt-set hpdv2 --num-prompts 3200 --metrics hpsv2

$CHECKPOINT: a run checkpoint folder (RUN:best: the one with the best held-out reward of train.py's evaluation), a PEFT
LoRA folder, a huggingface.co URL or hf:<org>/<repo>/<subfolder>; leave --checkpoint out to evaluate the base model.
Fetch the prompt sets first with `python -m fdfo.prompts download hpdv2` (or pickscore_train). `python metrics.py
--help` lists every flag.
"""

from fdfo.cli import guarded, run_main


def main(argv: list[str] | None = None) -> None:
    guarded(lambda: _main(argv))  # from the first heavy import on, Ctrl-C is one "interrupted" line, not a traceback


def _main(argv: list[str] | None) -> None:
    import tyro

    from fdfo.evaluation import EvalConfig

    cfg = tyro.cli(EvalConfig, args=argv, description=__doc__)
    from fdfo.evaluation import evaluate

    run_main(evaluate, cfg)


if __name__ == "__main__":
    main()

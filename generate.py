"""Image grids from FDFO, DiffusionNFT and Flow-GRPO checkpoints (or the base model), for a look side by side.

Single GPU or CPU:
    python generate.py --checkpoint $CHECKPOINT --out out.jpg [--guidance-scale 4.5]
    python generate.py --checkpoint base $CHECKPOINT_A $CHECKPOINT_B --out compare.jpg --prompts my_prompts.txt

Offline on a CPU, from a smoke run (`python train.py --preset smoke`; sampled at its 64 px and 6 steps):
    python generate.py --checkpoint runs/<id>-smoke --out smoke.jpg

Multi-GPU (the images are shared out; the grid is the same as on one GPU):
    torchrun --nproc_per_node=8 generate.py --checkpoint $CHECKPOINT --out out.jpg --grid-rows 2 --grid-cols 4

$CHECKPOINT is the browser address of a Hugging Face folder
(https://huggingface.co/nvidia/finite-difference-flow-optimization/tree/main/fdfo-combined-reward-no-cfg/epoch-0000100),
a repository holding an adapter at its root (https://huggingface.co/worstcoder/SD3.5M-DiffusionNFT-MultiReward),
hf:ORG/REPO[/SUB/DIR], a local PEFT folder or diffusers LoRA folder (pytorch_lora_weights.safetensors), one of our
runs (runs/<id>-<name>, its newest checkpoint; runs/<id>-<name>:best, the one with the best held-out reward) or
checkpoints (runs/<id>-<name>/checkpoints/epoch-XXXXXXX), or `base`.
Only that folder is downloaded. The guidance scale defaults to the one the checkpoint was trained with. Every image is
what the model's own diffusers pipeline (StableDiffusion3Pipeline, or FluxPipeline for a FLUX checkpoint) gives for its
prompt and seed (the LoRA as an unmerged PEFT adapter).
`python generate.py --help` lists every flag.
"""

from __future__ import annotations

from dataclasses import dataclass

from fdfo.cli import guarded, run_main


@dataclass
class GenerateConfig:
    checkpoint: tuple[str, ...] = ()
    """One or more checkpoints, one block of columns each (see above); `base` is the base model. Default: base."""
    out: str = "out.jpg"
    """Output image; .jpg/.jpeg (JPEG) or .png (PNG); checked to be writable before anything loads."""
    guidance_scale: float | None = None
    """Guidance. SD3: the CFG scale; default: the checkpoint's (our state.json; 4.5 for Flow-GRPO's
    jieliu/SD3.5M-FlowGRPO-*, 1.0 for worstcoder/SD3.5M-DiffusionNFT-MultiReward; -no-cfg / -cfg-2.0 / -cfg-4.5 in an
    FDFO folder name), else 1. FLUX: the distilled guidance fed to the network (never CFG); default the checkpoint's,
    else 3.5. A different value than the checkpoint's warns."""
    prompts: str | None = None
    """Prompt file, one prompt per line; default: 15 built-in prompts of varied subjects and styles."""
    num_prompts: int | None = None
    """Use only the first N prompts."""
    grid_rows: int = 1
    """Rows of images per prompt (and checkpoint)."""
    grid_cols: int = 4
    """Columns of images per prompt (and checkpoint)."""
    seed: int = 0
    """Image `index` of a checkpoint's block (prompt-major, then row, then column) uses seed + index (mod 2**31)."""
    batch_size: int = 4
    """Images per forward pass (per GPU); it does not change the images."""
    num_steps: int | None = None
    """Sampling steps (the pipeline's num_inference_steps: Euler, no churn); default 40, or on a built-in tiny model
    (builtin:tiny-sd3, builtin:tiny-flux, e.g. a smoke run's checkpoint) the steps the checkpoint was trained with
    (else 6)."""
    resolution: int | None = None
    """Image height and width in pixels; default 512, or on a built-in tiny model the checkpoint's training size
    (else 64)."""
    pretrained_model: str | None = None
    """Base model (hub id or folder of an SD3 / SD3.5 or FLUX pipeline); default: the one our checkpoint records, else
    SD3.5 Medium. A checkpoint of another model family is refused."""
    device: str | None = None
    """Torch device; default cuda:<local rank> when CUDA is available, else cpu."""


def main(argv: list[str] | None = None) -> None:
    guarded(lambda: _main(argv))  # from the first heavy import on, Ctrl-C is one "interrupted" line, not a traceback


def _main(argv: list[str] | None) -> None:
    import tyro

    cfg = tyro.cli(GenerateConfig, args=argv, description=__doc__)
    from fdfo.grid import generate_grid

    run_main(generate_grid, cfg)


if __name__ == "__main__":
    main()

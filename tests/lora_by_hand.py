"""A LoRA merged into a plain diffusers transformer by hand (W <- W + scale B A): the independent side of the tests
that compare the project's unmerged PEFT adapter with the model's own pipeline."""

import torch

PEFT_PREFIX = "base_model.model."


def merge_by_hand(transformer, state: dict[str, torch.Tensor], scale: float) -> None:
    """W <- W + scale B A for every adapted layer of a PEFT state dict, into a plain (non-PEFT) transformer."""
    with torch.no_grad():
        for key, a in state.items():
            if key.endswith(".lora_A.weight"):
                name = key.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight")
                b = state[key.replace(".lora_A.", ".lora_B.")]
                transformer.get_submodule(name).weight += scale * b @ a

"""What every diffusers-pipeline policy shares: the dtype layout, decoding, text-encoder offload, speed options and the
PEFT LoRA adapter (its init, fp32 parameters, saving and loading).

A model module subclasses `PipelinePolicy` and adds what is its own: loading its pipeline, prompt encoding, the
velocity, the latent shape and the sigma schedule. The frozen base is bf16 on CUDA and fp32 elsewhere; the LoRA
parameters are fp32 and use PEFT's "gaussian" init (docs/algorithm.md §6): A ~ N(0, (1/r)^2), B = 0, so the update
starts at zero and before training the policy is the base model exactly.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from safetensors.torch import load_file


def base_dtype(device: torch.device) -> torch.dtype:
    """The frozen base model's dtype: bf16 on CUDA (the published protocol), fp32 elsewhere (slow bf16 CPU kernels)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def freeze_pipeline(pipe):
    """No progress bars, every module frozen and in eval mode; returns `pipe`."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    pipe.set_progress_bar_config(disable=True)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.requires_grad_(False).eval()
    return pipe


def add_lora(transformer: torch.nn.Module, targets: str | tuple[str, ...], rank: int, alpha: float):
    """Wrap the transformer with a PEFT LoRA on `targets` (module-name suffixes, or one regex matched against whole
    module names); trainable parameters in fp32."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets if isinstance(targets, str) else list(targets),
                        lora_dropout=0.0, init_lora_weights="gaussian")  # A ~ N(0, (1/r)^2), B = 0 (§6)
    model = get_peft_model(transformer, config)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model


def compile_each_block(blocks) -> None:
    """torch.compile each block in place (regional compilation: one small graph reused by all blocks of a kind, so
    compiling is quick and the LoRA wrapper and DDP stay eager)."""
    import torch._dynamo

    # the blocks share one code object: allow a graph per block kind x batch size x grad mode, not the default 8
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))
    for block in blocks:
        block.compile()


class PipelinePolicy:
    """The shared half of a policy. A subclass sets `device`, `dtype`, `amp_dtype`, `pipe` (with `vae` and the text
    encoders named in TEXT_ENCODERS) and `transformer` (the PEFT-wrapped network, or the plain one without a LoRA),
    and defines `blocks()`, `velocity`, `encode`, `latent_shape` and `sigmas`."""

    TEXT_ENCODERS: tuple[str, ...] = ()

    def blocks(self) -> list[torch.nn.Module]:
        """The transformer blocks, in order (what compile_each_block compiles)."""
        raise NotImplementedError

    def speed_options(self, compile_blocks: bool = False, gradient_checkpointing: bool = False) -> None:
        """Opt-in speed / memory options (both off by default; the math is unchanged).

        compile_blocks: torch.compile each transformer block in place (regional compilation).
        gradient_checkpointing: recompute each block's activations in the backward pass (non-reentrant, so the
        LoRA parameters inside get their gradients although the block inputs do not require grad).
        """
        if gradient_checkpointing:
            self.pipe.transformer.enable_gradient_checkpointing()
        if compile_blocks:
            compile_each_block(self.blocks())

    # -- decoding and the text encoders --------------------------------------------------------------------------------

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Latents `[B, C, h, w]` -> images `[B, 3, 8h, 8w]` float32 in [0, 1] (training rollouts, §6).

        `latent / scaling_factor + shift_factor` in float32, then the VAE and the postprocessing `x / 2 + 0.5`,
        clamped, under the training autocast as the authors run them (fp16 by default: the VAE's first layer sees
        fp16 latents, and the images come out with fp16 values); without autocast in the VAE's own dtype.

        batch_size: images per VAE call (--sample.decode-batch-size); default all B at once. Every operation of the
        VAE decoder works per image, so smaller calls only lower the peak memory of the decode.
        """
        vae = self.pipe.vae
        latents = latents.float() / vae.config.scaling_factor + vae.config.shift_factor
        if self.amp_dtype is None:
            latents = latents.to(vae.dtype)
        parts = []
        with self.autocast():
            for chunk in latents.split(batch_size or len(latents)):
                images = vae.decode(chunk, return_dict=False)[0]
                parts.append((images / 2 + 0.5).clamp(0, 1).float())
        return torch.cat(parts)

    def offload_text_encoders(self, offload: bool) -> None:
        """Park the text encoders on CPU (training phase) or bring them back (sampling phase)."""
        target = torch.device("cpu") if offload else self.device
        for name in self.TEXT_ENCODERS:
            encoder = getattr(self.pipe, name, None)
            if encoder is not None:
                encoder.to(target)

    # -- precision -----------------------------------------------------------------------------------------------------

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    @property
    def input_dtype(self) -> torch.dtype:
        """The dtype the transformer's first layer computes in: the autocast dtype when there is one, else the
        model's. A state rounded to it is exactly what the network sees, so rollouts store states in this dtype
        (fdfo/phases.py:rollout_dtypes)."""
        return self.amp_dtype or self.dtype

    def base_velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """Velocity of the frozen base model (adapter disabled), for the optional KL-like term."""
        with torch.no_grad(), self.transformer.disable_adapter():
            return self.velocity(x, sigma, cond)

    # -- the adapter ---------------------------------------------------------------------------------------------------

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.transformer.parameters() if p.requires_grad]

    def adapter_state(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self.transformer)

    def save_adapter(self, folder: Path) -> None:
        """PEFT format: adapter_config.json + adapter_model.safetensors."""
        self.transformer.save_pretrained(str(folder))

    def load_adapter(self, folder: Path) -> None:
        """Restore adapter weights saved by `save_adapter`, checking that every tensor fits."""
        from peft import set_peft_model_state_dict

        state = load_file(str(Path(folder) / "adapter_model.safetensors"))
        result = set_peft_model_state_dict(self.transformer, state)
        missing = [k for k in result.missing_keys if "lora_" in k]
        if missing or result.unexpected_keys:
            raise ValueError(f"adapter in {folder} does not fit this model: missing {missing[:3]}, "
                             f"unexpected {list(result.unexpected_keys)[:3]}")
        for p in self.trainable_parameters():
            p.data = p.data.float()

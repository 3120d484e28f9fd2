"""What every diffusers-pipeline policy shares: the dtype layout, loading and freezing a pipeline, decoding,
text-encoder offload, the speed options and the PEFT LoRA adapter (its init, fp32 parameters, saving and loading).

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
    """The frozen base's default dtype: bf16 on CUDA (the authors'), float32 elsewhere (CPU has slow bf16 kernels)."""
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


def from_pretrained(pipeline_class, name: str, source: str, dtype: torch.dtype, what: str):
    """`pipeline_class.from_pretrained(source)`; a model that cannot be loaded is one FileNotFoundError naming the fix
    (`what`: the model family, e.g. "SD3", "FLUX")."""
    try:
        return pipeline_class.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError) as e:  # hub errors (offline, missing repo, gated) are OSError subclasses
        raise FileNotFoundError(
            f"could not load the {what} pipeline {name!r}: {e.__class__.__name__}: {str(e).splitlines()[0]}\n"
            f"Fix: pass --pretrained-model with a local folder, or log in and download it first "
            f"(`hf download {name}`; a gated model needs its licence accepted on the model page)."
        ) from None


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


class PipelinePolicy:
    """The shared half of a policy. A subclass sets `device`, `dtype`, `amp_dtype`, `guidance_scale`, `pipe` (with
    `vae` and the text encoders named in TEXT_ENCODERS) and `transformer` (the PEFT-wrapped network, or the plain one
    without a LoRA), through `_load` or by hand, and defines `blocks()`, `velocity`, `encode`, `latent_shape`,
    `sigmas`, `load_pipeline`, `resolution_multiple` and `activation_bytes` (the interface of
    fdfo/models/__init__.py)."""

    FAMILY = ""  # what a checkpoint records as its model ("model_family" in state.json)
    PIPELINE = ""  # the diffusers pipeline class that samples it (generation, evaluation, export)
    DEFAULT_GUIDANCE = 1.0  # --sample.guidance-scale / --guidance-scale when not given
    AUTO_PRECISION = "fp16"  # what --train.precision auto means on CUDA (fp32 elsewhere)
    TEXT_ENCODERS: tuple[str, ...] = ()
    LORA_TARGETS: str | tuple[str, ...] = ()  # the adapted Linear layers (peft target_modules)
    levers = None  # the SD3 speed levers (fdfo/models/sd3_speed.py); None: the model has none

    def _load(self, pretrained: str, device: torch.device, lora_rank: int | None, lora_alpha: float,
              guidance_scale: float | None, amp_dtype: torch.dtype | None, dtype: torch.dtype | None) -> None:
        """The start of every policy's __init__: the dtypes, the guidance (None: DEFAULT_GUIDANCE), the frozen
        pipeline and its transformer with the LoRA of LORA_TARGETS (lora_rank None: the plain transformer)."""
        self._settings(device, guidance_scale, amp_dtype, dtype)
        self._adapt(self.load_pipeline(pretrained, device, self.dtype), lora_rank, lora_alpha)

    def _settings(self, device: torch.device, guidance_scale: float | None, amp_dtype: torch.dtype | None,
                  dtype: torch.dtype | None) -> None:
        """The device, the base's dtype (None: `base_dtype`), the autocast dtype and the guidance (None:
        DEFAULT_GUIDANCE)."""
        self.device = device
        self.dtype = dtype or base_dtype(device)
        self.amp_dtype = amp_dtype
        self.guidance_scale = self.DEFAULT_GUIDANCE if guidance_scale is None else guidance_scale
        self._negative = None

    def _adapt(self, pipe, lora_rank: int | None, lora_alpha: float) -> None:
        """Hold `pipe` and its transformer with the LoRA of LORA_TARGETS (lora_rank None: the plain transformer)."""
        self.pipe = pipe
        self.transformer = (pipe.transformer if lora_rank is None
                            else add_lora(pipe.transformer, self.LORA_TARGETS, lora_rank, lora_alpha))

    @staticmethod
    def uses_cfg(guidance_scale: float) -> bool:
        """Whether this model at `guidance_scale` combines two forward passes per velocity (classifier-free guidance);
        False unless the model says otherwise."""
        return False

    @property
    def cfg(self) -> bool:
        """Whether a velocity is a combination of two forward passes (classifier-free guidance): what the rollout
        storage, the FLOP model and Flow-GRPO's detached unconditional half depend on."""
        return self.uses_cfg(self.guidance_scale)

    def blocks(self) -> list[torch.nn.Module]:
        """The transformer blocks, in order (what regional compilation compiles, what checkpointing recomputes)."""
        raise NotImplementedError

    @classmethod
    def pipeline_class(cls):
        import diffusers

        return getattr(diffusers, cls.PIPELINE)

    def speed_options(self, compile_blocks: bool = False, gradient_checkpointing: bool = False,
                      compile_scope: str = "blocks", fused_rms_norm: bool = False,
                      compute_dtype_modulation: bool = False, compile_backend: str | None = None) -> None:
        """Opt-in speed / memory options (all off by default).

        compile_blocks: torch.compile the transformer (fdfo/compile.py): each block in place (compile_scope "blocks",
        regional compilation: one small graph reused by all blocks of a kind, so compiling is quick and the LoRA
        wrapper, CFG and DDP stay eager) or its whole forward ("transformer"), the batch dimension dynamic.
        gradient_checkpointing: recompute each block's activations in the backward pass (non-reentrant, so the
        LoRA parameters inside get their gradients although the block inputs do not require grad).
        fused_rms_norm, compute_dtype_modulation: kernels that move rounding (fdfo/fused.py), applied to the model
        itself, so sampling and training share them.
        """
        base = self.pipe.transformer
        if gradient_checkpointing:
            base.enable_gradient_checkpointing()
        if fused_rms_norm or compute_dtype_modulation:
            from fdfo.fused import apply_numerics_options

            apply_numerics_options(base, fused_rms_norm, compute_dtype_modulation)
        if compile_blocks:
            from fdfo.compile import compile_transformer

            compile_transformer(base, compile_scope, compile_backend, self.blocks())

    # -- decoding and the text encoders --------------------------------------------------------------------------------

    def negative(self) -> dict[str, torch.Tensor]:
        """Empty-prompt embedding `[1, ...]` (the unconditional half of CFG), encoded once."""
        if getattr(self, "_negative", None) is None:
            self._negative = self.encode([""])
        return self._negative

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Latents `[B, C, h, w]` -> images `[B, 3, 8h, 8w]` float32 in [0, 1] (training rollouts, §6).

        `latent / scaling_factor + shift_factor` in float32, then the VAE and the postprocessing `x / 2 + 0.5`,
        clamped, under the training autocast as the authors run them (fp16 by default: the VAE's first layer sees
        fp16 latents, and the images come out with fp16 values); without autocast in the VAE's own dtype.

        batch_size: images per VAE call (--sample.decode-batch-size, 1 by default as the authors' training); None: all
        B at once. Every operation of the VAE decoder works per image, so the batch size changes the decode's peak
        memory and the kernels' rounding (docs/performance.md), not the math.
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
        """The dtype the transformer's first layer computes in: the autocast dtype when there is one (the authors keep
        states in fp32 and autocast rounds them to fp16 on entry), else the model's. A state rounded to it is exactly
        what the network sees, so rollouts store states in this dtype (fdfo/phases.py:rollout_dtypes)."""
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
        if self.levers is not None:
            self.levers.drop_casts()

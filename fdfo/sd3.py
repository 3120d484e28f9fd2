"""Stable Diffusion 3(.5) behind the model-agnostic velocity interface, with a PEFT LoRA on the transformer.

The frozen base is bf16 on GPU (fp32 on CPU); the LoRA parameters are fp32. They use PEFT's "gaussian" init
(docs/algorithm.md §6): A ~ N(0, (1/r)^2), B = 0, so the update starts at zero and before training the pipeline
reproduces the base model exactly. The transformer always receives `timestep = 1000 * sigma` in float32 (§1).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from safetensors.torch import load_file

from fdfo.sd3_speed import LeverRuntime, SpeedLevers

SD35_MEDIUM = "stabilityai/stable-diffusion-3.5-medium"  # the default base model (training and generation)
LORA_TARGETS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
)
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
T5_MAX_LENGTH = 128


def load_pipeline(name: str, device: torch.device, dtype: torch.dtype):
    """Load a StableDiffusion3Pipeline from a hub id, a local folder or `builtin:tiny-sd3`; freeze everything."""
    from diffusers import StableDiffusion3Pipeline
    from diffusers.utils import logging as diffusers_logging

    from fdfo import tiny

    diffusers_logging.disable_progress_bar()

    if name == tiny.RANDOM_SD35M:  # the real shapes at random init, built on the device (benchmarks, GPU checks)
        pipe = tiny.random_sd35m_pipeline(device).to(dtype=dtype)
    else:
        pipe = _from_pretrained(StableDiffusion3Pipeline, name, tiny.resolve_builtin(name), dtype)
    pipe.set_progress_bar_config(disable=True)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.requires_grad_(False).eval()
    return pipe.to(device)


def _from_pretrained(pipeline_class, name: str, source: str, dtype: torch.dtype):
    try:
        return pipeline_class.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError) as e:  # hub errors (offline, missing repo, gated) are OSError subclasses
        raise FileNotFoundError(
            f"could not load the SD3 pipeline {name!r}: {e.__class__.__name__}: {str(e).splitlines()[0]}\n"
            f"Fix: pass --pretrained-model with a local folder, or log in and download it first "
            f"(`hf download {name}`; SD3.5 is gated: accept its licence on the model page)."
        ) from None


def add_lora(transformer: torch.nn.Module, rank: int, alpha: float):
    """Wrap the transformer with a PEFT LoRA on the joint-attention projections; trainable params in fp32."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(LORA_TARGETS), lora_dropout=0.0,
                        init_lora_weights="gaussian")  # A ~ N(0, (1/r)^2), B = 0 (docs/algorithm.md §6)
    model = get_peft_model(transformer, config)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model


def base_dtype(device: torch.device) -> torch.dtype:
    """The frozen base's default dtype: bf16 on CUDA (the authors'), float32 elsewhere (CPU has slow bf16 kernels)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class SD3Policy:
    """The SD3 pipeline as a velocity field `v(x, sigma, cond)` plus prompt encoding and decoding.

    cond is a dict of per-sample tensors: `embeds [B, 77 + 128, D]` and `pooled [B, D_pooled]`.
    """

    def __init__(self, pretrained: str, device: torch.device, lora_rank: int | None, lora_alpha: float = 0.0,
                 guidance_scale: float = 1.0, amp_dtype: torch.dtype | None = None, dtype: torch.dtype | None = None,
                 levers: SpeedLevers | None = None):
        """lora_rank None: no trainable adapter, `transformer` is the plain pipeline transformer (generation, where a
        published adapter is merged into it, see fdfo.generation). dtype: of the frozen base; default bf16 on CUDA,
        float32 elsewhere (tests and the kernel census pass bf16 to follow the GPU's path on a CPU). levers: the
        bit-identical speed levers (fdfo/sd3_speed.py; default all on)."""
        self.device = device
        self.dtype = dtype or base_dtype(device)
        self.amp_dtype = amp_dtype
        self.guidance_scale = guidance_scale
        self.pipe = load_pipeline(pretrained, device, self.dtype)
        self.transformer = (self.pipe.transformer if lora_rank is None
                            else add_lora(self.pipe.transformer, lora_rank, lora_alpha))
        self.levers = LeverRuntime(self.transformer, amp_dtype, levers or SpeedLevers())
        self.latent_channels = self.pipe.transformer.config.in_channels
        self._negative = None
        self._encode_fn = None

    @classmethod
    def from_components(cls, transformer: torch.nn.Module, vae: torch.nn.Module, scheduler, device: torch.device,
                        lora_rank: int | None, lora_alpha: float = 0.0, guidance_scale: float = 1.0,
                        amp_dtype: torch.dtype | None = None, encode_fn=None,
                        dtype: torch.dtype | None = None, levers: SpeedLevers | None = None) -> SD3Policy:
        """A policy from in-memory modules, no pipeline folder (benchmarks: random-init models of the real shapes).

        encode_fn(prompts) -> {"embeds": [B, S, D], "pooled": [B, D_pooled]} stands in for the text encoders.
        The modules are frozen and moved to `device` in the policy dtype (`dtype`; default bf16 on GPU, fp32 on CPU).
        """
        import types

        self = cls.__new__(cls)
        self.device = device
        self.dtype = dtype or base_dtype(device)
        self.amp_dtype = amp_dtype
        self.guidance_scale = guidance_scale
        for module in (transformer, vae):
            module.requires_grad_(False).eval().to(device=device, dtype=self.dtype)
        self.pipe = types.SimpleNamespace(transformer=transformer, vae=vae, scheduler=scheduler,
                                          vae_scale_factor=2 ** (len(vae.config.block_out_channels) - 1))
        self.transformer = transformer if lora_rank is None else add_lora(transformer, lora_rank, lora_alpha)
        self.levers = LeverRuntime(self.transformer, amp_dtype, levers or SpeedLevers())
        self.latent_channels = transformer.config.in_channels
        self._negative = None
        self._encode_fn = encode_fn
        return self

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

            compile_transformer(base, compile_scope, compile_backend)

    # -- prompts and decoding ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        if self._encode_fn is not None:
            return self._encode_fn(prompts)
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=False, max_sequence_length=T5_MAX_LENGTH)
        return {"embeds": embeds, "pooled": pooled}

    def negative(self) -> dict[str, torch.Tensor]:
        """Empty-prompt embedding for CFG, `[1, ...]`, encoded once."""
        if self._negative is None:
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

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        factor = self.pipe.vae_scale_factor * self.pipe.transformer.config.patch_size
        if resolution % factor:
            raise ValueError(f"--sample.resolution {resolution} must be a multiple of {factor}")
        side = resolution // self.pipe.vae_scale_factor
        return (self.latent_channels, side, side)

    def sigmas(self, num_steps: int) -> torch.Tensor:
        """The scheduler's `[T+1]` noise levels from 1 to 0 (with the model's shift)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.pipe.scheduler.config)
        scheduler.set_timesteps(num_steps, device="cpu")
        return scheduler.sigmas.float().to(self.device)

    def offload_text_encoders(self, offload: bool) -> None:
        """Park the text encoders on CPU (training phase) or bring them back (sampling phase)."""
        target = torch.device("cpu") if offload else self.device
        for name in TEXT_ENCODERS:
            encoder = getattr(self.pipe, name, None)
            if encoder is not None:
                encoder.to(target)

    # -- the velocity field --------------------------------------------------------------------------------------------

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

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict[str, torch.Tensor],
                 module: torch.nn.Module | None = None, detach_uncond: bool = False) -> torch.Tensor:
        """v(x, sigma, cond) in float32, with CFG `v_u + g (v_c - v_u)` when g != 1 (docs/algorithm.md §2).

        The timestep `1000 * sigma` stays float32 whatever the model dtype (§1: bf16 would move it by up to ~2).
        The state enters as `x.to(self.input_dtype)`: under autocast exactly the value autocast would give the first
        layer from an fp32 state (fp16(x) by default, not bf16(x)). Under autocast the CFG combination is computed in
        the network's output dtype, as the authors do (it is then exactly representable in that dtype).

        module: the network to call (e.g. the DDP wrapper while training); default the LoRA transformer.
        detach_uncond: with CFG, cut the gradient through the unconditional half (Flow-GRPO's loss, §11), so that
            only `g * dv_c` reaches the LoRA; the value is the same.
        """
        module = module or self.transformer
        embeds, pooled = cond["embeds"], cond["pooled"]
        if self.guidance_scale != 1.0:
            neg = self.negative()
            batch = len(x)
            x = torch.cat([x, x])
            sigma = torch.cat([sigma, sigma])
            embeds = torch.cat([neg["embeds"].expand(batch, -1, -1), embeds])
            pooled = torch.cat([neg["pooled"].expand(batch, -1), pooled])
        with self.autocast():
            v = module(hidden_states=x.to(self.input_dtype), timestep=sigma.float() * 1000,
                       encoder_hidden_states=embeds, pooled_projections=pooled, return_dict=False)[0]
            if self.amp_dtype is None:
                v = v.float()
            if self.guidance_scale != 1.0:
                v_uncond, v_cond = v.chunk(2)
                if detach_uncond:
                    v_uncond = v_uncond.detach()
                v = v_uncond + self.guidance_scale * (v_cond - v_uncond)
        return v.float()

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
        self.levers.drop_casts()

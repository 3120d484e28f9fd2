"""Stable Diffusion 3(.5) behind the model interface (fdfo/models/__init__.py), with a PEFT LoRA on the transformer:
SD3.5-Medium (the default base model), SD3.5-Large and any StableDiffusion3Pipeline folder.

The frozen base is bf16 on GPU (fp32 on CPU); the LoRA parameters are fp32. They use PEFT's "gaussian" init
(docs/algorithm.md §6): A ~ N(0, (1/r)^2), B = 0, so the update starts at zero and before training the pipeline
reproduces the base model exactly. The transformer always receives `timestep = 1000 * sigma` in float32 (§1). The
guidance scale is classifier-free guidance: any value but 1 makes a velocity two forward passes.
"""

from __future__ import annotations

import torch

from fdfo.models.base import PipelinePolicy, freeze_pipeline, from_pretrained
from fdfo.models.base import add_lora as add_lora_to
from fdfo.models.sd3_speed import LeverRuntime, SpeedLevers

SD35_MEDIUM = "stabilityai/stable-diffusion-3.5-medium"  # the default base model (training and generation)
SD35_LARGE = "stabilityai/stable-diffusion-3.5-large"  # same transformer class: 38 blocks, no dual attention
LORA_TARGETS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
)
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
T5_MAX_LENGTH = 128
TEXT_TOKENS = 77 + T5_MAX_LENGTH  # CLIP-L and CLIP-G side by side (77), then T5


def load_pipeline(name: str, device: torch.device, dtype: torch.dtype):
    """Load a StableDiffusion3Pipeline from a hub id, a local folder or a built-in model (`builtin:tiny-sd3`,
    `builtin:tiny-sd35l`, `builtin:random-sd35m`); freeze everything."""
    from diffusers import StableDiffusion3Pipeline
    from diffusers.utils import logging as diffusers_logging

    from fdfo.models import tiny_sd3

    diffusers_logging.disable_progress_bar()
    if name == tiny_sd3.RANDOM_SD35M:  # the real shapes at random init, built on the device (benchmarks, GPU checks)
        pipe = tiny_sd3.random_sd35m_pipeline(device).to(dtype=dtype)
    else:
        pipe = from_pretrained(StableDiffusion3Pipeline, name, tiny_sd3.resolve_builtin(name), dtype, "SD3")
    return freeze_pipeline(pipe).to(device)


def add_lora(transformer: torch.nn.Module, rank: int, alpha: float):
    """Wrap the transformer with a PEFT LoRA on the joint-attention projections; trainable params in fp32."""
    return add_lora_to(transformer, LORA_TARGETS, rank, alpha)


class SD3Policy(PipelinePolicy):
    """The SD3 pipeline as a velocity field `v(x, sigma, cond)` plus prompt encoding and decoding.

    cond is a dict of per-sample tensors: `embeds [B, 77 + 128, D]` and `pooled [B, D_pooled]`.
    """

    FAMILY, PIPELINE = "sd3", "StableDiffusion3Pipeline"
    DEFAULT_GUIDANCE = 1.0  # no CFG (the paper's runs without CFG)
    AUTO_PRECISION = "fp16"  # --train.precision auto on CUDA: the authors' fp16 autocast with a grad scaler
    TEXT_ENCODERS = TEXT_ENCODERS
    load_pipeline = staticmethod(load_pipeline)
    LORA_TARGETS = LORA_TARGETS

    def __init__(self, pretrained: str, device: torch.device, lora_rank: int | None, lora_alpha: float = 0.0,
                 guidance_scale: float | None = None, amp_dtype: torch.dtype | None = None,
                 dtype: torch.dtype | None = None, levers: SpeedLevers | None = None):
        """lora_rank None: no trainable adapter, `transformer` is the plain pipeline transformer (generation, where a
        published adapter is merged into it, see fdfo.generation). guidance_scale: the CFG scale (None: 1, no CFG).
        dtype: of the frozen base; default bf16 on CUDA, float32 elsewhere (tests and the kernel census pass bf16 to
        follow the GPU's path on a CPU). levers: the bit-identical speed levers (fdfo/models/sd3_speed.py; default all
        on)."""
        self._load(pretrained, device, lora_rank, lora_alpha, guidance_scale, amp_dtype, dtype)
        self.levers = LeverRuntime(self.transformer, amp_dtype, levers or SpeedLevers())
        self.latent_channels = self.pipe.transformer.config.in_channels
        self._encode_fn = None

    @classmethod
    def from_components(cls, transformer: torch.nn.Module, vae: torch.nn.Module, scheduler, device: torch.device,
                        lora_rank: int | None, lora_alpha: float = 0.0, guidance_scale: float | None = None,
                        amp_dtype: torch.dtype | None = None, encode_fn=None,
                        dtype: torch.dtype | None = None, levers: SpeedLevers | None = None) -> SD3Policy:
        """A policy from in-memory modules, no pipeline folder (benchmarks: random-init models of the real shapes).

        encode_fn(prompts) -> {"embeds": [B, S, D], "pooled": [B, D_pooled]} stands in for the text encoders.
        The modules are frozen and moved to `device` in the policy dtype (`dtype`; default bf16 on GPU, fp32 on CPU).
        """
        import types

        self = cls.__new__(cls)
        self._settings(device, guidance_scale, amp_dtype, dtype)
        for module in (transformer, vae):
            module.requires_grad_(False).eval().to(device=device, dtype=self.dtype)
        self._adapt(types.SimpleNamespace(transformer=transformer, vae=vae, scheduler=scheduler,
                                          vae_scale_factor=2 ** (len(vae.config.block_out_channels) - 1)),
                    lora_rank, lora_alpha)
        self.levers = LeverRuntime(self.transformer, amp_dtype, levers or SpeedLevers())
        self.latent_channels = transformer.config.in_channels
        self._encode_fn = encode_fn
        return self

    @staticmethod
    def uses_cfg(guidance_scale: float) -> bool:
        """SD3's guidance is classifier-free: any scale but 1 is two forward passes."""
        return guidance_scale != 1.0

    def blocks(self) -> list[torch.nn.Module]:
        return list(self.pipe.transformer.transformer_blocks)

    # -- prompts, latents and the schedule -----------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        if self._encode_fn is not None:
            return self._encode_fn(prompts)
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=False, max_sequence_length=T5_MAX_LENGTH)
        return {"embeds": embeds, "pooled": pooled}

    @staticmethod
    def resolution_multiple(pipe) -> int:
        """Image sides are a whole number of latent patches: the VAE's factor times the patch size (16 px)."""
        return pipe.vae_scale_factor * pipe.transformer.config.patch_size

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        factor = self.resolution_multiple(self.pipe)
        if resolution % factor:
            raise ValueError(f"--sample.resolution {resolution} must be a multiple of {factor}")
        side = resolution // self.pipe.vae_scale_factor
        return (self.latent_channels, side, side)

    def sigmas(self, num_steps: int, resolution: int | None = None) -> torch.Tensor:
        """The scheduler's `[T+1]` noise levels from 1 to 0 (with the model's fixed shift; the resolution, which
        FLUX's shift depends on, does not enter)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.pipe.scheduler.config)
        scheduler.set_timesteps(num_steps, device="cpu")
        return scheduler.sigmas.float().to(self.device)

    # -- the velocity field --------------------------------------------------------------------------------------------

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
        if self.cfg:
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
            if self.cfg:
                v_uncond, v_cond = v.chunk(2)
                if detach_uncond:
                    v_uncond = v_uncond.detach()
                v = v_uncond + self.guidance_scale * (v_cond - v_uncond)
        return v.float()

    # -- memory --------------------------------------------------------------------------------------------------------

    def activation_bytes(self, batch: int, resolution: int, lora_rank: int, checkpointing: bool) -> int:
        """fdfo/memory.py's estimate for one training micro-batch of this policy (its transformer config, dtypes,
        levers and CFG)."""
        return activation_bytes(dict(self.pipe.transformer.config), batch=batch,
                                latent_side=self.latent_shape(resolution)[-1], text_tokens=TEXT_TOKENS,
                                model_dtype=self.dtype, amp_dtype=self.amp_dtype, lora_rank=lora_rank,
                                guidance=self.cfg, checkpointing=checkpointing, levers=self.levers.levers)


def meta_lora_model(config: dict, lora_rank: int, model_dtype: torch.dtype, amp_dtype: torch.dtype | None = None,
                    levers: SpeedLevers | None = None) -> tuple[torch.nn.Module, list[torch.nn.Module]]:
    """(the SD3 transformer of `config` on the meta device with the policy's LoRA, alpha 2 r, and speed levers; its
    blocks): what the activation estimate and the bench's FLOP model run (no weights, no memory)."""
    from diffusers import SD3Transformer2DModel

    from fdfo.memory import meta_model

    base = meta_model(SD3Transformer2DModel, config, model_dtype)
    with torch.device("meta"):
        model = add_lora(base, lora_rank, 2.0 * lora_rank)
        LeverRuntime(model, amp_dtype, levers or SpeedLevers())
    return model, list(base.transformer_blocks)


def meta_inputs(config: dict, rows: int, latent_side: int, dtype: torch.dtype, text_tokens: int = TEXT_TOKENS) -> dict:
    """A training forward's inputs on the meta device: latents `[rows, C, side, side]`, timesteps, `text_tokens` text
    states and the pooled prompt."""
    with torch.device("meta"):
        return dict(hidden_states=torch.empty(rows, config["in_channels"], latent_side, latent_side, dtype=dtype),
                    timestep=torch.empty(rows),
                    encoder_hidden_states=torch.empty(rows, text_tokens, config["joint_attention_dim"], dtype=dtype),
                    pooled_projections=torch.empty(rows, config["pooled_projection_dim"], dtype=dtype))


def activation_bytes(config: dict, *, batch: int, latent_side: int, text_tokens: int, model_dtype: torch.dtype,
                     amp_dtype: torch.dtype | None, lora_rank: int, guidance: bool = False,
                     checkpointing: bool = False, float32_ops: frozenset[str] | None = None,
                     levers: SpeedLevers | None = None) -> int:
    """Estimated bytes autograd keeps for one training forward of `batch` items through the SD3 transformer of
    `config` (diffusers `SD3Transformer2DModel` kwargs) with the LoRA of `add_lora` and the policy's speed levers
    (fdfo/models/sd3_speed.py; default all on: base weights stored in the autocast dtype keep no cast copies, a shared
    cast keeps one copy for its consumers): latents `[batch, C, latent_side, latent_side]`, `text_tokens` text tokens,
    twice the batch with CFG. float32_ops: the ops autocast runs in float32 (default CUDA's; tests pass CPU
    autocast's). Counted on the meta device (fdfo/memory.py)."""
    from fdfo.memory import saved_bytes

    model, blocks = meta_lora_model(config, lora_rank, model_dtype, amp_dtype, levers)
    inputs = meta_inputs(config, batch * (2 if guidance else 1), latent_side, model_dtype, text_tokens)
    return saved_bytes(model, blocks, inputs, amp_dtype, checkpointing, float32_ops)

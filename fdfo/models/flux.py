"""FLUX.1-dev behind the model-agnostic velocity interface, with a PEFT LoRA on the transformer.

The sampler, the churn and the finite-difference targets see the UNPACKED VAE latent `[B, 16, H/8, W/8]`, the shape
`FluxPipeline` draws its noise in before packing, so FDFO acts on it exactly as on SD3's latent. Only `velocity` packs:
2 x 2 patches become tokens with their image position ids, the network sees CLIP's pooled prompt and T5's 512 token
states (text position ids all zero), the timestep as FluxPipeline passes it (sigma, not 1000 sigma: FLUX's transformer
multiplies by 1000 itself) and the distilled guidance value (3.5 by default: an input of the network, not
classifier-free guidance, which FLUX.1-dev does not use), and its output is unpacked again. The sigma schedule is
FluxPipeline's: T linspace sigmas from 1 to 1/T, shifted by mu, which grows linearly with the number of image tokens
(docs/models.md).
"""

from __future__ import annotations

import numpy as np
import torch

from fdfo.models.base import PipelinePolicy, add_lora, freeze_pipeline, from_pretrained

FLUX_DEV = "black-forest-labs/FLUX.1-dev"
DEFAULT_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale
T5_MAX_LENGTH = 512  # FluxPipeline's default max_sequence_length (and its maximum)

# LoRA targets: every Linear of the attention and feed-forward paths of both block kinds, named per block. Left out:
# the AdaLN modulations (norm1.linear, norm1_context.linear in double-stream blocks, norm.linear in single-stream ones),
# the embedders and the final norm_out / proj_out. A double-stream block has separate image (to_q/k/v, to_out.0, ff.*)
# and text (add_*_proj, to_add_out, ff_context.*) weights; a single-stream block runs one sequence through
# attention (to_q/k/v, no output projection of its own) and an MLP (proj_mlp) in parallel, and proj_out maps their
# concatenation back. Matched by a regex over whole module names, because the suffix "proj_out" would also catch the
# transformer's final proj_out.
DOUBLE_STREAM_TARGETS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
)
SINGLE_STREAM_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out")


def _alternatives(names: tuple[str, ...]) -> str:
    return "|".join(name.replace(".", r"\.") for name in names)


LORA_TARGETS = (rf"(transformer_blocks\.\d+\.({_alternatives(DOUBLE_STREAM_TARGETS)})"
                rf"|single_transformer_blocks\.\d+\.({_alternatives(SINGLE_STREAM_TARGETS)}))")


# FLUX's token layout: 2 x 2 patches of the latent, one token per patch in row-major patch order, its 4 C features
# channel-major (feature 4 c + 2 dy + dx), as FluxPipeline packs its noise.
def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """`[B, C, h, w]` -> `[B, h/2 * w/2, 4 C]`."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """`[B, h/2 * w/2, 4 C]` -> `[B, C, h, w]`, the inverse of `pack_latents`."""
    b, _, features = tokens.shape
    x = tokens.reshape(b, h // 2, w // 2, features // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, features // 4, h, w)


def image_ids(h: int, w: int, device: torch.device) -> torch.Tensor:
    """Position ids of the packed tokens of an `h x w` latent, `[h/2 * w/2, 3]` float32: (0, patch row, patch col)."""
    rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float().to(device)


# FluxPipeline's resolution-dependent shift: mu is linear in the number of image tokens, base_shift at base_seq_len
# tokens and max_shift at max_seq_len; the scheduler then maps each sigma to e^mu / (e^mu + 1/sigma - 1).
def schedule_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                   max_shift: float = 1.15) -> float:
    """mu for `image_seq_len` packed tokens (FLUX.1-dev's scheduler values as defaults), in FluxPipeline's order of
    operations: slope m, intercept b = base_shift - m base_seq_len, mu = image_seq_len m + b."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + (base_shift - slope * base_seq_len)


def flux_blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """A FLUX transformer's blocks in order: the double-stream ones, then the single-stream ones."""
    return [*transformer.transformer_blocks, *transformer.single_transformer_blocks]


def pipeline_timestep(sigma: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The `timestep` FluxPipeline gives its transformer at noise level sigma `[B]`: its scheduler timestep 1000 sigma
    (float32) cast to the latents' dtype (the model's), then divided by 1000 in that dtype."""
    return (sigma.float() * 1000).to(dtype) / 1000


def load_pipeline(name: str, device: torch.device, dtype: torch.dtype):
    """Load a FluxPipeline from a hub id, a local folder or `builtin:tiny-flux`; freeze everything."""
    from diffusers import FluxPipeline

    from fdfo.models.tiny_flux import TINY_FLUX, tiny_flux_path

    source = str(tiny_flux_path()) if name == TINY_FLUX else name
    return freeze_pipeline(from_pretrained(FluxPipeline, name, source, dtype, "FLUX")).to(device)


class FluxPolicy(PipelinePolicy):
    """The FLUX pipeline as a velocity field `v(x, sigma, cond)` on unpacked latents, plus prompt encoding and decoding.

    cond is a dict of per-sample tensors: `embeds [B, 512, D_t5]` (T5) and `pooled [B, D_clip]` (CLIP's pooled output).
    guidance_scale is the distilled guidance embedded into the network (FluxPipeline's `guidance_scale`), not a CFG
    scale: one forward pass per velocity whatever its value, so `cfg` is False.
    """

    FAMILY, PIPELINE = "flux", "FluxPipeline"
    DEFAULT_GUIDANCE = DEFAULT_GUIDANCE
    AUTO_PRECISION = "bf16"  # --train.precision auto on CUDA: FLUX.1-dev is a bf16 model (fp16 overflows it)
    TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
    load_pipeline = staticmethod(load_pipeline)
    LORA_TARGETS = LORA_TARGETS
    # `cfg` stays False: the velocity is one network output, never a combination of two (what a CFG scale != 1 means
    # for SD3)

    def __init__(self, pretrained: str, device: torch.device, lora_rank: int | None, lora_alpha: float = 0.0,
                 guidance_scale: float | None = None, amp_dtype: torch.dtype | None = None,
                 dtype: torch.dtype | None = None):
        """lora_rank None: no trainable adapter, `transformer` is the plain pipeline transformer. guidance_scale: the
        distilled guidance (None: 3.5, FluxPipeline's default). dtype: of the frozen base; default bf16 on CUDA,
        float32 elsewhere."""
        self._load(pretrained, device, lora_rank, lora_alpha, guidance_scale, amp_dtype, dtype)
        self.latent_channels = self.pipe.transformer.config.in_channels // 4

    def blocks(self) -> list[torch.nn.Module]:
        return flux_blocks(self.pipe.transformer)

    # -- prompts, latents and the schedule -----------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, pooled, _ = self.pipe.encode_prompt(prompt=prompts, prompt_2=None, device=self.device,
                                                    num_images_per_prompt=1, max_sequence_length=T5_MAX_LENGTH)
        return {"embeds": embeds, "pooled": pooled}

    @staticmethod
    def resolution_multiple(pipe) -> int:
        """Image sides are a whole number of 2 x 2 patches of the latent (16 px)."""
        return pipe.vae_scale_factor * 2

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """The unpacked latent `(16, H/8, W/8)` of a square image; the side must be a whole number of 2 x 2 patches."""
        factor = self.resolution_multiple(self.pipe)
        if resolution < factor or resolution % factor:
            raise ValueError(f"--sample.resolution {resolution} must be a positive multiple of {factor}")
        side = resolution // self.pipe.vae_scale_factor
        return (self.latent_channels, side, side)

    def sigmas(self, num_steps: int, resolution: int) -> torch.Tensor:
        """FluxPipeline's `[T+1]` noise levels from 1 to 0 for images of `resolution` px: T linspace sigmas from 1 to
        1/T, through the scheduler with mu = schedule_shift(number of packed tokens) (docs/models.md)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        _, h, w = self.latent_shape(resolution)
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.pipe.scheduler.config)
        config = scheduler.config
        mu = schedule_shift((h // 2) * (w // 2), config.get("base_image_seq_len", 256),
                            config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                            config.get("max_shift", 1.15))
        if config.get("use_flow_sigmas", False):  # FluxPipeline leaves such schedules to the scheduler
            scheduler.set_timesteps(num_steps, device="cpu", mu=mu)
        else:
            scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), device="cpu", mu=mu)
        return scheduler.sigmas.float().to(self.device)

    # -- the velocity field --------------------------------------------------------------------------------------------

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict[str, torch.Tensor],
                 module: torch.nn.Module | None = None, detach_uncond: bool = False) -> torch.Tensor:
        """v(x, sigma, cond) `[B, 16, h, w]` in float32 for unpacked latents x `[B, 16, h, w]` and sigma `[B]`.

        The state enters as `x.to(self.input_dtype)`, packed. The timestep and the guidance go in as FluxPipeline
        passes them (`pipeline_timestep`; guidance in float32), so the network sees the pipeline's values bit for bit;
        the transformer itself rounds both to its hidden-state dtype before multiplying by 1000, so no float32
        timestep reaches it on a GPU (docs/models.md: in bf16 the timestep moves by up to ~2, guidance 3.5 becomes
        3504 / 1000).

        module: the network to call (e.g. the DDP wrapper while training); default the LoRA transformer.
        detach_uncond: accepted for the interface; FLUX has no unconditional branch to detach.
        """
        module = module or self.transformer
        batch, _, h, w = x.shape
        guidance = None
        if self.pipe.transformer.config.guidance_embeds:
            guidance = torch.full((batch,), float(self.guidance_scale), dtype=torch.float32, device=x.device)
        embeds = cond["embeds"]
        with self.autocast():
            out = module(hidden_states=pack_latents(x.to(self.input_dtype)),
                         timestep=pipeline_timestep(sigma, self.dtype), guidance=guidance,
                         pooled_projections=cond["pooled"], encoder_hidden_states=embeds,
                         txt_ids=torch.zeros(embeds.shape[1], 3, device=x.device), img_ids=image_ids(h, w, x.device),
                         return_dict=False)[0]
        return unpack_latents(out.float(), h, w)

    # -- memory --------------------------------------------------------------------------------------------------------

    def activation_bytes(self, batch: int, resolution: int, lora_rank: int, checkpointing: bool) -> int:
        """fdfo/memory.py's estimate for one training micro-batch of this policy (its transformer config, dtypes)."""
        return activation_bytes(dict(self.pipe.transformer.config), batch=batch,
                                latent_side=self.latent_shape(resolution)[-1], model_dtype=self.dtype,
                                amp_dtype=self.amp_dtype, lora_rank=lora_rank, checkpointing=checkpointing)


def meta_lora_model(config: dict, lora_rank: int, model_dtype: torch.dtype, amp_dtype: torch.dtype | None = None,
                    levers=None) -> tuple[torch.nn.Module, list[torch.nn.Module]]:
    """(the FLUX transformer of `config` on the meta device with the policy's LoRA, alpha 2 r; its double- and
    single-stream blocks): what the activation estimate and the bench's FLOP model run. FLUX has no speed levers
    (`amp_dtype`, `levers` are accepted for the interface)."""
    from diffusers import FluxTransformer2DModel

    from fdfo.memory import meta_model

    base = meta_model(FluxTransformer2DModel, config, model_dtype)
    with torch.device("meta"):
        model = add_lora(base, LORA_TARGETS, lora_rank, 2.0 * lora_rank)
    return model, flux_blocks(base)


def meta_inputs(config: dict, rows: int, latent_side: int, dtype: torch.dtype,
                text_tokens: int = T5_MAX_LENGTH) -> dict:
    """A training forward's inputs on the meta device: the unpacked `[rows, 16, side, side]` latent's packed tokens, the
    timestep and guidance, the pooled CLIP prompt and `text_tokens` T5 states, and the position ids."""
    meta = torch.device("meta")
    with meta:
        return dict(hidden_states=torch.empty(rows, (latent_side // 2) ** 2, config["in_channels"], dtype=dtype),
                    timestep=torch.empty(rows, dtype=dtype),
                    guidance=torch.empty(rows) if config.get("guidance_embeds") else None,
                    pooled_projections=torch.empty(rows, config["pooled_projection_dim"], dtype=dtype),
                    encoder_hidden_states=torch.empty(rows, text_tokens, config["joint_attention_dim"], dtype=dtype),
                    txt_ids=torch.zeros(text_tokens, 3), img_ids=image_ids(latent_side, latent_side, meta))


def activation_bytes(config: dict, *, batch: int, latent_side: int, model_dtype: torch.dtype,
                     amp_dtype: torch.dtype | None, lora_rank: int, checkpointing: bool = False,
                     text_tokens: int = T5_MAX_LENGTH, float32_ops: frozenset[str] | None = None) -> int:
    """Estimated bytes autograd keeps for one training forward of `batch` items through the FLUX transformer of
    `config` (diffusers `FluxTransformer2DModel` kwargs) with the LoRA of LORA_TARGETS (no speed levers): unpacked
    latents `[batch, 16, latent_side, latent_side]` packed into tokens, `text_tokens` T5 tokens, one forward per item
    (no CFG). Counted on the meta device (fdfo/memory.py); with checkpointing, both block kinds are recomputed."""
    from fdfo.memory import saved_bytes

    model, blocks = meta_lora_model(config, lora_rank, model_dtype)
    inputs = meta_inputs(config, batch, latent_side, model_dtype, text_tokens)
    return saved_bytes(model, blocks, inputs, amp_dtype, checkpointing, float32_ops)

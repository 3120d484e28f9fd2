"""The published shapes of the real models: the transformer and VAE configs (diffusers kwargs, as in each hub
repository's transformer/config.json and vae/config.json) and the text encoders' output widths. Nothing here loads a
weight: the bench's FLOP model and kernel census, the activation estimate and `builtin:random-sd35m` build these
shapes on the meta device or at random init. `MODELS` names them as `python -m fdfo.bench --model` does.
"""

from __future__ import annotations

# stabilityai/stable-diffusion-3.5-medium: MMDiT-X, 24 blocks, dual attention in the first 13
SD35M_TRANSFORMER_CONFIG = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)
# stabilityai/stable-diffusion-3.5-large: the same class, 38 blocks of 38 heads, no dual attention
SD35L_TRANSFORMER_CONFIG = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38, attention_head_dim=64,
    num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048,
    pos_embed_max_size=192, dual_attention_layers=(), qk_norm="rms_norm",
)
SD35_VAE_CONFIG = dict(  # the same VAE for both SD3.5 models
    in_channels=3, out_channels=3, latent_channels=16, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    norm_num_groups=32, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
    use_post_quant_conv=False,
)
SD35_CLIP_PROJECTIONS = (768, 1280)  # pooled width 2048, as CLIP-L/14 + CLIP-bigG/14

# black-forest-labs/FLUX.1-dev: 19 double-stream and 38 single-stream blocks of 24 x 128-dim heads, guidance-distilled
FLUX_DEV_TRANSFORMER_CONFIG = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)
FLUX_DEV_VAE_CONFIG = dict(SD35_VAE_CONFIG, scaling_factor=0.3611, shift_factor=0.1159)

# --model of python -m fdfo.bench: (family, label, transformer config, VAE config)
MODELS = {
    "sd35m": ("sd3", "SD3.5-Medium", SD35M_TRANSFORMER_CONFIG, SD35_VAE_CONFIG),
    "sd35l": ("sd3", "SD3.5-Large", SD35L_TRANSFORMER_CONFIG, SD35_VAE_CONFIG),
    "flux-dev": ("flux", "FLUX.1-dev", FLUX_DEV_TRANSFORMER_CONFIG, FLUX_DEV_VAE_CONFIG),
}

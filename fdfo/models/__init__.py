"""The base models behind one interface: what the sampler, the phases, the three algorithms, the evaluation, generation
and the export need of a model, and nothing else. docs/models.md says what each model supports and how it was checked.

One module per family, each a `PipelinePolicy` (fdfo/models/base.py, which holds what they share):
- `sd3.SD3Policy`: SD3.5-Medium (the default), SD3.5-Large, any StableDiffusion3Pipeline; its bit-identical speed
  levers in `sd3_speed`.
- `flux.FluxPolicy`: FLUX.1-dev (FluxPipeline).
`registry` turns a model name into its family, policy or pipeline (the only place that knows which exist); the
built-in offline models are `tiny_sd3` (with `tiny_text`, the tokenizers and text encoders it shares with) `tiny_flux`,
built through `builtin`; `shapes` holds the real models' published configs.

The interface (a policy object):
- `encode(prompts)` -> cond, a dict of per-prompt tensors; `negative()` the empty prompt's;
- `velocity(x, sigma, cond, module=None, detach_uncond=False)` -> v `[B, C, h, w]` float32 on the unpacked latent
  (the guidance applied as the model does it); `base_velocity` with the adapter off;
- `cfg`: whether a velocity is two forward passes (classifier-free guidance), `guidance_scale` its value;
- `latent_shape(resolution)`, `sigmas(num_steps, resolution)` (`[T+1]`, the model's shift), `decode(latents)`;
- `transformer` (the LoRA network), `trainable_parameters`, `adapter_state`, `save_adapter`, `load_adapter`;
- `device`, `dtype`, `amp_dtype`, `input_dtype`, `autocast()`, `offload_text_encoders`, `speed_options`, `blocks()`;
- `pipe`: the diffusers pipeline itself (generation and evaluation call it), `activation_bytes` (fdfo/memory.py);
- on the class: FAMILY (what a checkpoint records), PIPELINE, DEFAULT_GUIDANCE, AUTO_PRECISION, `load_pipeline`,
  `resolution_multiple(pipe)`.
"""

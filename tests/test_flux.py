"""FLUX.1-dev behind the velocity interface (fdfo/models/flux.py), on the tiny offline FLUX: the project's sampler
against FluxPipeline itself, the packing, the shifted schedule, the guidance input, the LoRA targets, the paired
sampler, an SPO step and the adapter files."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from fdfo.models import base as models_base
from fdfo.models import flux
from fdfo.models.flux import FluxPolicy, pack_latents, schedule_shift, unpack_latents
from fdfo.models.tiny_flux import TINY_FLUX, build_tiny_flux, tiny_flux_path
from fdfo.objective import pair_targets, spo_loss
from fdfo.rng import randn_per_sample
from fdfo.sampling import CHURN_DRAWS, RawChurn, prior_churn, sample_euler, sample_pairs
from tests.lora_by_hand import merge_by_hand

CPU = torch.device("cpu")
RANK, ALPHA = 4, 8.0  # alpha != rank, so a wrong LoRA scale shows
PROMPTS = ["a red apple on a table", "a blue boat at sunset"]


def _policy(**kwargs) -> FluxPolicy:
    torch.manual_seed(0)
    return FluxPolicy(TINY_FLUX, CPU, lora_rank=RANK, lora_alpha=ALPHA, **kwargs)


def _pipeline(dtype=torch.float32):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_flux_path(), dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _lora(policy, which: str) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in policy.transformer.named_parameters() if f"lora_{which}" in n}


def _randomise_b(policy, seed: int = 0) -> None:
    """Non-zero B everywhere, so the adapter changes the velocity and the A's get gradients."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in _lora(policy, "B").values():
            b.copy_(torch.randn(b.shape, generator=gen) * 0.3)


# -- the layout: packing, positions, schedule ------------------------------------------------------------------------


def test_packing_is_the_pipelines_and_the_hand_layout():
    from diffusers import FluxPipeline

    x = torch.randn(2, 16, 6, 8, generator=torch.Generator().manual_seed(0))
    tokens = pack_latents(x)
    assert torch.equal(tokens, FluxPipeline._pack_latents(x, 2, 16, 6, 8))
    assert torch.equal(unpack_latents(tokens, 6, 8), x)
    assert torch.equal(FluxPipeline._unpack_latents(tokens, 48, 64, 8), x)
    # by hand: token (patch row 1, patch col 2) = 4 * 1 + 2 of the 3 x 4 patches, row-major; feature 4 c + 2 dy + dx
    token = tokens[1, 4 * 1 + 2]
    for c, dy, dx in ((0, 0, 0), (0, 0, 1), (0, 1, 0), (5, 1, 1), (15, 0, 1)):
        assert token[4 * c + 2 * dy + dx] == x[1, c, 2 * 1 + dy, 2 * 2 + dx]
    ids = flux.image_ids(6, 8, CPU)
    assert torch.equal(ids, FluxPipeline._prepare_latent_image_ids(2, 3, 4, CPU, torch.float32))
    assert ids[4 * 1 + 2].tolist() == [0, 1, 2]


def test_the_schedule_is_flux_shift_of_the_image_token_count():
    policy = FluxPolicy(TINY_FLUX, CPU, lora_rank=None)
    assert schedule_shift(256) == pytest.approx(0.5) and schedule_shift(4096) == pytest.approx(1.15)
    for resolution, steps in ((64, 4), (128, 3), (512, 28), (1024, 28)):
        tokens = (resolution // 16) ** 2  # packed 2 x 2 patches of the 1/8 latent
        mu = 0.5 + (tokens - 256) * (1.15 - 0.5) / (4096 - 256)
        s = torch.linspace(1, 1 / steps, steps, dtype=torch.float64)
        shifted = torch.exp(torch.tensor(mu)) / (torch.exp(torch.tensor(mu)) + 1 / s - 1)
        expected = torch.cat([shifted, torch.zeros(1, dtype=torch.float64)]).float()
        sigmas = policy.sigmas(steps, resolution)
        assert sigmas.dtype == torch.float32 and len(sigmas) == steps + 1
        torch.testing.assert_close(sigmas, expected, atol=1e-6, rtol=0)
    assert policy.sigmas(4, 64)[1].item() == pytest.approx(0.8260644, abs=1e-7)  # 64 px: mu = 0.459375, 16 tokens


def test_latent_shape_is_the_unpacked_vae_latent():
    policy = FluxPolicy(TINY_FLUX, CPU, lora_rank=None)
    assert policy.latent_shape(64) == (16, 8, 8) and policy.latent_shape(1024) == (16, 128, 128)
    for bad in (72, 8, 0):
        with pytest.raises(ValueError, match=rf"^--sample.resolution {bad} must be a positive multiple of 16$"):
            policy.latent_shape(bad)


# -- the LoRA --------------------------------------------------------------------------------------------------------


def test_lora_targets_are_every_block_projection_but_the_modulations():
    from peft.tuners.tuners_utils import BaseTunerLayer

    policy = _policy()
    wrapped = {n.removeprefix("base_model.model.") for n, m in policy.transformer.named_modules()
               if isinstance(m, BaseTunerLayer)}
    plain = _pipeline().transformer
    in_blocks = {n for n, m in plain.named_modules() if isinstance(m, torch.nn.Linear)
                 and n.startswith(("transformer_blocks.", "single_transformer_blocks."))}
    modulations = {n for n in in_blocks if n.endswith(("norm1.linear", "norm1_context.linear", "norm.linear"))}
    assert wrapped == in_blocks - modulations
    assert {n.removeprefix("transformer_blocks.1.") for n in wrapped if n.startswith("transformer_blocks.1.")} == {
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
        "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"}
    assert {n.removeprefix("single_transformer_blocks.0.") for n in wrapped
            if n.startswith("single_transformer_blocks.0.")} == {"attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp",
                                                                 "proj_out"}
    assert len(wrapped) == 2 * 12 + 2 * 5 and "proj_out" not in wrapped  # not the final projection


def test_lora_init_is_gaussian_and_the_policy_starts_as_the_pipelines_transformer():
    from diffusers import FluxPipeline

    policy = _policy()
    a = torch.cat([p.detach().flatten() for p in _lora(policy, "A").values()])
    assert a.std().item() == pytest.approx(1 / RANK, rel=0.05)  # PEFT "gaussian": A ~ N(0, (1/r)^2)
    assert all(torch.equal(b, torch.zeros_like(b)) for b in _lora(policy, "B").values())
    assert all(p.dtype == torch.float32 for p in policy.trainable_parameters())
    assert len(policy.trainable_parameters()) == 2 * 34

    # the plain transformer called as FluxPipeline.__call__ calls it (fp32: timestep = (1000 sigma) / 1000)
    base = _pipeline().transformer
    cond = policy.encode(PROMPTS)
    assert cond["embeds"].shape == (2, 512, 96) and cond["pooled"].shape == (2, 32)
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.9871234, 0.3333333])
    out = base(hidden_states=FluxPipeline._pack_latents(x, 2, 16, 8, 8), timestep=sigma * 1000 / 1000,
               guidance=torch.full([2], 3.5), pooled_projections=cond["pooled"], encoder_hidden_states=cond["embeds"],
               txt_ids=torch.zeros(512, 3), img_ids=FluxPipeline._prepare_latent_image_ids(2, 4, 4, CPU, torch.float32),
               return_dict=False)[0]
    assert torch.equal(policy.velocity(x, sigma, cond), FluxPipeline._unpack_latents(out, 64, 64, 8))


# -- the sampler against FluxPipeline ----------------------------------------------------------------------------------


@pytest.mark.parametrize("resolution, steps, guidance", [(64, 4, None), (128, 3, 1.5)])
def test_euler_sampler_gives_the_pipelines_images(resolution, steps, guidance):
    """Same initial noise, same LoRA (non-zero B; merged by hand into the pipeline's plain transformer), churn off:
    fdfo.sampling.sample_euler over FluxPolicy.velocity, then FluxPolicy.decode, gives FluxPipeline's images.
    guidance None: both at their defaults (3.5), the noise drawn from the same seeds as the pipeline draws it."""
    policy = _policy() if guidance is None else _policy(guidance_scale=guidance)
    _randomise_b(policy)
    pipe = _pipeline()
    merge_by_hand(pipe.transformer, policy.adapter_state(), ALPHA / RANK)
    shape = policy.latent_shape(resolution)
    call = dict(prompt=PROMPTS, height=resolution, width=resolution, num_inference_steps=steps, output_type="pt")
    if guidance is None:
        seeds = (3, 4)
        x1 = randn_per_sample([torch.Generator().manual_seed(s) for s in seeds], shape, CPU)
        call["generator"] = [torch.Generator().manual_seed(s) for s in seeds]
    else:
        x1 = torch.randn(2, *shape, generator=torch.Generator().manual_seed(5))
        call.update(latents=pack_latents(x1), guidance_scale=guidance)
    expected = pipe(**call).images
    sigmas = policy.sigmas(steps, resolution)
    assert torch.equal(sigmas, pipe.scheduler.sigmas)
    images = policy.decode(sample_euler(policy.velocity, x1, policy.encode(PROMPTS), sigmas))
    assert images.shape == expected.shape == (2, 3, resolution, resolution)
    torch.testing.assert_close(images, expected, atol=1e-4, rtol=0)
    assert expected.std() > 0.1  # real images, not a constant a broken input would also match


def test_bf16_velocity_is_the_pipelines_prediction_bit_for_bit(monkeypatch):
    """The GPU layout (bf16 base) on CPU: the transformer gets FluxPipeline's bf16 timestep and float32 guidance, and
    the velocity is the pipeline's own first prediction exactly."""
    monkeypatch.setattr(models_base, "base_dtype", lambda device: torch.bfloat16)
    policy = _policy()  # B = 0: the pipeline (whose transformer carries the LoRA layers) computes the base model
    assert policy.pipe.transformer.dtype == torch.bfloat16 and policy.input_dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in policy.trainable_parameters())  # fp32 LoRA beside a bf16 base
    seen = []

    def hook(module, args, kwargs, output):
        seen.append((kwargs["timestep"], kwargs["guidance"], output[0]))

    handle = policy.pipe.transformer.register_forward_hook(hook, with_kwargs=True)
    x1 = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(6))
    policy.pipe(prompt=PROMPTS, latents=pack_latents(x1).to(torch.bfloat16), height=64, width=64,
                num_inference_steps=2, output_type="latent")
    sigma = policy.sigmas(2, 64)[0].expand(2)
    v = policy.velocity(x1, sigma, policy.encode(PROMPTS))
    handle.remove()
    (t_pipe, g_pipe, out_pipe), _, (t_ours, g_ours, _) = seen
    assert t_ours.dtype == t_pipe.dtype == torch.bfloat16 and torch.equal(t_ours, t_pipe)
    assert g_ours.dtype == g_pipe.dtype == torch.float32 and torch.equal(g_ours, g_pipe)
    assert torch.equal(g_ours, torch.full([2], 3.5))
    assert torch.equal(v, unpack_latents(out_pipe, 8, 8).float())


# -- FDFO on the unpacked latent ---------------------------------------------------------------------------------------


def test_paired_branches_differ_only_by_their_churn_noise():
    policy = _policy()
    _randomise_b(policy)
    sigmas = policy.sigmas(3, 64)
    shape = policy.latent_shape(64)
    x1 = torch.randn(1, *shape, generator=torch.Generator().manual_seed(7))
    cond = {k: v.repeat_interleave(2, 0) for k, v in policy.encode(PROMPTS[:1]).items()}
    churn, z = RawChurn(weight=0.1), torch.zeros(1, CHURN_DRAWS)

    def noise(shared: bool):
        gens = [torch.Generator().manual_seed(10 + (0 if shared else b)) for b in (0, 1)]
        return lambda k: randn_per_sample(gens, shape, CPU)

    same = sample_pairs(policy.velocity, x1, cond, sigmas, churn, noise(True), z)
    for field in ("states", "velocities", "final"):
        assert torch.equal(getattr(same, field)[0], getattr(same, field)[1]), field
    pairs = sample_pairs(policy.velocity, x1, cond, sigmas, churn, noise(False), z)
    first = noise(False)(-1)
    assert torch.equal(pairs.states[:, 0], prior_churn(x1.repeat_interleave(2, 0), 0.1, first))
    assert torch.equal(pairs.velocities[:, 1], policy.velocity(pairs.states[:, 1], sigmas[1].expand(2), cond))
    assert (pairs.final[0] - pairs.final[1]).abs().mean() > 1e-2
    no_churn = sample_pairs(policy.velocity, x1, cond, sigmas, RawChurn(weight=0.0), noise(False), z)
    assert torch.equal(no_churn.final, sample_euler(policy.velocity, x1.repeat_interleave(2, 0), cond, sigmas))


def test_spo_steps_change_every_lora_parameter_and_no_base_weight():
    policy = _policy()
    base = {n: p.clone() for n, p in policy.transformer.named_parameters() if not p.requires_grad}
    sigmas = policy.sigmas(2, 64)
    shape = policy.latent_shape(64)
    gens = [torch.Generator().manual_seed(20 + i) for i in range(4)]
    x1 = torch.randn(2, *shape, generator=torch.Generator().manual_seed(8))
    prompt_cond = policy.encode(PROMPTS)
    cond = {k: v.repeat_interleave(2, 0) for k, v in prompt_cond.items()}
    traj = sample_pairs(policy.velocity, x1, cond, sigmas, RawChurn(weight=0.1),
                        lambda k: randn_per_sample(gens, shape, CPU), torch.zeros(2, CHURN_DRAWS))
    rewards = policy.decode(traj.final).mean(dim=(1, 2, 3))  # brightness
    dR, dx = pair_targets(rewards, traj.final)
    assert (dR != 0).all()
    items = torch.arange(4).repeat_interleave(2)  # sample of each of the 4 x 2 items
    x, v_ref = traj.states.flatten(0, 1), traj.velocities.flatten(0, 1)
    sigma = traj.sigmas.repeat(4)
    item_cond = {k: v[items] for k, v in cond.items()}
    optimizer = torch.optim.Adam(policy.trainable_parameters(), lr=1e-3)
    before = {n: p.detach().clone() for n, p in policy.transformer.named_parameters() if p.requires_grad}
    for step in (1, 2):
        loss, ratio = spo_loss(policy.velocity(x, sigma, item_cond), v_ref, dx[items], dR[items], 1e-4)
        if step == 1:  # the sampler's own velocities (up to the rounding of another batch size)
            torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-5, rtol=0)
        loss.mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        after = {n: p.detach() for n, p in policy.transformer.named_parameters() if p.requires_grad}
        moved = {n for n in after if not torch.equal(after[n], before[n])}
        if step == 1:  # B = 0 at init: only B has a gradient
            assert moved == {n for n in after if "lora_B" in n}
    assert moved == set(after) and len(after) == 2 * 34
    assert all(torch.equal(p, base[n]) for n, p in policy.transformer.named_parameters() if n in base)


# -- adapter files and speed options -----------------------------------------------------------------------------------


def test_adapter_save_load_round_trip(tmp_path):
    policy = _policy()
    _randomise_b(policy, seed=1)
    policy.save_adapter(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert len(saved) == 2 * 34
    torch.manual_seed(1)
    other = FluxPolicy(TINY_FLUX, CPU, lora_rank=RANK, lora_alpha=ALPHA)  # another A init, B = 0
    assert not torch.equal(other.adapter_state()[next(iter(saved))], saved[next(iter(saved))])
    other.load_adapter(tmp_path / "adapter")
    state = other.adapter_state()
    assert state.keys() == policy.adapter_state().keys()
    assert all(torch.equal(state[k], v) and state[k].dtype == torch.float32 for k, v in policy.adapter_state().items())
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(9))
    cond = policy.encode(PROMPTS[:1])
    assert torch.equal(other.velocity(x, torch.tensor([0.5]), cond), policy.velocity(x, torch.tensor([0.5]), cond))

    partial = {k: v for k, v in saved.items() if "single_transformer_blocks" not in k}
    save_file(partial, tmp_path / "adapter" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="does not fit this model: missing .*single_transformer_blocks"):
        other.load_adapter(tmp_path / "adapter")


def test_gradient_checkpointing_keeps_the_gradients():
    policy = _policy()
    _randomise_b(policy, seed=2)
    assert len(policy.blocks()) == 4
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(10))
    sigma, cond = torch.tensor([0.8, 0.4]), policy.encode(PROMPTS)

    def grads():
        policy.velocity(x, sigma, cond).square().mean().backward()
        out = {n: p.grad.clone() for n, p in policy.transformer.named_parameters() if p.requires_grad}
        policy.transformer.zero_grad(set_to_none=True)
        return out

    plain = grads()
    calls = []
    handle = policy.blocks()[-1].register_forward_pre_hook(lambda *args: calls.append(1))
    policy.speed_options(gradient_checkpointing=True)
    checkpointed = grads()
    handle.remove()
    assert len(calls) == 2  # the last single-stream block started again in the backward pass
    assert all(torch.equal(checkpointed[n], g) for n, g in plain.items())


# -- the tiny model --------------------------------------------------------------------------------------------------


def test_tiny_flux_builds_deterministically_and_loads_like_flux_dev(tmp_path, monkeypatch):
    from diffusers import FluxPipeline

    monkeypatch.setenv("FDFO_TINY_CACHE", str(tmp_path / "cache"))
    folder = tiny_flux_path()
    assert folder == tmp_path / "cache" / "tiny-flux-v1" and [p.name for p in folder.parent.iterdir()] == [folder.name]
    other = build_tiny_flux(tmp_path / "again")
    for file in sorted(folder.glob("*/*.safetensors")):
        mine, theirs = load_file(file), load_file(other / file.parent.name / file.name)
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    pipe = FluxPipeline.from_pretrained(folder)
    t, vae = pipe.transformer.config, pipe.vae.config
    assert [type(pipe.text_encoder).__name__, type(pipe.text_encoder_2).__name__] == ["CLIPTextModel",
                                                                                      "T5EncoderModel"]
    assert t.guidance_embeds and t.in_channels == 4 * vae.latent_channels == 64 and pipe.vae_scale_factor == 8
    assert sum(t.axes_dims_rope) == t.attention_head_dim
    assert t.joint_attention_dim == pipe.text_encoder_2.config.d_model
    assert t.pooled_projection_dim == pipe.text_encoder.config.hidden_size
    assert (vae.scaling_factor, vae.shift_factor) == (0.3611, 0.1159)
    s = pipe.scheduler.config
    assert (s.use_dynamic_shifting, s.base_shift, s.max_shift, s.base_image_seq_len, s.max_image_seq_len) == (
        True, 0.5, 1.15, 256, 4096)
    assert pipe.tokenizer_2.model_max_length == 512
    # the conditioning is amplified so that the guidance value moves the velocity as much as x, t or the prompt do
    tokens = torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(11))
    text = dict(pooled_projections=torch.randn(1, 32), encoder_hidden_states=torch.randn(1, 8, 96),
                txt_ids=torch.zeros(8, 3), img_ids=FluxPipeline._prepare_latent_image_ids(1, 4, 4, CPU, torch.float32))
    with torch.no_grad():
        v = [pipe.transformer(hidden_states=tokens, timestep=torch.tensor([0.5]), guidance=torch.tensor([g]),
                              **text, return_dict=False)[0] for g in (3.5, 1.0)]
    assert (v[0] - v[1]).square().mean().sqrt() > 0.3 * v[0].std()


def test_a_missing_model_is_one_line():
    with pytest.raises(FileNotFoundError, match="^could not load the FLUX pipeline '/nonexistent/flux'"):
        FluxPolicy("/nonexistent/flux", CPU, lora_rank=None)

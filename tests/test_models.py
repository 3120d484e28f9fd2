"""One model interface (fdfo/models/): every built-in model's policy against its own diffusers pipeline, the registry,
SD3.5-Large's block layout and its preset's memory count."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from fdfo.models import registry, shapes, tiny_sd3
from fdfo.rng import randn_per_sample
from fdfo.sampling import sample_euler
from tests.lora_by_hand import merge_by_hand

CPU = torch.device("cpu")
PROMPTS = ["a red apple on a table", "a blue boat at sunset"]
RANK, ALPHA = 4, 8.0  # alpha != rank, so a wrong LoRA scale shows


def _policy_with_lora(name: str, guidance: float | None):
    """The model's training policy with a non-zero B everywhere (so the adapter changes the velocity)."""
    torch.manual_seed(0)
    policy = registry.load_policy(name, CPU, RANK, ALPHA, guidance)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for key, p in policy.transformer.named_parameters():
            if "lora_B" in key:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return policy


@pytest.mark.parametrize("name, guidance", [("builtin:tiny-sd3", None), ("builtin:tiny-sd3", 2.0),
                                            ("builtin:tiny-sd35l", None), ("builtin:tiny-flux", None)])
def test_the_projects_sampler_gives_the_models_own_pipeline_images(name, guidance):
    """Churn off, same initial noise, same LoRA (merged by hand into a fresh pipeline's plain transformer): Euler over
    `policy.velocity`, then `policy.decode`, gives the images of the family's diffusers pipeline called with its
    defaults (SD3 at the training's 128 T5 tokens; with CFG 2 against the empty prompt; FLUX at its distilled 3.5)."""
    policy = _policy_with_lora(name, guidance)
    pipeline_class = registry.family(name).pipeline_class()
    assert pipeline_class.__name__ == {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}[
        registry.family_name(name)]
    pipe = pipeline_class.from_pretrained(_folder(name))
    pipe.set_progress_bar_config(disable=True)
    merge_by_hand(pipe.transformer, policy.adapter_state(), ALPHA / RANK)
    resolution, steps = 64, 4
    shape = policy.latent_shape(resolution)
    x1 = randn_per_sample([torch.Generator().manual_seed(s) for s in (3, 4)], shape, CPU)
    call = dict(prompt=PROMPTS, height=resolution, width=resolution, num_inference_steps=steps, output_type="pt",
                guidance_scale=policy.guidance_scale)
    if registry.family_name(name) == "flux":
        from fdfo.models.flux import pack_latents

        call.update(latents=pack_latents(x1))
    else:
        call.update(latents=x1, max_sequence_length=128)
    expected = pipe(**call).images
    images = policy.decode(sample_euler(policy.velocity, x1, policy.encode(PROMPTS), policy.sigmas(steps, resolution)))
    assert images.shape == expected.shape == (2, 3, resolution, resolution)
    torch.testing.assert_close(images, expected, atol=1e-4, rtol=0)
    assert expected.std() > 0.1  # real images, not a constant a broken input would also match
    unadapted = pipeline_class.from_pretrained(_folder(name))
    unadapted.set_progress_bar_config(disable=True)
    assert (unadapted(**call).images - expected).abs().max() > 1e-2  # the LoRA matters here


def _folder(name: str) -> str:
    if registry.family_name(name) == "flux":
        from fdfo.models.tiny_flux import tiny_flux_path

        return str(tiny_flux_path())
    return tiny_sd3.resolve_builtin(name)


def test_registry_names_each_models_family_without_loading_it(tmp_path):
    sd3, flux = "sd3", "flux"
    names = ("builtin:tiny-sd3", "builtin:tiny-sd35l", "builtin:random-sd35m", "builtin:tiny-flux",
             "stabilityai/stable-diffusion-3.5-medium", "stabilityai/stable-diffusion-3.5-large",
             "black-forest-labs/FLUX.1-dev")
    assert [registry.family_name(n) for n in names] == [sd3] * 3 + [flux] + [sd3] * 2 + [flux]
    folder = tmp_path / "renamed-flux-copy"  # a local folder says what it holds, whatever its name
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    assert registry.family_name(str(folder)) == flux
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(ValueError, match=r"^--pretrained-model .*renamed-flux-copy: its model_index.json names a "
                                         r"StableDiffusionXLPipeline; supported are StableDiffusion3Pipeline and "
                                         r"FluxPipeline \(docs/models.md\)$"):
        registry.family_name(str(folder))
    with pytest.raises(ValueError, match=r"^--pretrained-model builtin:tiny-sdxl: no such built-in model"):
        registry.family_name("builtin:tiny-sdxl")
    assert (registry.default_guidance("builtin:tiny-sd3"), registry.default_guidance("builtin:tiny-flux")) == (1.0, 3.5)
    assert registry.is_tiny("builtin:tiny-sd35l") and not registry.is_tiny("builtin:random-sd35m")


# -- SD3.5-Large -------------------------------------------------------------------------------------------------------


def test_tiny_sd35l_has_sd35_large_block_layout(tmp_path):
    """SD3.5-Large's transformer (shapes.SD35L_TRANSFORMER_CONFIG, on the meta device) and the tiny one in its layout:
    every block one joint attention (no second, image-only attention, unlike SD3.5-Medium's first 13 blocks and the
    tiny SD3's first block), QK RMS norms, the last block context-pre-only."""
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        large = SD3Transformer2DModel(**shapes.SD35L_TRANSFORMER_CONFIG)
        medium = SD3Transformer2DModel(**shapes.SD35M_TRANSFORMER_CONFIG)
    tiny_large = SD3Transformer2DModel.from_pretrained(tiny_sd3.build_tiny_sd35l(tmp_path / "large") / "transformer")
    tiny_medium = registry.load_pipeline("builtin:tiny-sd3", CPU, torch.float32).transformer
    cached = registry.load_pipeline("builtin:tiny-sd35l", CPU, torch.float32).transformer  # what train.py loads
    assert {k: v for k, v in cached.config.items() if not k.startswith("_")} == \
        {k: v for k, v in tiny_large.config.items() if not k.startswith("_")}

    def layout(model):
        return [(getattr(b, "attn2", None) is not None, b.context_pre_only, type(b.attn.norm_q).__name__)
                for b in model.transformer_blocks]

    assert len(large.transformer_blocks) == 38 and large.config.num_attention_heads == 38
    assert sum(p.numel() for p in large.parameters()) == 8_056_627_520
    assert layout(large) == [(False, False, "RMSNorm")] * 37 + [(False, True, "RMSNorm")]
    assert layout(tiny_large) == [(False, False, "RMSNorm"), (False, True, "RMSNorm")]
    assert [dual for dual, _, _ in layout(medium)] == [True] * 13 + [False] * 11
    assert [dual for dual, _, _ in layout(tiny_medium)] == [True, False]


def test_tiny_sd35l_trains_through_train_py(tmp_path):
    """train.py on builtin:tiny-sd35l (the smoke preset, shrunk): the policy is the large layout, every LoRA tensor of
    every block changes (but the last block's context query, whose output the context-pre-only block discards, as in
    tests/test_train.py), the checkpoint records the model and its family."""
    from fdfo import train_loop
    from fdfo.config import smoke_config

    captured = {}
    original = train_loop.build_policy

    def spy(cfg, device):
        captured["policy"] = policy = original(cfg, device)
        captured["lora"] = {k: v.clone() for k, v in policy.adapter_state().items()}
        return policy

    cfg = dataclasses.replace(smoke_config(), run_dir=str(tmp_path / "run"), pretrained_model="builtin:tiny-sd35l",
                              total_pairs_per_epoch=4, num_epochs=1, image_log_freq=0)
    cfg.sample.num_solver_steps = 3
    cfg.train.weight_decay = 0.0  # so that a change can only come from the gradient
    cfg.eval.every = 0
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_loop, "build_policy", spy)
        run_dir = train_loop.train(cfg)
    assert not any(hasattr(b, "attn2") and b.attn2 is not None
                   for b in captured["policy"].pipe.transformer.transformer_blocks)
    checkpoint = run_dir / "checkpoints" / "epoch-0000001"
    trained = load_file(str(checkpoint / "adapter_model.safetensors"))
    assert trained.keys() == captured["lora"].keys()
    blocks = {k.split(".")[3] for k in trained}
    assert blocks == {"0", "1"} and len(trained) == 2 * (8 + 7)  # no to_add_out in the context-pre-only last block
    unchanged = sorted(k for k, v in trained.items() if torch.equal(v, captured["lora"][k]))
    assert unchanged == sorted(k for k in trained if "transformer_blocks.1.attn.add_q_proj.lora_" in k)
    assert all(torch.isfinite(v).all() for v in trained.values())
    state = json.loads((checkpoint / "state.json").read_text())
    assert (state["pretrained_model"], state["model_family"]) == ("builtin:tiny-sd35l", "sd3")


def test_sd35l_preset_fits_one_80_gb_gpu_counted():
    """--preset sd35l, counted from the configurations and the memory model (not measured): the bf16 transformer and
    VAE, the LoRA with its gradient and AdamW state (fp32), one GPU's rollouts, and either the activations of a
    micro-batch (training: text encoders and reward models parked on CPU) or the text encoders, PickScore (fp32) and
    Qwen2.5-VL-7B (16 GB in bf16, docs/performance.md) while sampling. The preset's docstring states the sums."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    from fdfo.bench.side import side_model_bytes
    from fdfo.config import PRESETS, batch_geometry, check_config
    from fdfo.models.sd3 import TEXT_TOKENS, activation_bytes, add_lora
    from fdfo.phases import rollout_gb_per_rank

    cfg = PRESETS["sd35l"]()
    check_config(cfg)
    assert (cfg.pretrained_model, cfg.max_batch_size, cfg.train.gradient_checkpointing, cfg.reward.offload,
            cfg.offload_text_encoders) == ("stabilityai/stable-diffusion-3.5-large", 6, False, True, True)
    assert registry.family_name(cfg.pretrained_model) == "sd3"
    geom = batch_geometry(cfg, 1)
    with torch.device("meta"):
        transformer = SD3Transformer2DModel(**shapes.SD35L_TRANSFORMER_CONFIG)
        vae = AutoencoderKL(**shapes.SD35_VAE_CONFIG)
    weights = 2 * (sum(p.numel() for p in transformer.parameters()) + sum(p.numel() for p in vae.parameters())) / 1e9
    lora = 16 * sum(p.numel() for p in add_lora(transformer, cfg.lora_rank, cfg.lora_alpha).parameters()
                    if p.requires_grad) / 1e9
    side = sum(side_model_bytes(tiny=False, with_pickscore=True).values()) / 1e9 + 16.0
    rollouts = rollout_gb_per_rank(geom, cfg.sample.num_solver_steps, (16, 64, 64), 2, 2)
    activations = activation_bytes(dict(shapes.SD35L_TRANSFORMER_CONFIG), batch=geom.train_batch, latent_side=64,
                                   text_tokens=TEXT_TOKENS, model_dtype=torch.bfloat16, amp_dtype=torch.float16,
                                   lora_rank=cfg.lora_rank, checkpointing=cfg.train.gradient_checkpointing) / 1e9
    training, sampling = weights + lora + rollouts + activations, weights + lora + rollouts + side
    assert geom.train_batch == 6 and activations == pytest.approx(27.52, abs=0.01)
    assert training == pytest.approx(53.6, abs=0.05) and sampling == pytest.approx(57.2, abs=0.05)
    assert max(training, sampling) < 0.75 * 80  # a quarter of the card left for allocator slack and the decode
    assert training + 16.0 + 3.94 > 0.9 * 80  # without --reward.offload the reward models would not leave that


# -- the bench's FLOP model, counted by hand ---------------------------------------------------------------------------


def _linear(tokens: int, fan_in: int, fan_out: int) -> int:
    return 2 * tokens * fan_in * fan_out


def _lora(tokens: int, fan_in: int, fan_out: int, rank: int) -> int:
    return 2 * tokens * rank * (fan_in + fan_out)  # x A^T, then B


def flux_forward_flops(cfg: dict, resolution: int, text: int, rank: int) -> int:
    """One FLUX forward of one image, by hand from the config: every Linear 2 x tokens x fan-in x fan-out (the AdaLN
    modulations and embedders once per image), attention 4 L^2 d, the LoRA on the double-stream blocks' 12 and the
    single-stream blocks' 5 projections."""
    d, n = cfg["num_attention_heads"] * cfg["attention_head_dim"], (resolution // 16) ** 2
    length = n + text
    flops = _linear(n, cfg["in_channels"], d) + _linear(text, cfg["joint_attention_dim"], d)
    flops += 2 * (_linear(1, 256, d) + _linear(1, d, d))  # the timestep and guidance embedders
    flops += _linear(1, cfg["pooled_projection_dim"], d) + _linear(1, d, d)
    for _ in range(cfg["num_layers"]):
        flops += 2 * _linear(1, d, 6 * d) + 4 * length * length * d
        for tokens in (n, text):  # the image and the text stream: q, k, v, out and the MLP, each with its LoRA
            flops += 4 * (_linear(tokens, d, d) + _lora(tokens, d, d, rank))
            flops += _linear(tokens, d, 4 * d) + _linear(tokens, 4 * d, d)
            flops += _lora(tokens, d, 4 * d, rank) + _lora(tokens, 4 * d, d, rank)
    for _ in range(cfg["num_single_layers"]):
        flops += _linear(1, d, 3 * d) + 3 * (_linear(length, d, d) + _lora(length, d, d, rank))
        flops += _linear(length, d, 4 * d) + _lora(length, d, 4 * d, rank)
        flops += _linear(length, 5 * d, d) + _lora(length, 5 * d, d, rank) + 4 * length * length * d
    return flops + _linear(1, d, 2 * d) + _linear(n, d, cfg["in_channels"])


def sd3_forward_flops(cfg: dict, resolution: int, text: int, rank: int) -> int:
    """One SD3 forward of one image, by hand from the config: the patch embedding, every Linear, attention 4 L^2 d,
    the second (image-only) attention of dual-attention blocks, the last block's missing text output and MLP, and the
    LoRA on the 8 joint-attention projections."""
    d, p = cfg["num_attention_heads"] * cfg["attention_head_dim"], cfg["patch_size"]
    n = (resolution // 8 // p) ** 2
    length = n + text
    flops = _linear(n, cfg["in_channels"] * p * p, d) + _linear(text, cfg["joint_attention_dim"], d)
    flops += _linear(1, 256, d) + _linear(1, cfg["pooled_projection_dim"], d) + 2 * _linear(1, d, d)
    for block in range(cfg["num_layers"]):
        last, dual = block == cfg["num_layers"] - 1, block in cfg["dual_attention_layers"]
        flops += _linear(1, d, (9 if dual else 6) * d) + _linear(1, d, (2 if last else 6) * d)
        flops += 4 * (_linear(n, d, d) + _lora(n, d, d, rank)) + _linear(n, d, 4 * d) + _linear(n, 4 * d, d)
        flops += 3 * (_linear(text, d, d) + _lora(text, d, d, rank)) + 4 * length * length * d
        if not last:
            flops += _linear(text, d, d) + _lora(text, d, d, rank) + _linear(text, d, 4 * d) + _linear(text, 4 * d, d)
        if dual:
            flops += 4 * _linear(n, d, d) + 4 * n * n * d
    return flops + _linear(1, d, 2 * d) + _linear(n, d, p * p * cfg["out_channels"])


def test_flop_model_counts_each_models_forward_as_by_hand(monkeypatch):
    """python -m fdfo.bench --model M --flops-only counts M's own transformer (tiny configs here, so that it takes a
    second): FLUX's packed tokens, 512 text tokens, both block kinds and its LoRA; SD3.5-Large's layout."""
    from fdfo.bench.flops import count_flops
    from fdfo.models import tiny_flux

    flux_cfg = dict(tiny_flux.TRANSFORMER_CONFIG)
    large_cfg = dict(tiny_sd3.SD35L_LAYOUT_CONFIG, num_layers=3)
    monkeypatch.setitem(shapes.MODELS, "flux-dev", ("flux", "tiny FLUX", flux_cfg, tiny_sd3.VAE_CONFIG))
    monkeypatch.setitem(shapes.MODELS, "sd35l", ("sd3", "tiny SD3.5-L", large_cfg, tiny_sd3.VAE_CONFIG))
    assert count_flops(False, 64, 4, "flux-dev")["fwd_per_image"] == flux_forward_flops(flux_cfg, 64, 512, 4)
    assert count_flops(False, 128, 4, "sd35l")["fwd_per_image"] == sd3_forward_flops(large_cfg, 128, 205, 4)
    medium = count_flops(True, 64, 4)["fwd_per_image"]
    assert medium == sd3_forward_flops(tiny_sd3.TRANSFORMER_CONFIG, 64, 205, 4)  # the dual attention counted too


@pytest.mark.slow
def test_full_shape_flops_of_each_model():
    """At 512 px, LoRA r32: SD3.5-M 2.247, SD3.5-L 7.234, FLUX.1-dev 21.80 TFLOP per forward (docs/performance.md)."""
    from fdfo.bench.flops import count_flops

    for model, by_hand, tflop in (("sd35m", sd3_forward_flops, 2.2469), ("sd35l", sd3_forward_flops, 7.2341),
                                  ("flux-dev", flux_forward_flops, 21.801)):
        counted = count_flops(False, 512, 32, model)["fwd_per_image"]
        text = 512 if model == "flux-dev" else 205
        assert counted == by_hand(shapes.MODELS[model][2], 512, text, 32), model
        assert counted / 1e12 == pytest.approx(tflop, abs=1e-4), model


def test_bench_model_flag_is_checked_before_any_work():
    from fdfo.bench.cli import parse_args

    assert parse_args(["--model", "flux-dev", "--flops-only"]).model == "flux-dev"
    assert parse_args(["--model", "sd35l", "--census"]).model == "sd35l"
    for argv, message in ((["--model", "flux-dev"], "a measured run is SD3.5-Medium's; pass --flops-only"),
                          (["--model", "flux-dev", "--census"], "the census counts SD3 models only"),
                          (["--model", "sd35l", "--tiny", "--flops-only"], "--tiny uses the tiny SD3's")):
        with pytest.raises(ValueError, match=message):
            parse_args(argv)

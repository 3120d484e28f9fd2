"""The authors' arithmetic, reproduced exactly (docs/algorithm.md §6, §8): what the transformer's first layer sees
under autocast, the stored rollout states, the CFG combination and the VAE decode under the training autocast, and the
8-bit rounding of generated images in the pipeline's dtype.

On CUDA the model is bf16 and training runs under fp16 autocast. CPU autocast refuses to mix bf16 weights with fp16
activations (its `cat` promotes strictly), so these tests keep fp32 weights and only mark the policy's model dtype as
bf16: the input rounding under test is the same, since autocast casts the first layer's input to fp16 either way.
Independent computations: the bare transformer / VAE called on the fp32 state under `torch.autocast`, as the authors
call them, and a fresh `StableDiffusion3Pipeline` in bf16.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from fdfo import distributed
from fdfo.models import tiny_sd3 as tiny
from fdfo.models.sd3 import SD3Policy
from fdfo.phases import _lossless, rollout_dtypes
from tests.test_metrics import RecordingScorer  # the metric scorer that keeps the images it was given

RANK = 4
PROMPTS = ["a red apple on a wooden table", "a lighthouse on a rocky coast at sunset"]


def gpu_like_policy(amp_dtype, guidance=1.0):
    """The CPU tiny policy with CUDA's model dtype (bf16) and the given training autocast."""
    torch.manual_seed(0)
    policy = SD3Policy(tiny.TINY_SD3, torch.device("cpu"), lora_rank=RANK, lora_alpha=2 * RANK,
                       guidance_scale=guidance, amp_dtype=amp_dtype)
    policy.dtype = torch.bfloat16
    with torch.no_grad():  # a nonzero LoRA update, so the adapter is part of the arithmetic
        for i, p in enumerate(p for n, p in policy.transformer.named_parameters() if "lora_B" in n):
            p.normal_(0, 0.05, generator=torch.Generator().manual_seed(i))
    return policy


def authors_velocity(policy, x, sigma, cond, amp_dtype, guidance=1.0):
    """fp32 state into the network under autocast; with CFG, `v_u + g (v_c - v_u)` on the autocast outputs."""
    embeds, pooled = cond["embeds"], cond["pooled"]
    if guidance != 1.0:
        neg = policy.negative()
        x, sigma = torch.cat([x, x]), torch.cat([sigma, sigma])
        embeds = torch.cat([neg["embeds"].expand(len(cond["embeds"]), -1, -1), embeds])
        pooled = torch.cat([neg["pooled"].expand(len(cond["pooled"]), -1), pooled])
    with torch.no_grad(), torch.autocast("cpu", dtype=amp_dtype):
        v = policy.transformer(hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=embeds,
                               pooled_projections=pooled, return_dict=False)[0]
        assert v.dtype == amp_dtype
        if guidance != 1.0:
            v_uncond, v_cond = v.chunk(2)
            v = v_uncond + guidance * (v_cond - v_uncond)
    return v.float()


@pytest.mark.parametrize("amp_dtype", [torch.float16, torch.bfloat16])
def test_the_network_sees_what_autocast_makes_of_an_fp32_state_and_stored_states_change_nothing(amp_dtype):
    policy = gpu_like_policy(amp_dtype)
    cond = policy.encode(PROMPTS)
    x = torch.randn(2, *policy.latent_shape(64), generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.9, 0.3])
    expected = authors_velocity(policy, x, sigma, cond, amp_dtype)
    with torch.no_grad():
        assert torch.equal(policy.velocity(x, sigma, cond), expected)
        # rollouts keep the state in the autocast dtype (2 bytes), and training on it gives the same bits
        state_dtype, _ = rollout_dtypes(policy)
        assert state_dtype == amp_dtype
        assert torch.equal(policy.velocity(x.to(state_dtype), sigma, cond), expected)
        # fp16 rounds 8x more finely than bf16: the first layer must not see bf16(x) under fp16 autocast
        if amp_dtype == torch.float16:
            coarse = authors_velocity(policy, x.to(torch.bfloat16).float(), sigma, cond, amp_dtype)
            assert not torch.equal(coarse, expected)


def test_cfg_is_combined_in_the_autocast_output_dtype_and_stored_losslessly():
    policy = gpu_like_policy(torch.float16, guidance=3.0)
    cond = policy.encode(PROMPTS)
    x = torch.randn(2, *policy.latent_shape(64), generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([0.7, 0.2])
    expected = authors_velocity(policy, x, sigma, cond, torch.float16, guidance=3.0)
    with torch.no_grad():
        v = policy.velocity(x, sigma, cond)
    assert torch.equal(v, expected)
    stored = _lossless(v, rollout_dtypes(policy)[1])  # fp16 values: kept in 2 bytes, exactly
    assert stored.dtype == torch.float16 and torch.equal(stored.float(), v)


def test_the_training_decode_runs_under_the_training_autocast():
    policy = gpu_like_policy(torch.float16)
    vae = policy.pipe.vae
    latents = torch.randn(2, *policy.latent_shape(64), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        images = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]
        assert images.dtype == torch.float16
        expected = (images / 2 + 0.5).clamp(0, 1).float()  # the postprocessing too, in fp16
    got = policy.decode(latents)
    assert got.dtype == torch.float32 and torch.equal(got, expected)
    # without autocast: the VAE in its own dtype, as before
    policy.amp_dtype = None
    with torch.no_grad():
        plain = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]
    assert torch.equal(policy.decode(latents), (plain / 2 + 0.5).clamp(0, 1))


def test_decoding_a_few_images_at_a_time_splits_only_the_vae_calls():
    """--sample.decode-batch-size (lowmem24: 1) splits the VAE calls, under the fp16 training autocast and without
    autocast, with a shorter last call: each part is exactly that part decoded alone, and the whole agrees with one
    call up to the kernels' rounding for another batch size (on this CPU at most 2.7e-3 under fp16, 2e-5 in fp32)."""
    policy = gpu_like_policy(torch.float16)
    latents = torch.randn(5, *policy.latent_shape(64), generator=torch.Generator().manual_seed(4))
    calls = []
    decode = policy.pipe.vae.decode

    def counted(z, **kwargs):
        calls.append(len(z))
        return decode(z, **kwargs)

    policy.pipe.vae.decode = counted
    for amp, atol in ((torch.float16, 4e-3), (None, 1e-4)):
        policy.amp_dtype = amp
        calls.clear()
        whole = policy.decode(latents)
        assert calls == [5]
        calls.clear()
        split = policy.decode(latents, 2)
        assert calls == [2, 2, 1]
        alone = torch.cat([policy.decode(latents[i:i + 2]) for i in (0, 2, 4)])
        assert torch.equal(split, alone)
        torch.testing.assert_close(split, whole, rtol=0, atol=atol)
        torch.testing.assert_close(policy.decode(latents, 1), whole, rtol=0, atol=atol)


# ----------------------------------------------------------------------------------------------------------------------
# §8: 8-bit rounding in the pipeline's dtype


def test_metric_pixels_equal_the_authors_rounding_of_a_bf16_pipeline_exactly(tmp_path, monkeypatch):
    """The project's 8-bit images (what every metric scores and --save-images writes) equal
    `(images * 255 + 0.5).clip(0, 255).to(uint8)` evaluated on an independent bf16 pipeline's output, to 0 levels."""
    from diffusers import StableDiffusion3Pipeline

    from fdfo.evaluation import Plan, generate_and_score, image_name, image_seed
    from fdfo.generation import BaseModel, load_generator

    monkeypatch.setattr(distributed, "get_world_size", lambda: 1)
    monkeypatch.setattr(distributed, "get_rank", lambda: 0)
    steps, res = 2, 64
    base = BaseModel(str(tiny.tiny_sd3_path()), torch.device("cpu"), dtype=torch.bfloat16)  # CUDA's default
    generator = load_generator(None, base=base, num_steps=steps, resolution=res)
    plan = Plan(PROMPTS, [0, 1], num_repeats=1, image_seed=7)
    scorer = RecordingScorer()
    generate_and_score(plan, generator, scorer, None, batch_size=2, save_dir=str(tmp_path))

    reference = StableDiffusion3Pipeline.from_pretrained(str(tiny.tiny_sd3_path()), dtype=torch.bfloat16)
    reference.set_progress_bar_config(disable=True)
    seeds = [image_seed(7, j, 1, 0) for j in range(2)]
    with torch.no_grad():
        images = reference(prompt=PROMPTS, generator=[torch.Generator().manual_seed(s) for s in seeds],
                           num_inference_steps=steps, guidance_scale=1.0, height=res, width=res,
                           output_type="pt").images
    assert images.dtype == torch.bfloat16
    expected = (images * 255 + 0.5).clip(0, 255).to(torch.uint8)
    # the float32 rounding of the same images differs: the test can tell the two apart
    assert not torch.equal((images.float() * 255 + 0.5).clip(0, 255).to(torch.uint8), expected)

    (received,) = scorer.received
    assert torch.equal((received * 255).round().to(torch.uint8), expected)
    assert torch.equal(received, expected.float() / 255)
    saved = torch.stack([torch.from_numpy(np.array(Image.open(tmp_path / image_name(j, 0)))) for j in range(2)])
    assert torch.equal(saved, expected.permute(0, 2, 3, 1))


# ----------------------------------------------------------------------------------------------------------------------
# DDP without buffer broadcasts


def test_ddp_does_not_broadcast_buffers_before_each_forward(tmp_path):
    """Two gloo processes: a rank's own buffer value survives the forward (DDP's default would overwrite it with rank
    0's before every forward), and the gradients are still averaged over the ranks. The ranks meet through a file and
    wait for each other as long as it takes (tests/gloo_pair.py)."""
    import json

    from tests.gloo_pair import run_pair

    outputs = run_pair("tests/ddp_buffers_worker.py", tmp_path)
    assert [code for code, _, _ in outputs] == [0, 0], [err[-2000:] for _, _, err in outputs]
    lines = [json.loads(line) for _, out, _ in outputs for line in out.splitlines() if line.startswith("{")]
    by_rank = {line["rank"]: line for line in lines}
    assert by_rank[0]["scale"] == [1.0, 1.0] and by_rank[1]["scale"] == [2.0, 2.0]
    assert by_rank[0]["grad"] == by_rank[1]["grad"] == [1.5, 1.5]  # mean of 1 (rank 0) and 2 (rank 1)

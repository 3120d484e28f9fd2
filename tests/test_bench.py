"""fdfo.bench: the FLOP model (against the issue's FlopCounterMode counts of SD3.5-M) and the --tiny CPU run's JSON."""

import json

import pytest
import torch

from fdfo import bench


@pytest.fixture(scope="module")
def tiny_record(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "tiny.json"
    bench.main(["--tiny", "--out", str(out)])
    return json.loads(out.read_text())


def test_tiny_bench_writes_every_field_with_consistent_flops(tiny_record):
    r = tiny_record
    assert {"gpu", "torch", "diffusers", "peft", "world_size"} <= r["env"].keys()
    assert r["env"]["world_size"] == 1 and r["env"]["gpu"] is None
    f, steps = r["flops"], r["config"]["steps"]  # tiny defaults: 4 steps, 2 pairs, 64 px, no CFG
    assert steps == 4 and r["config"]["pairs_per_gpu"] == 2
    # per pair: 2 images x T forwards to sample, 2 x T training items, 2 decodes
    assert f["per_pair"]["sample"] == 2 * steps * f["fwd_per_image"]
    assert f["per_pair"]["train"] == 2 * steps * f["train_item"]
    assert f["per_pair"]["decode"] == 2 * f["decode_per_image"]
    for name in ("sample", "decode", "reward", "exchange", "train"):
        phase = r["phases"][name]
        assert phase["s_per_pair"] > 0, name
        assert phase["peak_mem_gb"] is None and phase["mfu"] is None  # CPU: no device memory, no peak table entry
    sample = r["phases"]["sample"]
    assert sample["achieved_tflops"] == pytest.approx(f["per_pair"]["sample"] / sample["s_per_pair"] / 1e12)
    total = r["total"]
    assert total["s_per_pair"] == pytest.approx(sum(p["s_per_pair"] for p in r["phases"].values()))
    assert total["epoch_s_projected"] == pytest.approx(total["s_per_pair"] * 432)
    assert total["mfu"] is None
    # rollouts held for training: 2 pairs x 2 samples x 4 timesteps x (16 x 8 x 8) latents x (4 + 4) bytes (fp32 CPU)
    assert r["rollout_gb_per_rank"] == pytest.approx(2 * 2 * 4 * 16 * 8 * 8 * 8 / 1e9)
    # the estimate train.py prints, for the bench's micro-batch (tests/test_memory.py checks the estimate itself)
    from fdfo import tiny
    from fdfo.memory import sd3_activation_bytes

    expected = sd3_activation_bytes(dict(tiny.TRANSFORMER_CONFIG), batch=r["config"]["train_batch"], latent_side=8,
                                    text_tokens=bench.TEXT_TOKENS, model_dtype=torch.float32, amp_dtype=None,
                                    lora_rank=8)
    assert r["activation_gb_estimate"] == pytest.approx(expected / 1e9)


def test_meta_flop_count_equals_a_real_forward_of_the_tiny_model():
    from diffusers import SD3Transformer2DModel
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from fdfo import tiny

    counted = bench.count_flops(tiny=True, resolution=64, lora_rank=8)
    model = bench.with_lora(SD3Transformer2DModel(**tiny.TRANSFORMER_CONFIG).requires_grad_(False), 8)
    cfg = tiny.TRANSFORMER_CONFIG
    inputs = dict(hidden_states=torch.randn(1, 16, 8, 8), timestep=torch.ones(1),
                  encoder_hidden_states=torch.randn(1, bench.TEXT_TOKENS, cfg["joint_attention_dim"]),
                  pooled_projections=torch.randn(1, cfg["pooled_projection_dim"]))
    # the math attention kernel runs as counted matmuls (the fused CPU kernel has no FLOP formula)
    with FlopCounterMode(display=False) as real, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(**inputs, return_dict=False)
    assert counted["fwd_per_image"] == real.get_total_flops()
    # backward through the frozen base costs about one more forward (input gradients only) plus the LoRA
    assert 1.9 < counted["train_item"] / counted["fwd_per_image"] < 2.6


def test_peak_table_and_user_errors():
    assert bench.peak_tflops("NVIDIA H200", "bf16") == 989.0
    assert bench.peak_tflops("NVIDIA H200", "fp32") is None and bench.peak_tflops(None, "bf16") is None
    with pytest.raises(ValueError, match="--pairs must be >= 1, got 0"):
        bench.parse_args(["--pairs", "0"])
    with pytest.raises(ValueError, match="--resolution 100 must be a multiple of 16"):
        bench.parse_args(["--resolution", "100"])


@pytest.mark.slow
def test_full_shape_flops_match_the_issue_counts():
    """SD3.5-M at 512 px (1,024 image tokens + 205 text tokens): 2.247 TFLOP per forward, 4.769 per LoRA r32 item."""
    f = bench.count_flops(tiny=False, resolution=512)
    assert f["fwd_per_image"] / 1e12 == pytest.approx(2.247, rel=0.05)
    assert f["train_item"] / 1e12 == pytest.approx(4.769, rel=0.05)

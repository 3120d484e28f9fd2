"""Checks only a CUDA machine can make (`python -m pytest -q -m gpu`): the reference precision (bf16 base, fp16
autocast with a grad scaler) and the bf16 option train and resume exactly on the tiny pipeline; NCCL initialises
under torchrun. Skipped without CUDA; never part of the default suite."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fdfo import train_loop
from tests.test_train import tiny_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_cuda_training_is_finite_and_resumes_exactly(tmp_path, precision):
    def cfg(run, epochs):
        c = tiny_config(tmp_path / run, num_epochs=epochs, device="cuda")
        c.train.precision = precision
        return c

    train_loop.train(cfg("a", 2))
    train_loop.train(cfg("b", 1))
    train_loop.train(cfg("b", 2))
    a = load_file(tmp_path / "a/checkpoints/epoch-0000002/adapter_model.safetensors")
    b = load_file(tmp_path / "b/checkpoints/epoch-0000002/adapter_model.safetensors")
    assert all(torch.isfinite(v).all() for v in a.values())
    assert any((v != 0).any() for k, v in a.items() if "lora_B" in k)
    # CUDA kernels may be non-deterministic (atomics); resume must still agree to rounding
    for key in a:
        assert (a[key] - b[key]).norm() <= 1e-3 * a[key].norm().clamp_min(1e-12), key


def test_nccl_torchrun_one_process(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "train.py",
               "--preset", "smoke", "--num-epochs", "1", "--total-pairs-per-epoch", "4",
               "--sample.num-solver-steps", "2", "--run-dir", str(tmp_path / "run")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "process group: nccl, world size 1" in result.stdout
    assert (tmp_path / "run/checkpoints/epoch-0000001/adapter_model.safetensors").exists()


def test_rollouts_in_host_memory_train_like_rollouts_on_the_gpu(tmp_path):
    """--train.rollout-device cpu (the lowmem24 preset) stores exactly the same values, so training agrees to
    rounding."""
    def cfg(run, where):
        c = tiny_config(tmp_path / run, device="cuda")
        c.train.rollout_device = where
        return c

    train_loop.train(cfg("gpu", "auto"))
    train_loop.train(cfg("host", "cpu"))
    a = load_file(tmp_path / "gpu/checkpoints/epoch-0000001/adapter_model.safetensors")
    b = load_file(tmp_path / "host/checkpoints/epoch-0000001/adapter_model.safetensors")
    for key in a:
        assert (a[key] - b[key]).norm() <= 1e-3 * a[key].norm().clamp_min(1e-12), key


def test_text_encoders_kept_on_the_gpu_train_like_offloaded_ones(tmp_path):
    """--no-offload-text-encoders only changes where the encoders wait between phases: the same prompts give the same
    embeddings, so training agrees to rounding. (On a CPU the option does nothing, hence a GPU test.)"""
    def cfg(run, offload):
        c = tiny_config(tmp_path / run, device="cuda")
        c.offload_text_encoders = offload
        return c

    train_loop.train(cfg("offloaded", True))
    train_loop.train(cfg("kept", False))
    a = load_file(tmp_path / "offloaded/checkpoints/epoch-0000001/adapter_model.safetensors")
    b = load_file(tmp_path / "kept/checkpoints/epoch-0000001/adapter_model.safetensors")
    for key in a:
        assert (a[key] - b[key]).norm() <= 1e-3 * a[key].norm().clamp_min(1e-12), key


def test_nccl_exchange_of_rows_kept_in_host_memory(tmp_path):
    """The rollout exchange under NCCL (one process) for CUDA and for host-memory rows returns the wanted rows."""
    script = (
        "import torch\n"
        "from fdfo import distributed as d\n"
        "d.init()\n"
        "for dev in ('cuda', 'cpu'):\n"
        "    x = torch.arange(24.0, device=dev).reshape(12, 2)\n"
        "    want = torch.tensor([5, 0, 11, 3])\n"
        "    out = d.exchange_rows(x, [want])\n"
        "    assert out.device.type == dev and torch.equal(out.cpu(), x.cpu()[want]), (dev, out)\n"
        "d.shutdown()\n"
        "print('exchange ok')\n"
    )
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "--no-python",
               sys.executable, "-c", script]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "exchange ok" in result.stdout, result.stderr[-3000:]


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_estimate_matches_cuda_memory(precision, checkpointing):
    """The meta-device estimate (fdfo/memory.py) against the CUDA memory a real training forward keeps until its
    backward: random-init SD3.5-Medium shapes with the LoRA, 512 px, micro-batch 2, bf16 weights under autocast.
    Without checkpointing the saved tensors are all of it; with it the peak of the backward (one block recomputed)
    is compared, so the bound is looser."""
    from fdfo.bench import TEXT_TOKENS, build_models
    from fdfo.models.sd3 import activation_bytes as sd3_activation_bytes
    from fdfo.models.sd3 import add_lora

    amp = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    transformer, _, _ = build_models(False, torch.device("cuda"))
    base = transformer.to(torch.bfloat16).requires_grad_(False)
    model = add_lora(base, 32, 64)
    if checkpointing:
        base.enable_gradient_checkpointing()
    config = dict(base.config)
    estimate = sd3_activation_bytes(config, batch=2, latent_side=64, text_tokens=TEXT_TOKENS,
                                    model_dtype=torch.bfloat16, amp_dtype=amp, lora_rank=32,
                                    checkpointing=checkpointing)
    inputs = dict(hidden_states=torch.randn(2, 16, 64, 64, device="cuda", dtype=torch.bfloat16),
                  timestep=torch.full((2,), 500.0, device="cuda"),
                  encoder_hidden_states=torch.randn(2, TEXT_TOKENS, 4096, device="cuda", dtype=torch.bfloat16),
                  pooled_projections=torch.randn(2, 2048, device="cuda", dtype=torch.bfloat16))
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.autocast("cuda", dtype=amp):
        out = model(**inputs, return_dict=False)[0]
    kept = torch.cuda.memory_allocated() - before - out.numel() * out.element_size()
    out.float().square().mean().backward()
    peak = torch.cuda.max_memory_allocated() - before
    measured = peak if checkpointing else kept
    print(f"activation estimate {estimate / 1e9:.3f} GB, measured {measured / 1e9:.3f} GB "
          f"({precision}, checkpointing {checkpointing})")
    assert estimate == pytest.approx(measured, rel=0.25 if checkpointing else 0.1)

"""The bit-identical speed levers (fdfo/models/sd3_speed.py): the same velocities, SPO ratios and LoRA gradients as
without them (torch.equal, fp16 and bf16 over a bf16 base, under CUDA autocast's op lists emulated on real CPU
tensors); the bf16 -> fp16 cast of every bit pattern; each lever's kernels in the tiny model's census, counted by
hand; a LoRA weight cast kept while sampling is never stale; adapters save and load as before."""

import numpy as np
import pytest
import torch

from fdfo.memory import AutocastEmulation
from fdfo.models import tiny_sd3 as tiny
from fdfo.models.sd3 import SD3Policy
from fdfo.models.sd3_speed import SpeedLevers
from fdfo.objective import spo_loss

NONE, ALL = SpeedLevers.parse("none"), SpeedLevers()
TOKENS = 24  # text tokens of the random conditioning (the real 205 would only make the CPU test slower)


def gpu_like(amp, levers):
    """The tiny policy as a GPU builds it (bf16 base, fp32 LoRA with a nonzero B), its autocast CUDA's op lists on
    real CPU tensors."""
    torch.manual_seed(0)
    policy = SD3Policy(tiny.TINY_SD3, torch.device("cpu"), 4, 8, amp_dtype=amp, dtype=torch.bfloat16, levers=levers)
    with torch.no_grad():
        for i, p in enumerate(p for n, p in policy.transformer.named_parameters() if "lora_B" in n):
            p.normal_(0, 0.05, generator=torch.Generator().manual_seed(i))
    policy.autocast = lambda: AutocastEmulation(amp, attention=torch.nn.functional.scaled_dot_product_attention)
    return policy


def inputs(policy, seed=1, rows=2):
    g = torch.Generator().manual_seed(seed)
    cfg = policy.pipe.transformer.config
    cond = {"embeds": torch.randn(rows, TOKENS, cfg.joint_attention_dim, generator=g).to(policy.dtype),
            "pooled": torch.randn(rows, cfg.pooled_projection_dim, generator=g).to(policy.dtype)}
    device = policy.device
    return (torch.randn(rows, *policy.latent_shape(64), generator=g).to(device),
            torch.rand(rows, generator=g).to(device), {k: v.to(device) for k, v in cond.items()})


def sample(policy, seed=1):
    x, sigma, cond = inputs(policy, seed)
    policy.transformer.eval()
    with torch.no_grad():
        return policy.velocity(x, sigma, cond)


def train_step(policy, seed=1):
    """A training forward on the stored (autocast-dtype) state, the SPO loss, the backward: (velocity, ratio,
    {LoRA parameter: gradient})."""
    x, sigma, cond = inputs(policy, seed)
    g = torch.Generator().manual_seed(seed + 100)
    policy.transformer.train()
    v = policy.velocity(x.to(policy.input_dtype), sigma, cond)
    v_ref = v.detach() + 0.01 * torch.randn(v.shape, generator=g).to(v.device)
    dx, dR = torch.randn(v.shape, generator=g).to(v.device), torch.randn(len(v), generator=g).to(v.device)
    loss, ratio = spo_loss(v, v_ref, dx, dR, 0.03)
    (loss.sum() * 1024.0).backward()  # a grad scaler's factor
    grads = {n: p.grad.clone() for n, p in policy.transformer.named_parameters() if p.requires_grad}
    policy.transformer.zero_grad(set_to_none=True)
    return v.detach(), ratio.detach(), grads


@pytest.mark.parametrize("amp", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_the_levers_change_no_number(amp):
    plain, fast = gpu_like(amp, NONE), gpu_like(amp, ALL)
    # the fast policy really runs another path: its base is stored in the autocast dtype
    assert fast.pipe.transformer.transformer_blocks[0].ff.net[2].weight.dtype == amp
    assert plain.pipe.transformer.transformer_blocks[0].ff.net[2].weight.dtype == torch.bfloat16
    expected = sample(plain)
    assert torch.equal(sample(fast), expected) and torch.equal(sample(fast), expected)  # the casts made, then kept
    (v0, r0, g0), (v1, r1, g1) = train_step(plain), train_step(fast)
    assert torch.equal(v0, v1) and torch.equal(r0, r1)
    assert g0.keys() == g1.keys() and len(g0) == 30  # 15 LoRA layers
    for name in g0:
        assert torch.equal(g0[name], g1[name]), name
    assert sum(bool((g != 0).any()) for g in g0.values()) == 28  # all but the last block's add_q_proj (docs)


def test_gradient_checkpointing_recomputes_the_same_levered_forward():
    """A checkpointed block is recomputed in the backward with the levers as in the forward (its saved tensors must
    match), under a real autocast: bf16 on the CPU (torch restores autocast for the recomputation, not an emulation;
    CPU autocast cannot run fp16 over a bf16 base)."""
    results = []
    for levers, checkpointing in ((NONE, False), (ALL, True)):
        policy = gpu_like(torch.bfloat16, levers)
        del policy.autocast  # the policy's own torch.autocast("cpu", bf16)
        policy.speed_options(gradient_checkpointing=checkpointing)
        results.append(train_step(policy))
    (v0, r0, g0), (v1, r1, g1) = results
    assert torch.equal(v0, v1) and torch.equal(r0, r1) and all(torch.equal(g0[k], g1[k]) for k in g0)


def test_bf16_to_fp16_of_every_bit_pattern_is_what_autocast_makes():
    """The base_dtype lever stores `w.to(fp16)` of each bf16 weight: for all 65,536 bf16 bit patterns that is IEEE
    round-to-nearest-even (numpy's float32 -> float16 of the same value, NaN as NaN), and what a real autocast makes
    of the weight inside a Linear (read back through an identity input, for the patterns that stay finite)."""
    bits = torch.arange(65536, dtype=torch.int32).to(torch.int16)
    bf16 = bits.view(torch.bfloat16)
    stored = bf16.to(torch.float16)
    with np.errstate(over="ignore"):  # beyond fp16's range: inf, as it should
        oracle = torch.from_numpy(bf16.float().numpy().astype(np.float16))
    nan = torch.isnan(oracle)
    assert torch.equal(torch.isnan(stored), nan)
    assert torch.equal(stored[~nan].view(torch.int16), oracle[~nan].view(torch.int16))
    finite = bf16[torch.isfinite(stored)]
    weight = finite[: len(finite) // 256 * 256].reshape(-1, 256)
    with torch.autocast("cpu", dtype=torch.float16):
        made = torch.nn.functional.linear(torch.eye(256, dtype=torch.float16), weight)  # = weight.T, cast by autocast
    assert made.dtype == torch.float16
    # equal values (the identity's sum turns -0.0 into +0.0, so not the bits of the zeros)
    assert torch.equal(made.T, weight.to(torch.float16)) and len(weight) * 256 > 30000


def _census(levers):
    from fdfo.bench.census import sample_forward
    from fdfo.bench.dispatch import summary

    return summary(sample_forward(True, "fp16", exact=False, levers=levers))


def test_each_lever_removes_the_casts_it_is_for():
    """The tiny model (2 blocks, the first with dual attention; 15 LoRA layers: 8 per block, no to_add_out in the
    last), one sampling forward, all levers on against one off:
    - base_dtype: one cast per frozen Linear / Conv2d weight and bias (counted from the model's modules);
    - lora_cache: one per LoRA weight, 2 x 15;
    - shared_cast: per joint attention the 6 casts of the image input (q, k, v, their LoRA A) and of the text input
      become 1 each (2 x 5), the output projection's base and LoRA A share 1 (block 0: to_out and to_add_out, block
      1: to_out), the first block's second attention shares 1 of 3 (q, k, v without LoRA): 2 x 10 + 3 + 2 = 25;
    - peft_cast: PEFT's cast of a bf16 input to fp32 and autocast's of that copy for LoRA A, 2 per output
      projection: 2 x 3."""
    from diffusers import SD3Transformer2DModel

    from fdfo.bench.census import build_policy  # noqa: F401  (the census's own build path)

    frozen = SD3Transformer2DModel(**tiny.TRANSFORMER_CONFIG)
    tensors = sum(1 + (m.bias is not None) for m in frozen.modules()
                  if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))
    expected = {"base_dtype": tensors, "lora_cache": 30, "shared_cast": 25, "peft_cast": 6}
    on = _census(ALL)
    for name, removed in expected.items():
        off = _census(SpeedLevers(**{name: False}))
        assert (off["kernel_ops"] - on["kernel_ops"], off["casts"] - on["casts"]) == (removed, removed), name
    none = _census(NONE)
    assert none["casts"] - on["casts"] == tensors + 30 + 25 + 6 - 3  # without shared_cast, PEFT's cast costs 1 less


def test_sd35m_has_786_frozen_projection_tensors_and_191_lora_layers():
    """The issue's count of the base weights and biases autocast casts per forward (786), and of the LoRA layers
    (8 joint-attention projections in 24 blocks, the last without to_add_out)."""
    from diffusers import SD3Transformer2DModel

    from fdfo.models.sd3 import add_lora
    from fdfo.models.sd3_speed import _lora_layers

    with torch.device("meta"):
        model = SD3Transformer2DModel(**tiny.SD35M_TRANSFORMER_CONFIG)
        tensors = sum(1 + (m.bias is not None) for m in model.modules()
                      if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))
        assert tensors == 786
        assert len(_lora_layers(add_lora(model, 32, 64.0))) == 191


def _lora(policy):
    return {n: p for n, p in policy.transformer.named_parameters() if p.requires_grad}


def _same_as_plain(policy, amp):
    """The policy's sampling velocity equals a lever-free policy's with the same LoRA weights, bit for bit."""
    plain = gpu_like(amp, NONE)
    with torch.no_grad():
        for (name, p), (_, q) in zip(_lora(plain).items(), _lora(policy).items(), strict=True):
            p.copy_(q)
    return torch.equal(sample(policy), sample(plain))


def test_a_kept_lora_cast_is_never_stale(tmp_path):
    """Each way the LoRA weights change between two sampling phases: an optimizer step after a training step, a
    resumed adapter (load_adapter), an in-place copy (the baselines' EMA swap), new storage (`.data =`)."""
    amp = torch.bfloat16  # fast on a CPU; the kept casts work the same for fp16
    policy = gpu_like(amp, ALL)
    a = policy.pipe.transformer.transformer_blocks[0].attn.to_q.lora_A["default"]
    sample(policy)
    kept = a.__dict__["_fdfo_cast"][1]
    assert torch.equal(kept, a.weight.to(amp))
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-2)
    v, _, grads = train_step(policy)
    assert "_fdfo_cast" not in a.__dict__  # a forward with autograd drops the kept casts
    for name, p in _lora(policy).items():
        p.grad = grads[name]
    optimizer.step()
    assert _same_as_plain(policy, amp)
    policy.save_adapter(tmp_path / "adapter")
    with torch.no_grad():
        for p in _lora(policy).values():
            p.add_(1.0)  # an in-place change: the version counter moves
    assert _same_as_plain(policy, amp)
    sample(policy)
    policy.load_adapter(tmp_path / "adapter")  # the saved weights back
    assert "_fdfo_cast" not in a.__dict__ and _same_as_plain(policy, amp)
    a.weight.data = a.weight.data * 2  # new storage, version counter of the new tensor
    assert _same_as_plain(policy, amp)


def test_adapters_save_and_load_as_without_the_levers(tmp_path):
    from safetensors.torch import load_file

    folders = []
    for levers in (NONE, ALL):
        policy = gpu_like(torch.float16, levers)
        sample(policy)  # with kept casts in the fast one
        policy.save_adapter(tmp_path / levers.names().__len__().__str__())
        folders.append(tmp_path / levers.names().__len__().__str__())
    plain, fast = (load_file(str(f / "adapter_model.safetensors")) for f in folders)
    assert plain.keys() == fast.keys() and len(plain) == 30
    assert all(torch.equal(plain[k], fast[k]) and fast[k].dtype == torch.float32 for k in plain)
    assert (folders[0] / "adapter_config.json").read_text() == (folders[1] / "adapter_config.json").read_text()
    loaded = gpu_like(torch.float16, ALL)
    loaded.load_adapter(folders[0])
    assert all(torch.equal(p, plain[k.replace(".default", "")]) for k, p in _lora(loaded).items()
               if k.replace(".default", "") in plain)
    assert all(p.dtype == torch.float32 for p in _lora(loaded).values())


def test_without_autocast_the_policy_is_peft_and_diffusers_own():
    """fp32 on a CPU (no autocast): no lever acts, the base stays fp32 and PEFT casts as it does."""
    policy = SD3Policy(tiny.TINY_SD3, torch.device("cpu"), 4, 8)
    layer = policy.pipe.transformer.transformer_blocks[0].attn.to_q
    assert layer.base_layer.weight.dtype == torch.float32 and layer.cast_input_dtype_enabled
    assert type(layer.lora_A["default"]) is torch.nn.Linear and not layer.base_layer._forward_pre_hooks


@pytest.mark.slow
def test_compiled_blocks_with_the_levers_equal_compiled_blocks_without():
    """--train.compile traces the blocks without lora_cache and shared_cast (no graph break at their Python state),
    so the compiled model gives the same bits with the levers as without (bf16 CPU autocast)."""
    import torch._dynamo

    results = []
    for levers in (NONE, ALL):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        policy = gpu_like(torch.bfloat16, levers)
        del policy.autocast
        policy.speed_options(compile_blocks=True)
        results.append((sample(policy), train_step(policy)))
        assert not torch._dynamo.utils.counters["graph_break"], levers
    (s0, (v0, r0, g0)), (s1, (v1, r1, g1)) = results
    assert torch.equal(s0, s1) and torch.equal(v0, v1) and all(torch.equal(g0[k], g1[k]) for k in g0)



@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("amp", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_the_levers_change_no_number_under_cuda_autocast(amp):
    """The same comparison with CUDA's own autocast and kernels (a bf16 base on CUDA; attention on the math backend
    and deterministic algorithms, so that the comparison is not between two runs of nondeterministic kernels)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.use_deterministic_algorithms(True)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            runs = []
            for levers in (NONE, ALL):
                torch.manual_seed(0)
                policy = SD3Policy(tiny.TINY_SD3, torch.device("cuda"), 4, 8, amp_dtype=amp, levers=levers)
                with torch.no_grad():
                    for i, p in enumerate(p for n, p in policy.transformer.named_parameters() if "lora_B" in n):
                        p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.05)
                runs.append((sample(policy), sample(policy), *train_step(policy)))
    finally:
        torch.use_deterministic_algorithms(False)
    (s0, _, v0, r0, g0), (s1, s1_kept, v1, r1, g1) = runs
    assert torch.equal(s0, s1) and torch.equal(s0, s1_kept) and torch.equal(v0, v1) and torch.equal(r0, r1)
    assert all(torch.equal(g0[k], g1[k]) for k in g0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_casts_every_bf16_bit_pattern_as_the_cpu_does():
    bf16 = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    cpu, cuda = bf16.to(torch.float16), bf16.cuda().to(torch.float16).cpu()
    nan = torch.isnan(cpu)
    assert torch.equal(torch.isnan(cuda), nan)
    assert torch.equal(cpu[~nan].view(torch.int16), cuda[~nan].view(torch.int16))

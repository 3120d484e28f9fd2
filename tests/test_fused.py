"""The opt-in kernels that move rounding (fdfo/fused.py): the fused RMS norm keeps diffusers' rounding points and
differs only by its summation order, its backward is at least as accurate as autograd's, the LayerNorm option rounds
once to the autocast dtype, and the same arithmetic serves sampling and training (the SPO ratio at theta = old is
exactly 1). The Triton kernels are checked against the reference on a GPU (marked gpu)."""

import pytest
import torch
from diffusers.models.normalization import RMSNorm

from fdfo import fused
from fdfo.fused_triton import _inverse, memory_order
from fdfo.models import tiny_sd3 as tiny
from fdfo.models.sd3 import SD3Policy
from fdfo.objective import spo_loss

# (input dtype, weight dtype): CUDA's bf16 weights under fp16 / bf16 autocast, the CPU's fp32, no weight
DTYPES = [(torch.float16, torch.bfloat16), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
          (torch.float16, torch.float32), (torch.float16, None)]


def _norm(weight_dtype, dim=64, seed=0):
    norm = RMSNorm(dim, eps=1e-6, elementwise_affine=weight_dtype is not None).requires_grad_(False)
    if weight_dtype is not None:
        with torch.no_grad():
            norm.weight.copy_(1 + 0.3 * torch.randn(dim, generator=torch.Generator().manual_seed(seed)))
        norm.to(weight_dtype)
    return norm


def _q_like(dtype, seed=1, requires_grad=False):
    """`[B, H, S, D]` viewed from `[B, S, H, D]`, as the attention's q / k reach the norm."""
    x = 3 * torch.randn(2, 50, 3, 64, generator=torch.Generator().manual_seed(seed))
    x = x.to(dtype).transpose(1, 2)
    return x.requires_grad_(requires_grad)


def test_tree_sum_adds_halves_pairwise():
    assert fused.tree_sum(torch.tensor([1.0, 2, 3, 4, 5])).tolist() == [15.0]  # (1+5, 2+0, 3+0, 4+0) -> (9, 6)
    # fp32 cancellation shows the order: left to right gives 1, the pairwise tree (1e8 - 1e8) + (1 + 1) = 2
    values = torch.tensor([1e8, 1.0, -1e8, 1.0])
    assert fused.tree_sum(values).item() == 2.0
    assert ((values[0] + values[1]) + values[2] + values[3]).item() == 1.0


@pytest.mark.parametrize("x_dtype,w_dtype", DTYPES)
def test_reference_rms_norm_has_diffusers_rounding_points(monkeypatch, x_dtype, w_dtype):
    """Summed in diffusers' order the reference is diffusers' RMSNorm bit for bit, dtype included: only the order of
    the variance sum differs (the rounding to the 16-bit weight dtype, the product, the final dtype are the same)."""
    norm, x = _norm(w_dtype), _q_like(x_dtype)
    expected = norm(x)
    monkeypatch.setattr(fused, "tree_sum", lambda t: t.sum(-1, keepdim=True))
    out = fused.rms_norm(x, norm.weight, norm.eps)
    assert out.dtype == expected.dtype == fused.output_dtype(x_dtype, norm.weight)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("x_dtype,w_dtype", DTYPES)
def test_reference_rms_norm_matches_diffusers_forward_and_backward(x_dtype, w_dtype):
    """With its own (tree) summation order: the forward within one rounding step of the output dtype on a few
    elements; the backward (fp32, one rounding) agrees in fp32 and is no less accurate than autograd's in 16 bits,
    both measured against an fp64 computation of diffusers' graph."""
    norm = _norm(w_dtype)
    x = _q_like(x_dtype, requires_grad=True)
    x_ours = _q_like(x_dtype, requires_grad=True)
    out, ours = norm(x), fused.FusedRMSNorm.forward(norm, x_ours)
    assert ((ours.float() - out.float()).abs() <= 4 * torch.finfo(out.dtype).eps * out.float().abs()).all()
    assert (ours != out).float().mean() < (0.3 if out.dtype == torch.float32 else 0.01)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out.dtype)
    out.backward(grad)
    ours.backward(grad)
    exact = _float64_input_grad(norm, x.detach(), grad)
    if x_dtype == torch.float32:
        torch.testing.assert_close(x_ours.grad, x.grad, rtol=1e-5, atol=1e-6)
    else:
        err_autograd = (x.grad.double() - exact).square().mean().sqrt()
        err_ours = (x_ours.grad.double() - exact).square().mean().sqrt()
        assert err_ours <= err_autograd
    assert (x_ours.grad.double() - exact).abs().max() <= 4 * torch.finfo(x_dtype).eps * exact.abs().max()


def _float64_input_grad(norm, x, grad):
    x = x.double().requires_grad_(True)
    weight = None if norm.weight is None else norm.weight.double()
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps)
    (y if weight is None else y * weight).backward(grad.double())
    return x.grad


def test_memory_order_walks_q_and_k_rows_without_a_copy():
    x = _q_like(torch.float16)
    order = memory_order(x)
    assert order == (0, 2, 1, 3) and x.permute(order).is_contiguous()
    assert torch.equal(x.permute(order).permute(_inverse(order)), x)
    assert memory_order(torch.zeros(4, 3)) == (0, 1)
    assert memory_order(torch.zeros(3, 4).t()) is None  # a last dimension that is not contiguous: copied


def test_compute_dtype_layer_norm_rounds_the_fp32_norm_once():
    norm = torch.nn.LayerNorm(32, elementwise_affine=False, eps=1e-6)
    x = torch.randn(4, 7, 32, generator=torch.Generator().manual_seed(0)).to(torch.float16)
    expected_fp32 = torch.nn.functional.layer_norm(x.float(), (32,), eps=1e-6)
    option = torch.nn.LayerNorm(32, elementwise_affine=False, eps=1e-6)
    option.__class__ = fused.ComputeDtypeLayerNorm
    assert torch.equal(option(x.float()), norm(x.float()))  # without autocast: nn.LayerNorm exactly
    for dtype in (torch.float16, torch.bfloat16):
        with torch.autocast("cpu", dtype=dtype):
            out = option(x)
        assert out.dtype == dtype and torch.equal(out, expected_fp32.to(dtype))


def _policy(amp_dtype=None, **options):
    torch.manual_seed(0)
    policy = SD3Policy(tiny.TINY_SD3, torch.device("cpu"), lora_rank=4, lora_alpha=8, amp_dtype=amp_dtype)
    with torch.no_grad():  # a nonzero LoRA update, so that the adapter is part of the arithmetic
        for i, p in enumerate(p for n, p in policy.transformer.named_parameters() if "lora_B" in n):
            p.normal_(0, 0.05, generator=torch.Generator().manual_seed(i))
    policy.speed_options(**options)
    return policy


def _inputs(policy):
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, *policy.latent_shape(64), generator=g), torch.tensor([0.9, 0.3]), policy.encode(
        ["a red apple", "a blue boat"])


def test_options_swap_the_tiny_models_norms_and_keep_its_state():
    default = _policy()
    both = _policy(fused_rms_norm=True, compute_dtype_modulation=True)
    classes = [type(m) for m in both.pipe.transformer.modules()]
    # 2 blocks x (q, k, added q, added k) + the dual attention's q, k; 4 + 3 AdaLN norms + 1 output norm
    assert classes.count(fused.FusedRMSNorm) == 10 and classes.count(fused.ComputeDtypeLayerNorm) == 8
    assert RMSNorm not in classes and torch.nn.LayerNorm not in classes
    assert default.transformer.state_dict().keys() == both.transformer.state_dict().keys()
    x, sigma, cond = _inputs(default)
    with torch.no_grad():
        v_default = default.velocity(x, sigma, cond)
        modulation = _policy(compute_dtype_modulation=True).velocity(x, sigma, cond)
        fused_norm = _policy(fused_rms_norm=True).velocity(x, sigma, cond)
    assert torch.equal(modulation, v_default)  # fp32, no autocast: the option does nothing
    torch.testing.assert_close(fused_norm, v_default, rtol=1e-5, atol=1e-5)  # fp32: the summation order only


@pytest.mark.parametrize("options,amp_dtype", [
    (dict(fused_rms_norm=True), None),  # fp32: under fp16 autocast the fp32 norm output is rounded away on the CPU
    (dict(compute_dtype_modulation=True), torch.float16),  # without autocast the option does nothing
    (dict(fused_rms_norm=True, compute_dtype_modulation=True), torch.float16)])
def test_sampling_and_training_share_the_options_so_the_ratio_at_theta_old_is_one(options, amp_dtype):
    """The rollout velocity (sampling: eval, no grad) and the training forward at the same adapter give ratio 1
    exactly; the option does change the velocity (against the default arithmetic)."""
    policy = _policy(amp_dtype, **options)
    x, sigma, cond = _inputs(policy)
    policy.transformer.eval()
    with torch.no_grad():
        v_ref = policy.velocity(x, sigma, cond)
    policy.transformer.train()
    v = policy.velocity(x, sigma, cond)
    dx = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    loss, ratio = spo_loss(v, v_ref, dx, torch.tensor([0.5, -0.5]), 0.03)
    assert torch.equal(ratio, torch.ones(2))
    loss.sum().backward()
    with torch.no_grad():
        v_default = _policy(amp_dtype).velocity(x, sigma, cond)
    assert not torch.equal(v_ref, v_default)


def test_the_documented_numeric_change_on_the_tiny_model():
    """docs/algorithm.md, "Differences": the velocity change of each option on the tiny model (64 px, 2 rows) under
    the GPU's arithmetic emulated on the CPU (tests/numerics_options.py)."""
    from tests import numerics_options

    transformer = numerics_options.gpu_like_(numerics_options.tiny_transformer().requires_grad_(False).eval())
    changes = numerics_options.relative_changes(transformer, numerics_options.random_inputs(transformer, 2, 8))
    assert changes["fused_rms_norm"] == 0  # no bf16 output of a norm moved in this forward
    assert 6e-4 < changes["compute_dtype_modulation"] < 9e-4 and changes["both"] == changes["compute_dtype_modulation"]
    assert 7e-4 < changes["fp16_default_vs_fp32"] < 9e-4  # the default's own rounding, for scale
    with numerics_options.options(transformer, True, True):  # the fused norm's 0 is measured, not skipped
        kinds = [type(m) for m in transformer.modules()]
    assert kinds.count(numerics_options.FusedBf16RMSNorm) == 10 and kinds.count(fused.ComputeDtypeLayerNorm) == 8


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("x_dtype,w_dtype", DTYPES)
def test_triton_rms_norm_matches_the_reference(x_dtype, w_dtype):
    """The Triton kernels against the pure-torch reference on the q-like layout: the forward within one rounding step
    of the output dtype (the sums' order differs), the input gradient within a few steps of the input dtype."""
    from fdfo import fused_triton

    assert fused_triton.available()
    norm = _norm(w_dtype).cuda()
    x_ref, x_tri = (_q_like(x_dtype, requires_grad=True).cuda().detach().requires_grad_(True) for _ in range(2))
    ref = fused._ReferenceRMSNorm.apply(x_ref, norm.weight, norm.eps)
    out = fused.rms_norm(x_tri, norm.weight, norm.eps)
    assert out.dtype == ref.dtype and out.shape == ref.shape and out.stride() == x_tri.stride()
    assert ((out.float() - ref.float()).abs() <= 4 * torch.finfo(out.dtype).eps * ref.float().abs()).all()
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out.dtype).cuda()
    ref.backward(grad)
    out.backward(grad)
    scale = 4 * torch.finfo(x_dtype).eps * x_ref.grad.float().abs().max()
    assert (x_tri.grad.float() - x_ref.grad.float()).abs().max() <= scale

"""The activation-memory estimate printed at the start of a run (fdfo/memory.py): meta-device counts against real
CPU runs of the tiny transformer and against hand-counted bytes."""

import contextlib

import pytest
import torch

from fdfo.memory import AutocastEmulation, SavedTensorCount, count_saved
from fdfo.models import tiny_sd3 as tiny
from fdfo.models.sd3 import activation_bytes as sd3_activation_bytes
from fdfo.models.sd3 import add_lora
from fdfo.models.sd3_speed import LeverRuntime, SpeedLevers

TEXT = 205
SIDE = 8


def real_saved_bytes(batch: int, autocast: torch.dtype | None = None, dtype: torch.dtype = torch.float32,
                     levers: SpeedLevers | None = None) -> int:
    """Bytes of the distinct non-parameter storages autograd saves in a real CPU forward of the tiny LoRA
    transformer (base weights in `dtype`, the policy's speed levers): what the estimate predicts, measured with real
    tensors and real kernels (CPU SDPA takes its flash path, which keeps q, k, v, out and the log-sum-exp)."""
    from diffusers import SD3Transformer2DModel

    cfg = dict(tiny.TRANSFORMER_CONFIG)
    torch.manual_seed(0)
    model = add_lora(SD3Transformer2DModel(**cfg).to(dtype).requires_grad_(False), 4, 8)
    LeverRuntime(model, autocast, levers or SpeedLevers())
    params = {p.data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    inputs = dict(hidden_states=torch.randn(batch, cfg["in_channels"], SIDE, SIDE, dtype=dtype),
                  timestep=torch.ones(batch),
                  encoder_hidden_states=torch.randn(batch, TEXT, cfg["joint_attention_dim"], dtype=dtype),
                  pooled_projections=torch.randn(batch, cfg["pooled_projection_dim"], dtype=dtype))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext():
            model(**inputs, return_dict=False)[0].float()
    return sum(saved.values())


def estimate(batch: int, **kwargs) -> int:
    options = dict(model_dtype=torch.float32, amp_dtype=None, lora_rank=4) | kwargs
    return sd3_activation_bytes(dict(tiny.TRANSFORMER_CONFIG), batch=batch, latent_side=SIDE, text_tokens=TEXT,
                                **options)


def test_estimate_equals_a_real_cpu_forward():
    assert estimate(2) == real_saved_bytes(2)
    assert estimate(3, guidance=True) == real_saved_bytes(6)  # CFG: unconditional and conditional rows


def test_autocast_emulation_follows_real_autocast():
    """With CPU autocast's op lists (for the ops this model reaches, the lower-precision list only) the emulation
    lands on a real CPU autocast run; the one difference is the RMSNorm statistic, float32 in the meta kernel and
    bf16 in the CPU one (3.8 kB of 1.08 MB)."""
    real = real_saved_bytes(2, torch.bfloat16)
    emulated = estimate(2, amp_dtype=torch.bfloat16, float32_ops=frozenset())
    assert emulated == pytest.approx(real, rel=0.005)
    assert abs(estimate(2) - real) > 0.1 * real  # no autocast: 20 % off, so the comparison can tell


def test_autocast_keeps_the_cast_copies_backward_needs():
    """Linear(8 -> 4) on x [3, 8] bf16 under fp16 autocast. Frozen weight: the fp16 copy of the weight is kept for the
    input gradient (4 * 8 * 2 bytes; a frozen weight is re-cast on every call), the copy of x is not (only a weight
    gradient needs it). Trainable fp32 weight (a LoRA factor): both copies are kept (+ 3 * 8 * 2). Without autocast
    nothing: the weight is a parameter, and x is kept only when the weight trains."""
    with torch.device("meta"):
        x = torch.empty(3, 8, dtype=torch.bfloat16, requires_grad=True)
        frozen = torch.nn.Linear(8, 4, bias=False, dtype=torch.bfloat16).requires_grad_(False)
        trained = torch.nn.Linear(8, 4, bias=False, dtype=torch.float32)
        cases = ((frozen, torch.float16, 64), (trained, torch.float16, 64 + 48), (frozen, None, 0))
        for layer, dtype, expected in cases:
            def run():
                with AutocastEmulation(dtype):
                    layer(x)
            assert count_saved(layer, [], run).outside == expected


def test_the_speed_levers_drop_the_cast_weight_copies_and_share_the_projection_inputs():
    """With the base stored in the autocast dtype autograd keeps no cast copy of a frozen weight, and q, k, v's LoRA
    A keep one copy of their shared input instead of three. On a real CPU autocast run (bf16 over an fp32 base: CPU
    autocast cannot run fp16 over a bf16 base) the estimate's saving equals the measured one byte for byte, and the
    weight lever alone drops a 2-byte copy of each frozen weight whose layer's input needs a gradient."""
    none, bf16 = SpeedLevers.parse("none"), torch.bfloat16
    real = real_saved_bytes(2, bf16, levers=none) - real_saved_bytes(2, bf16)
    options = dict(amp_dtype=bf16, float32_ops=frozenset())
    assert estimate(2, levers=none, **options) - estimate(2, **options) == real > 0
    weights_only = estimate(2, levers=SpeedLevers.parse("base-dtype"), **options)
    frozen = sum(2 * m.weight.numel() for m in _frozen_layers_whose_input_needs_a_gradient())
    assert estimate(2, levers=none, **options) - weights_only == frozen > 0


def _frozen_layers_whose_input_needs_a_gradient():
    """The frozen Linear / Conv2d layers whose input requires grad in a training forward (autograd keeps their weight
    for the input's gradient), seen on a real fp32 forward."""
    from diffusers import SD3Transformer2DModel

    model = add_lora(SD3Transformer2DModel(**tiny.TRANSFORMER_CONFIG).requires_grad_(False), 4, 8)
    seen = []
    lora_parts = {id(m) for n, m in model.named_modules() if ".lora_" in n}
    frozen = [m for m in model.modules()
              if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and id(m) not in lora_parts]
    handles = [m.register_forward_pre_hook(lambda mod, args: seen.append(mod) if args[0].requires_grad else None)
               for m in frozen]
    cfg = tiny.TRANSFORMER_CONFIG
    model(hidden_states=torch.randn(1, cfg["in_channels"], SIDE, SIDE), timestep=torch.ones(1),
          encoder_hidden_states=torch.randn(1, TEXT, cfg["joint_attention_dim"]),
          pooled_projections=torch.randn(1, cfg["pooled_projection_dim"]))
    for handle in handles:
        handle.remove()
    return seen


def test_fused_attention_keeps_qkv_output_and_logsumexp():
    """q, k, v and the output, `[2, 3, 5, 4]` fp16 (240 bytes each), and a float32 log-sum-exp `[2, 3, 5]`
    (120 bytes); not the 5 x 5 attention matrix."""
    with torch.device("meta"):
        q, k, v = (torch.empty(2, 3, 5, 4, dtype=torch.float16, requires_grad=True) for _ in range(3))
        module = torch.nn.Module()

        def run():
            with AutocastEmulation(None):
                torch.nn.functional.scaled_dot_product_attention(q, k, v)
        assert count_saved(module, [], run).outside == 4 * (2 * 3 * 5 * 4 * 2) + 2 * 3 * 5 * 4


def test_checkpointing_keeps_block_inputs_and_one_block():
    count = SavedTensorCount(outside=10, per_block=[3, 7, 5], block_inputs=4)
    assert count.total(checkpointing=False) == 25
    assert count.total(checkpointing=True) == 10 + 4 + 7
    plain, checkpointed = estimate(2), estimate(2, checkpointing=True)
    assert checkpointed < plain


def test_emulated_autocast_dtypes_follow_the_cuda_op_reference():
    """torch's CUDA autocast reference: linear / matmul / attention run in the autocast dtype, layer_norm and
    softmax in float32, other ops (here an add) in the widest input type."""
    with torch.device("meta"):
        x = torch.empty(2, 8, dtype=torch.bfloat16)
        w = torch.empty(4, 8, dtype=torch.bfloat16)
        with AutocastEmulation(torch.float16):
            assert torch.nn.functional.linear(x, w).dtype == torch.float16
            assert (x @ w.T).dtype == torch.float16
            assert torch.nn.functional.layer_norm(x, (8,)).dtype == torch.float32
            assert torch.softmax(x, -1).dtype == torch.float32
            assert (x + x.float()).dtype == torch.float32

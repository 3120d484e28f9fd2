"""The calls the per-call probe measures (fdfo/bench/probe.py): its variants of the policy, their inputs, the
sampling forward and the training micro-batch, and how a call is timed, counted and compared.

Every variant is a policy built from one random-init transformer (deep-copied, so that each variant can store its
weights and swap its modules as its options say) with the same LoRA weights (A as PEFT draws it from a fixed seed, B
random, so that every LoRA weight gets a gradient), through `SD3Policy.from_components` and the bench's
`speed_options` as train.py builds its policy. On a CPU the autocast is CUDA's op lists emulated on real tensors
(fdfo/memory.py, as tests/test_sd3_speed.py runs them), so that the CPU rehearsal runs the GPU's dtypes.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import statistics
import time

import torch

from fdfo.bench.models import TEXT_TOKENS, build_models, model_configs
from fdfo.outputs import write_text

SAMPLE_ROWS = 12  # a sampling batch of the paper's: 6 pairs, 2 rows each (as the census, fdfo/bench/census.py)
TRAIN_ITEMS = 6  # a training micro-batch of the paper's
STEPS = 40  # the noise levels the training set indexes (T = 40)
AMP = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}  # fp32: no autocast, an fp32 base
# an option that moves rounding must move the sampling velocity by less than fp16's own rounding does against fp32
# (1.85e-3 relative RMS on SD3.5-M's shapes, docs/algorithm.md "Differences"; measured there: 5.1e-4 and 7.3e-4)
VELOCITY_TOLERANCE = 1.85e-3


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way of running the policy. check: "bits" (the same bits as the default: a bit-identical change),
    "velocity" (a change that moves rounding: within VELOCITY_TOLERANCE), "report" (another precision: reported)."""

    name: str
    precision: str = "fp16"
    levers: str = "all"
    cuda_graphs: bool = False
    fused_rms_norm: bool = False
    compute_dtype_modulation: bool = False
    check: str = "bits"

    def census_flags(self) -> list[str]:
        """The `python -m fdfo.bench --census` flags that count this variant (CUDA graphs replay the same kernels)."""
        flags = ["--precision", self.precision, "--levers", self.levers]
        return flags + [f"--{name.replace('_', '-')}" for name in ("fused_rms_norm", "compute_dtype_modulation")
                        if getattr(self, name)]


VARIANTS = {v.name: v for v in (
    Variant("default"),
    Variant("levers-none", levers="none"),
    Variant("cuda-graphs", cuda_graphs=True),
    Variant("fused-rms-norm", fused_rms_norm=True, check="velocity"),
    Variant("compute-dtype-modulation", compute_dtype_modulation=True, check="velocity"),
    Variant("bf16", precision="bf16", check="report"),
)}


@dataclasses.dataclass
class Base:
    """The models every variant is copied from: the transformer at random init in bf16 (seed 0), the VAE, the
    scheduler, on the probe's device."""

    transformer: torch.nn.Module
    vae: torch.nn.Module
    scheduler: object
    device: torch.device
    tiny: bool


def build_base(tiny: bool, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> Base:
    torch.manual_seed(0)
    transformer, vae, scheduler = build_models(tiny, device)
    transformer.requires_grad_(False).to(dtype)
    return Base(transformer, vae, scheduler, device, tiny)


def build_policy(base: Base, variant: Variant):
    """The variant's policy, as train.py builds its own (module docstring)."""
    from fdfo.bench.epoch import speed_options
    from fdfo.models.sd3 import SD3Policy
    from fdfo.models.sd3_speed import SpeedLevers

    rank, alpha = (8, 16.0) if base.tiny else (32, 64.0)  # the bench's (fdfo/bench/epoch.py bench_config)
    amp = AMP[variant.precision]
    torch.manual_seed(1)  # PEFT's draw of the LoRA A weights: the same for every variant
    dtype = next(base.transformer.parameters()).dtype
    policy = SD3Policy.from_components(copy.deepcopy(base.transformer), base.vae, base.scheduler, base.device, rank,
                                       alpha, 1.0, amp, dtype=dtype, levers=SpeedLevers.parse(variant.levers))
    with torch.no_grad():
        for i, p in enumerate(p for n, p in policy.transformer.named_parameters() if "lora_B" in n):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.05)
    cfg = probe_config(variant)
    speed_options(policy, cfg)
    if base.device.type == "cpu" and amp is not None:
        policy.autocast = lambda: emulated_cuda_autocast(amp)
    return policy


@contextlib.contextmanager
def emulated_cuda_autocast(amp: torch.dtype):
    """CUDA autocast's op lists on real CPU tensors, attention on the CPU's own kernel (fdfo/memory.py), and the
    compute-dtype LayerNorm as under CUDA autocast (fdfo/bench/dispatch.py)."""
    from fdfo.bench.dispatch import emulated_layer_norm
    from fdfo.memory import AutocastEmulation

    with AutocastEmulation(amp, attention=torch.nn.functional.scaled_dot_product_attention), emulated_layer_norm(amp):
        yield


def probe_config(variant: Variant):
    """train.py's default config with the variant's options."""
    from fdfo.config import Config

    cfg = Config()
    for name in ("cuda_graphs", "fused_rms_norm", "compute_dtype_modulation"):
        setattr(cfg.train, name, getattr(variant, name))
    return cfg


@dataclasses.dataclass
class Inputs:
    """The same inputs for every variant: sampling rows (x, sigma, cond) and a training set of one micro-batch whose
    reference velocities are the default policy's own (theta = theta_old: ratios near 1, so no item is clipped)."""

    x: torch.Tensor  # [rows, C, h, w] float32
    sigma: torch.Tensor
    cond: dict
    train: dict  # the TrainingSet's fields but the states (stored per variant in its input dtype)


def make_inputs(base: Base, default_policy) -> Inputs:
    from fdfo.bench.census import RESOLUTION

    g = torch.Generator().manual_seed(2)
    tcfg, _ = model_configs(base.tiny)
    latent = default_policy.latent_shape(RESOLUTION[base.tiny])
    rows = SAMPLE_ROWS

    def cond(n):  # text embeddings in the base's dtype, as the text encoders give them
        dtype = default_policy.dtype
        return {"embeds": torch.randn(n, TEXT_TOKENS, tcfg["joint_attention_dim"], generator=g).to(dtype),
                "pooled": torch.randn(n, tcfg["pooled_projection_dim"], generator=g).to(dtype)}

    device = base.device
    x, sigma = torch.randn(rows, *latent, generator=g), 0.05 + 0.95 * torch.rand(rows, generator=g)
    sample_cond = cond(rows)
    n = TRAIN_ITEMS
    sigmas = torch.linspace(1, 0, STEPS + 1)
    timestep = torch.randint(0, STEPS, (n,), generator=g)
    states = torch.randn(n, *latent, generator=g)
    train = dict(items=torch.arange(n), sigmas=sigmas.to(device), timestep=timestep.to(device),
                 sample=torch.arange(n, device=device), prompt=torch.arange(n, device=device),
                 dx=(0.1 * torch.randn(n, *latent, generator=g)).to(device),
                 dR=torch.randn(n, generator=g).to(device), cond={k: v.to(device) for k, v in cond(n).items()},
                 steps=[torch.arange(n, device=device)], invalid_pairs=0, states=states)
    with torch.no_grad():
        default_policy.transformer.eval()
        ref = default_policy.velocity(states.to(device, default_policy.input_dtype), sigmas.to(device)[
            timestep.to(device)], train["cond"])
    half = ref.to(default_policy.input_dtype)
    train["velocities"] = half if torch.equal(half.float(), ref) else ref  # 16 bits when lossless, as rollouts are
    return Inputs(x.to(device), sigma.to(device), {k: v.to(device) for k, v in sample_cond.items()}, train)


def training_set(inputs: Inputs, policy):
    """The training set in the policy's dtypes (states in its input dtype, as the rollouts store them)."""
    from fdfo.phases import TrainingSet

    fields = dict(inputs.train)
    fields["states"] = fields["states"].to(policy.device, policy.input_dtype)
    fields["ratio_dev"] = torch.full((TRAIN_ITEMS,), float("nan"), device=policy.device)
    return TrainingSet(**fields)


class Calls:
    """The two calls of one variant's policy, each a function of no arguments, and `reset` (the LoRA gradients
    zeroed in place: a captured backward adds into the same tensors, fdfo/cuda_graphs.py)."""

    def __init__(self, policy, variant: Variant, inputs: Inputs):
        from fdfo.cuda_graphs import GraphedMicroBatch
        from fdfo.phases import _micro_batch

        self.policy, self.variant = policy, variant
        self.x = inputs.x.to(policy.input_dtype)
        self.sigma, self.cond = inputs.sigma, inputs.cond
        self.data = training_set(inputs, policy)
        self.cfg = probe_config(variant)
        self.scaler = torch.amp.GradScaler(policy.device.type, enabled=policy.amp_dtype == torch.float16)
        self.micro = (GraphedMicroBatch(_micro_batch, capture=policy.device.type == "cuda") if variant.cuda_graphs
                      else _micro_batch)
        self.params = policy.trainable_parameters()

    def sample_forward(self) -> torch.Tensor:
        self.policy.transformer.eval()
        with torch.no_grad():
            return self.policy.velocity(self.x, self.sigma, self.cond)

    def train_micro_batch(self) -> torch.Tensor:
        self.policy.transformer.train()
        ids = self.data.steps[0]
        return self.micro(self.policy, self.policy.transformer, self.scaler, self.data, ids, self.cfg, len(ids))

    def reset(self) -> None:
        for p in self.params:
            if p.grad is not None:
                p.grad.zero_()

    def outputs(self, call: str):
        """What a call computes: the sampling velocity, or the micro-batch's sums and every LoRA gradient (from zero;
        unscaled, in float64, so that fp16's scaled gradients compare with bf16's)."""
        if call == "sample_forward":
            return [self.sample_forward()]
        self.reset()
        sums = self.train_micro_batch()
        scale = float(self.scaler.get_scale()) if self.scaler.is_enabled() else 1.0  # a power of two: exact
        return [sums] + [p.grad.detach().double() / scale for p in self.params]

    @property
    def graph_calls(self) -> list[str] | None:
        return getattr(self.micro, "calls", None)


class ProgressRecord:
    """A probe's JSON `data`, rewritten (atomically, fdfo/outputs.py) into `path` after every step (None: not written),
    each step appended to `data[key]` with its seconds since the start, rounded to `digits`, and printed."""

    def __init__(self, path, data: dict, key: str, digits: int):
        self.path, self.data, self.key, self.digits, self.start = path, data, key, digits, time.perf_counter()

    def step(self, what: str) -> None:
        self.data.setdefault(self.key, []).append(dict(step=what, s=round(time.perf_counter() - self.start,
                                                                          self.digits)))
        if self.path:
            write_text(self.path, json.dumps(self.data, indent=1, default=str) + "\n")
        print(f"[{time.perf_counter() - self.start:7.1f} s] {what}", flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_ms(fn, device: torch.device) -> float:
    """One call's milliseconds: CUDA events around it on a GPU (the device idle before: each call is timed alone),
    the wall clock on a CPU."""
    synchronize(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def interleaved(calls: list, resets: list, warmup: int, repeats: int, device: torch.device) -> list[list[float]]:
    """Each call timed in turn, A B A B ..., `warmup` rounds dropped, `repeats` kept: drift over the rounds reaches
    every call alike."""
    times: list[list[float]] = [[] for _ in calls]
    for round_ in range(warmup + repeats):
        for j, (call, reset) in enumerate(zip(calls, resets, strict=True)):
            reset()
            ms = timed_ms(call, device)
            if round_ >= warmup:
                times[j].append(ms)
    return times


def timing_summary(ms: list[float]) -> dict:
    ordered = sorted(ms)
    return dict(median_ms=statistics.median(ordered), min_ms=ordered[0], max_ms=ordered[-1], runs=len(ordered),
                all_ms=[round(t, 4) for t in ms])


def compare(a: list[torch.Tensor], b: list[torch.Tensor]) -> dict:
    """`b` against `a`, tensor by tensor: whether every bit is the same (NaNs included), the largest relative RMS of a
    difference (over the entries finite in both) and the non-finite entries of each."""
    same = all(x.shape == y.shape and x.dtype == y.dtype and torch.equal(_bits(x), _bits(y)) for x, y in zip(a, b))
    worst, nonfinite = 0.0, [0, 0]
    for x, y in zip(a, b, strict=True):
        x, y = x.double(), y.double()
        finite = torch.isfinite(x) & torch.isfinite(y)
        nonfinite[0] += int((~torch.isfinite(x)).sum())
        nonfinite[1] += int((~torch.isfinite(y)).sum())
        if finite.any():
            ref = x[finite].square().mean().sqrt()
            diff = (y[finite] - x[finite]).square().mean().sqrt()
            worst = max(worst, float(diff / ref) if ref > 0 else (0.0 if diff == 0 else math.inf))
    return dict(bit_identical=same, tensors=len(a), max_rel_rms=worst, nonfinite=nonfinite)


def _bits(t: torch.Tensor) -> torch.Tensor:
    view = {2: torch.int16, 4: torch.int32, 8: torch.int64}.get(t.element_size())
    return t.contiguous().view(view) if t.is_floating_point() and view is not None else t


def dispatched(fn, fresh_gradients: list | None = None) -> dict:
    """The aten ops one call dispatches below autocast, counted as the census counts them (fdfo/bench/dispatch.py):
    kernel ops, casts, all aten ops. fresh_gradients: parameters whose gradients are dropped first, as the census's
    micro-batch is the first of an optimizer step (fdfo/bench/census.py)."""
    from fdfo.bench.dispatch import OpCounter, summary

    for p in fresh_gradients or ():
        p.grad = None
    with OpCounter() as counter:
        fn()
    s = summary(counter.ops)
    return {k: s[k] for k in ("kernel_ops", "casts", "aten_ops")}


def launches(fn, device: torch.device) -> dict | None:
    """The kernels one call launches on a GPU, from torch.profiler (CUDA activity); None on a CPU."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        synchronize(device)
    events = [e for e in prof.events() if str(getattr(e, "device_type", "")).endswith("CUDA")]
    copies = sum(e.name.startswith(("Memcpy", "Memset")) for e in events)
    return dict(kernels=len(events) - copies, memcpy_memset=copies)

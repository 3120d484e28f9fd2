"""`python -m fdfo.bench --census`: the kernels one sampling forward and one training micro-batch launch on a GPU,
counted on a CPU (docs/performance.md "Kernel census").

The policy is built as train.py builds it (SD3Policy with its LoRA, speed_options with train.py's defaults) from
SD3.5-Medium's transformer at its real shapes, on the meta device, then given fake tensors (no weights, no memory):
bf16 base weights as on a GPU, fp32 LoRA. Two calls are counted, op by op below autocast (fdfo/bench/dispatch.py):
- the sampling forward: `policy.velocity` under no_grad on 12 rows (a sampling batch of 6 pairs) of rollout states
  as the bench's profile feeds it, the second call of its sampling phase (the first also casts the LoRA weights
  that the `lora_cache` lever keeps while sampling), on fake cuda:0 tensors under CUDA autocast's own kernels;
  and again on CPU fake tensors under the emulated op lists, which must give the same ops, dtypes and shapes
  (`emulation_check`);
- the training micro-batch: fdfo.phases._micro_batch on 6 items (forward, SPO loss, scaled backward, the
  micro-batch's statistics) under the emulated op lists, since autograd refuses a backward on fake CUDA tensors.
`kernel_ops` counts the ops that launch a kernel (not views); `casts` the dtype conversions among them; `gbytes`
the bytes they read and write. With --tiny the same at the tiny model's shapes (what the tests use).
"""

from __future__ import annotations

import contextlib

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fdfo.bench.dispatch import (
    KINDS,
    CudaOnCpuBuild,
    OpCounter,
    cuda_autocast,
    emulated_autocast,
    multiset,
    numerics_options_counted,
    summary,
    to_fake,
)
from fdfo.bench.models import TEXT_TOKENS, build_models, model_configs
from fdfo.models.sd3_speed import SpeedLevers
from fdfo.models.shapes import MODELS

SAMPLE_ROWS = 12  # one sampling batch of the paper's micro-batches: 6 pairs, 2 rows each
TRAIN_ITEMS = 6  # one training micro-batch of the paper
RESOLUTION = {False: 512, True: 64}  # SD3.5-M / -L at the paper's 512 px; the tiny model at its 64 px
AMP = {"fp16": torch.float16, "bf16": torch.bfloat16}


def build_policy(tiny: bool, precision: str, device: torch.device, fake: FakeTensorMode, levers: SpeedLevers,
                 options: dict | None = None, model: str = "sd35m"):
    """The policy as train.py builds it (fdfo/train_loop.py: SD3Policy, add_lora with the run's rank and alpha, the
    speed levers, speed_options with the config's defaults and `options`: fused_rms_norm, compute_dtype_modulation),
    from the bench's models of the real shapes, built on the meta device and then given fake tensors on `device`:
    bf16 base weights (as on a GPU), the run's autocast dtype."""
    from fdfo.bench.epoch import speed_options
    from fdfo.config import Config
    from fdfo.models.sd3 import SD3Policy

    cfg = Config()
    for name, on in (options or {}).items():
        setattr(cfg.train, name, on)
    rank, alpha = (8, 16.0) if tiny else (cfg.lora_rank, cfg.lora_alpha)  # the bench's ranks (fdfo/bench/epoch.py)
    meta = torch.device("meta")
    transformer, vae, scheduler = build_models(tiny, meta, model)
    policy = SD3Policy.from_components(transformer, vae, scheduler, meta, rank, alpha, cfg.sample.guidance_scale,
                                       AMP[precision], dtype=torch.bfloat16, levers=levers)
    speed_options(policy, cfg)
    to_fake(policy.transformer, fake, device)
    policy.device = device
    return policy


def _inputs(policy, tiny: bool, rows: int, model: str = "sd35m") -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Rollout states `[rows, C, h, w]` in the network's input dtype (as the rollouts store them and the bench's
    profile feeds them), float32 noise levels, text embeddings in the base dtype; fake, on the policy's device."""
    tcfg, _ = model_configs(tiny, model)
    latent = policy.latent_shape(RESOLUTION[tiny])
    device, dtype = policy.device, policy.dtype
    cond = {"embeds": torch.empty(rows, TEXT_TOKENS, tcfg["joint_attention_dim"], device=device, dtype=dtype),
            "pooled": torch.empty(rows, tcfg["pooled_projection_dim"], device=device, dtype=dtype)}
    return torch.empty(rows, *latent, device=device, dtype=policy.input_dtype), torch.empty(rows, device=device), cond


def sample_forward(tiny: bool, precision: str, exact: bool, levers: SpeedLevers | None = None,
                   options: dict | None = None, model: str = "sd35m") -> list:
    """The ops of one sampling forward after the first of its sampling phase (which also makes the LoRA weight casts
    kept while sampling, fdfo/models/sd3_speed.py); exact: fake cuda:0 tensors under CUDA autocast's kernels, else CPU
    fake tensors under the emulated op lists."""
    fake = FakeTensorMode()
    device = torch.device("cuda:0" if exact else "cpu")
    policy = build_policy(tiny, precision, device, fake, levers or SpeedLevers(), options, model)
    autocast = cuda_autocast if exact else emulated_autocast
    policy.autocast = lambda: autocast(policy.amp_dtype)  # torch.autocast("cuda") turns itself off without a GPU
    policy.transformer.eval()
    with fake, numerics_options_counted(policy.amp_dtype, emulated=not exact):
        x, sigma, cond = _inputs(policy, tiny, SAMPLE_ROWS, model)
        with torch.no_grad(), CudaOnCpuBuild() if exact else contextlib.nullcontext():
            policy.velocity(x, sigma, cond)
            with OpCounter() as counter:
                policy.velocity(x, sigma, cond)
    return counter.ops


def _training_set(policy, tiny: bool, items: int, model: str = "sd35m"):
    """A fake TrainingSet of `items` rows (one micro-batch), its tensors in the dtypes train.py gives them."""
    from fdfo.phases import TrainingSet

    x, _, cond = _inputs(policy, tiny, items, model)
    steps = 40
    index = torch.zeros(items, dtype=torch.long)
    return TrainingSet(items=torch.arange(items), states=x, velocities=torch.empty_like(x),
                       sigmas=torch.empty(steps + 1), timestep=index, sample=index, prompt=index,
                       dx=torch.empty(items, *x.shape[1:]), dR=torch.empty(items), cond=cond,
                       steps=[torch.arange(items)], invalid_pairs=0, ratio_dev=torch.empty(items))


def train_micro_batch(tiny: bool, precision: str, levers: SpeedLevers | None = None,
                      options: dict | None = None, model: str = "sd35m") -> list:
    """The ops of one training micro-batch (fdfo.phases._micro_batch) on CPU fake tensors under the emulated op
    lists, with train.py's grad scaler and training set (its `ratio_dev` statistics too): the first micro-batch of an
    optimizer step, whose LoRA gradients are new (`zero_grad(set_to_none=True)`; a later one adds into them, one more
    op per LoRA weight)."""
    from fdfo.config import Config
    from fdfo.phases import _micro_batch

    fake = FakeTensorMode()
    policy = build_policy(tiny, precision, torch.device("cpu"), fake, levers or SpeedLevers(), options, model)
    policy.autocast = lambda: emulated_autocast(policy.amp_dtype)
    policy.transformer.train()
    with fake, numerics_options_counted(policy.amp_dtype, emulated=True):
        data = _training_set(policy, tiny, TRAIN_ITEMS, model)
        scaler = torch.amp.GradScaler("cpu", enabled=policy.amp_dtype == torch.float16)
        scaler.scale(torch.ones(()))  # the scale and its growth tracker, made once per run, not per micro-batch
        with OpCounter() as counter:
            _micro_batch(policy, policy.transformer, scaler, data, data.steps[0], Config(), TRAIN_ITEMS)
    return counter.ops


def _phases(ops: list) -> dict:
    """forward (with the loss and its scaling), backward, and the statistics after it."""
    first = next((i for i, op in enumerate(ops) if op.backward), len(ops))
    last = max((i for i, op in enumerate(ops) if op.backward), default=first - 1)
    return {"forward": summary(ops[:first]), "backward": summary(ops[first:last + 1]),
            "statistics": summary(ops[last + 1:])}


def emulation_check(exact: list, emulated: list) -> dict:
    """Whether the emulated op lists give the sampling forward the exact run's ops (name, dtypes and shapes in and
    out): as a multiset, and in the same order."""
    a, b = multiset(exact), multiset(emulated)
    differences = [dict(op=key[0], exact=a.get(key, 0), emulated=b.get(key, 0))
                   for key in sorted(set(a) | set(b), key=str) if a.get(key, 0) != b.get(key, 0)]
    same_order = [(op.name, op.inputs, op.outputs) for op in exact] == [(op.name, op.inputs, op.outputs)
                                                                        for op in emulated]
    return {"same_multiset": not differences, "same_sequence": same_order, "exact_aten_ops": len(exact),
            "emulated_aten_ops": len(emulated), "differences": differences[:20]}


def census(precision: str = "fp16", tiny: bool = False, levers: SpeedLevers | None = None,
           options: dict | None = None, model: str = "sd35m") -> dict:
    """The census record (module docstring) of `model`'s shapes (an SD3 model of fdfo/models/shapes.py MODELS), with
    the cost model's H200 prediction for SD3.5-Medium (fdfo/bench/cost.py; not for --tiny nor another --model: it is
    calibrated on SD3.5-M's H200 run). options: fused_rms_norm, compute_dtype_modulation (the numerics options of
    SD3Policy.speed_options, counted as a GPU runs them: fdfo/bench/dispatch.py)."""
    from fdfo.bench.cost import cost_record

    levers = levers or SpeedLevers()
    options = {k: v for k, v in (options or {}).items() if v}
    exact = sample_forward(tiny, precision, True, levers, options, model)
    emulated = sample_forward(tiny, precision, False, levers, options, model)
    training = train_micro_batch(tiny, precision, levers, options, model)
    tcfg, _ = model_configs(tiny, model)
    shape = dict(model="tiny" if tiny else MODELS[model][1], resolution=RESOLUTION[tiny], text_tokens=TEXT_TOKENS,
                 blocks=tcfg["num_layers"], sample_rows=SAMPLE_ROWS, train_items=TRAIN_ITEMS)
    record = {"precision": precision, "levers": levers.names(), "options": sorted(options), "shape": shape,
              "sample_forward": summary(exact),
              "train_micro_batch": summary(training) | _phases(training),
              "emulation_check": emulation_check(exact, emulated)}
    if not tiny and model == "sd35m":  # calibrated on the census of the profiled code: fp16, no levers
        profiled = SpeedLevers.parse("none")
        calibration = (exact, training) if (precision, levers, options) == ("fp16", profiled, {}) else (
            sample_forward(False, "fp16", True, profiled), train_micro_batch(False, "fp16", profiled))
        record["cost_model"] = cost_record(exact, training, calibration)
    return record


def census_lines(record: dict) -> list[str]:
    """The census as a table: kernel ops, casts, aten ops and GB per call, then kernels per class."""
    s, t = record["sample_forward"], record["train_micro_batch"]
    rows = [("sampling forward", s), ("training micro-batch", t), ("  forward + loss", t["forward"]),
            ("  backward", t["backward"]), ("  statistics", t["statistics"])]
    shape = record["shape"]
    levers = ", ".join(record["levers"]) or "none"
    options = "".join(f", {name.replace('_', '-')}" for name in record.get("options", []))
    lines = [f"kernel census, {record['precision']}, {shape['model']} at {shape['resolution']} px "
             f"({shape['sample_rows']} sampling rows, micro-batch of {shape['train_items']}), "
             f"levers: {levers}{options}",
             f"{'':22}{'kernels':>9}{'casts':>8}{'aten ops':>10}{'GB':>9}"]
    lines += [f"{name:22}{c['kernel_ops']:>9,}{c['casts']:>8,}{c['aten_ops']:>10,}{c['gbytes']:>9.2f}"
              for name, c in rows]
    lines.append(f"{'kernels by class':22}" + "".join(f"{k[:11]:>12}" for k in ("sampling", "training")))
    for kind in KINDS:
        counts = [c["by_kind"].get(kind, {}).get("ops", 0) for c in (s, t)]
        if any(counts):
            lines.append(f"  {kind:20}" + "".join(f"{n:>12,}" for n in counts))
    check = record["emulation_check"]
    lines.append(f"emulated op lists give the exact sampling forward: {check['same_multiset']} "
                 f"({check['exact_aten_ops']:,} aten ops)")
    if "cost_model" in record:
        from fdfo.bench.cost import cost_lines

        lines += cost_lines(record["cost_model"])
    return lines

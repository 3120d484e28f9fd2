"""Images from the base model plus an optional LoRA checkpoint: the engine of generate.py and metrics.py.

    sampler = load_generator("https://huggingface.co/nvidia/finite-difference-flow-optimization/tree/main/"
                             "fdfo-combined-reward-cfg-4.5/epoch-0000100")  # guidance 4.5, from the folder name
    images = sampler.generate(["a red bicycle", "a cat"], seeds=[0, 1])   # [2, 3, 512, 512] in [0, 1], CPU, bf16
    other = load_generator(None, base=sampler.base)                       # the base model, same pipeline in memory

An image is what the model's diffusers pipeline returns with its defaults for that prompt and seed (docs/algorithm.md
§8): `StableDiffusion3Pipeline.__call__` for SD3 / SD3.5 (T5 `max_sequence_length` 256, the pipeline's default;
training uses 128; CFG against the empty negative prompt when the scale is above 1), `FluxPipeline.__call__` for FLUX
(T5 512 tokens as in training; the guidance scale is the distilled guidance fed to the network, no CFG). The pipeline
itself is called, with one CPU generator `torch.Generator().manual_seed(seed % 2**31)` per image,
`num_inference_steps` = num_steps and height = width = resolution. So an image depends on its prompt and seed only,
not on the batch it shares or the number of GPUs (up to the rounding of batched kernels). The model runs in bf16 on
CUDA and fp32 on CPU. A checkpoint of one model family is refused on a base model of another.

The LoRA is applied as an unmerged PEFT adapter: its fp32 A and B matrices sit beside the base weights, which are
never modified. One `BaseModel` (pipeline) serves several samplers: each adapter is injected once under its own
adapter name, and a sampler activates its adapter (or disables them all, for the base model) before sampling.
Adapters come in PEFT or diffusers form (fdfo/adapters.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from fdfo import distributed as dist
from fdfo.adapters import Adapter, read_adapter
from fdfo.hub import Checkpoint, resolve_checkpoint
from fdfo.models.registry import check_family, default_guidance, family, recorded_family
from fdfo.models.sd3 import SD35_MEDIUM
from fdfo.offline import ensure_hub_reachable


def resolve_guidance(checkpoint_scale: float | None, requested: float | None, checkpoint: str = "the checkpoint",
                     default: float = 1.0) -> float:
    """The guidance to sample with: `requested` if given, else the checkpoint's (recorded or inferred), else the
    model's `default` (SD3: 1, no CFG; FLUX.1-dev: its distilled 3.5).

    A checkpoint trained with CFG must be sampled with the same scale (docs/algorithm.md §9): overriding it warns.
    """
    if requested is None:
        return float(default) if checkpoint_scale is None else float(checkpoint_scale)
    if checkpoint_scale is not None and float(requested) != float(checkpoint_scale):
        dist.warn0(f"{checkpoint} was trained with guidance scale {checkpoint_scale:g}; sampling it at {requested:g} "
                   f"as requested gives images it was not optimised for")
    return float(requested)


def check_resolution(resolution: int) -> None:
    """--resolution before anything loads: SD3 and FLUX images are a whole number of 2x2 latent patches, 16 px (the
    loaded model's own factor is checked again in `load_generator`)."""
    if resolution < 16 or resolution % 16:
        raise ValueError(f"--resolution must be a positive multiple of 16, got {resolution}.")


def check_guidance_scale(value: float | None) -> None:
    """--guidance-scale before anything loads: a finite number (NaN would sample without CFG under a "nan" label)."""
    if value is not None and not math.isfinite(value):
        raise ValueError(f"--guidance-scale {value} is invalid: it must be a finite number (1 disables CFG; FLUX: "
                         f"its distilled guidance), or left out for the checkpoint's own.")


def choose_base_model(checkpoints: Iterable[Checkpoint], requested: str | None = None) -> str:
    """The base model to load for `checkpoints`: `requested` if given, else the first base model one of them
    records (our state.json), else SD3.5 Medium. The one place that makes this decision (generate.py, metrics.py)."""
    if requested:
        return requested
    return next((c.pretrained_model for c in checkpoints if c.pretrained_model), SD35_MEDIUM)


EVAL_STEPS, EVAL_RESOLUTION = 40, 512  # the evaluation protocol (docs/algorithm.md §8)


def sampling_defaults(checkpoints: Iterable[Checkpoint], pretrained_model: str, num_steps: int | None = None,
                      resolution: int | None = None) -> tuple[int, int, str]:
    """(num_steps, resolution, why) to sample with: the requested values; for a built-in tiny base model the training
    steps and size a checkpoint records (else the smoke preset's, the tiny model's own); otherwise the evaluation
    protocol's 40 steps at 512 px, whatever the checkpoint was trained with."""
    from fdfo.models.registry import is_tiny

    if num_steps is not None and resolution is not None:
        return num_steps, resolution, "as requested"
    if not is_tiny(pretrained_model):
        default = (EVAL_STEPS, EVAL_RESOLUTION, "the evaluation protocol's")
    else:
        trained = next((c for c in checkpoints if c.num_steps is not None and c.resolution is not None), None)
        if trained is not None:
            default = (trained.num_steps, trained.resolution, "the training run's")
        else:
            from fdfo.config import smoke_config

            smoke = smoke_config().sample
            default = (smoke.num_solver_steps, smoke.resolution, "the tiny model's (the smoke preset's)")
    which = " and ".join(w for w, given in (("steps", num_steps), ("size", resolution)) if given is None)
    return (default[0] if num_steps is None else num_steps, default[1] if resolution is None else resolution,
            f"{which}: {default[2]}")


def shared_settings(checkpoints: list[Checkpoint], pretrained_model: str | None = None, num_steps: int | None = None,
                    resolution: int | None = None) -> tuple[str, int, int, str]:
    """(base model, num_steps, resolution, why) for checkpoints sampled together (a grid's blocks side by side, the
    two sides of metrics.py --compare): `choose_base_model` and `sampling_defaults` over them all, so that every one
    is sampled at the same steps and size (a tiny model's: those of the first checkpoint that records its training)."""
    pretrained = choose_base_model(checkpoints, pretrained_model)
    return (pretrained, *sampling_defaults(checkpoints, pretrained, num_steps, resolution))


def sampling_note(checkpoint: Checkpoint, num_steps: int | None, resolution: int | None) -> str | None:
    """One line when requested steps or size differ from what `checkpoint` records it was trained at, else None."""
    differ = [(given, trained, unit) for given, trained, unit in ((resolution, checkpoint.resolution, "px"),
                                                                   (num_steps, checkpoint.num_steps, "steps"))
              if given is not None and trained is not None and given != trained]
    if not differ:
        return None
    return (f"{checkpoint.description} was trained at {' and '.join(f'{t} {u}' for _, t, u in differ)}; sampling it "
            f"at {' and '.join(f'{g} {u}' for g, _, u in differ)} gives images it was not trained on")


def _lora_layers(transformer: torch.nn.Module):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(name, m) for name, m in transformer.named_modules() if isinstance(m, BaseTunerLayer) and name]


class BaseModel:
    """The base model's diffusers pipeline (StableDiffusion3Pipeline or FluxPipeline, fdfo/models/registry.py), loaded
    once per process, holding every adapter loaded so far as a named PEFT adapter."""

    def __init__(self, pretrained_model: str, device: torch.device, dtype: torch.dtype | None = None):
        """dtype: of the base weights; default bf16 on CUDA (the published protocol), float32 elsewhere (CPU has slow
        bf16 kernels); the LoRA weights stay fp32 either way."""
        from fdfo.models.base import base_dtype
        from fdfo.models.registry import load_pipeline

        self.pretrained_model = pretrained_model
        self.device = device
        self.dtype = dtype or base_dtype(device)
        self.pipe = load_pipeline(pretrained_model, device, self.dtype)
        self.transformer = self.pipe.transformer
        self._names: dict[str, str] = {}  # adapter file -> adapter name in the transformer

    def add(self, adapter: Adapter) -> str:
        """Inject `adapter` under a new adapter name (once per file), checking every tensor against the model first.
        Returns its adapter name."""
        if adapter.file in self._names:
            return self._names[adapter.file]
        import warnings

        from peft import get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict

        name = f"checkpoint_{len(self._names)}"
        transformer, state = self.transformer, adapter.state
        misfit = f"adapter {adapter.checkpoint.description} does not fit the base model {self.pretrained_model}"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "Already found a peft_config attribute": several adapters on purpose
                inject_adapter_in_model(adapter.config, transformer, adapter_name=name)
        except (ValueError, RuntimeError, KeyError, TypeError) as e:  # e.g. target modules the model does not have
            self._remove(name)
            raise ValueError(f"{misfit}: {' '.join(str(e).split())[:400]}") from None
        # Check every tensor before copying, so a misfit is a short message instead of torch's list of mismatches.
        expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(transformer, adapter_name=name).items()}
        wrong = [k for k in state if k in expected and tuple(state[k].shape) != expected[k]]
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        problem = None
        if wrong:
            problem = (f"{len(wrong)} of its {len(state)} tensors have another shape than the model's layers, e.g. "
                       f"{wrong[0]}: {list(state[wrong[0]].shape)} in the adapter, {list(expected[wrong[0]])} in the "
                       f"model (an adapter for another model?)")
        elif missing or unexpected:
            problem = (f"{len(missing)} LoRA tensors missing (e.g. {missing[:1]}), {len(unexpected)} unexpected "
                       f"(e.g. {unexpected[:1]})")
        if problem:
            self._remove(name)
            raise ValueError(f"{misfit}: {problem}")
        # fp32 LoRA weights beside the (bf16 on GPU) base weights, as PEFT keeps them: the layers PEFT injected have
        # the base's dtype, so they become fp32 before the checkpoint's values are copied in (after, the values would
        # already be rounded to bf16)
        for _, layer in _lora_layers(transformer):
            for attr in layer.adapter_layer_names:
                container = getattr(layer, attr)
                if name in container and isinstance(container[name], torch.nn.Module):
                    container[name].to(device=self.device, dtype=torch.float32).requires_grad_(False)
        set_peft_model_state_dict(transformer, state, adapter_name=name)
        self._names[adapter.file] = name
        self.activate(None)
        return name

    def _remove(self, name: str) -> None:
        """Undo a half-done injection of adapter `name`; layers left without any adapter get their base layer back."""
        transformer = self.transformer
        for module_name, layer in _lora_layers(transformer):
            layer.delete_adapter(name)
            if not layer._all_available_adapter_names():
                parent, _, child = module_name.rpartition(".")
                setattr(transformer.get_submodule(parent) if parent else transformer, child, layer.get_base_layer())
        config = getattr(transformer, "peft_config", None)
        if isinstance(config, dict):
            config.pop(name, None)
            if not config:
                del transformer.peft_config

    def activate(self, adapter: Adapter | None) -> None:
        """Make the transformer compute the base model plus `adapter` (None: the base model itself)."""
        name = None if adapter is None else self.add(adapter)
        for _, layer in _lora_layers(self.transformer):
            if name is not None and name in layer._all_available_adapter_names():
                layer.enable_adapters(True)  # makes the layer's active adapters trainable again; set_adapter then
                # selects this one, frozen
                layer.set_adapter(name, inference_mode=True)
            else:
                layer.enable_adapters(False)


# ----------------------------------------------------------------------------------------------------------------------
# Samplers


class ImageSampler:
    """Base model + one checkpoint + sampling settings. `generate(prompts, seeds)` -> `[B, 3, H, W]` in the pipeline's
    dtype."""

    def __init__(self, base: BaseModel, checkpoint: Checkpoint, adapter: Adapter | None, guidance_scale: float,
                 num_steps: int, resolution: int, guidance_source: str = ""):
        self.base, self.checkpoint, self.adapter = base, checkpoint, adapter
        self.guidance_scale, self.num_steps, self.resolution = guidance_scale, num_steps, resolution
        self.guidance_source = guidance_source
        self.sampling_source = "as requested"  # or where the steps and size came from (`sampling_defaults`)
        self.checkpoint_description = checkpoint.description
        self.label = checkpoint.label

    @property
    def device(self) -> torch.device:
        return self.base.device

    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: list[int], batch_size: int | None = None) -> torch.Tensor:
        """Images for `prompts[i]` from `seeds[i]`: `[B, 3, H, W]` in [0, 1] on CPU in the pipeline's output dtype
        (bf16 on CUDA, float32 on CPU; round them with fdfo.images.to_uint8, as the metrics do), each what the model's
        pipeline (`StableDiffusion3Pipeline` or `FluxPipeline`) gives for that prompt with
        `torch.Generator().manual_seed(seeds[i] % 2**31)`. batch_size: images per pipeline call (default: all at once);
        it does not change the images."""
        if len(prompts) != len(seeds):
            raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; pass one seed per image")
        if not prompts:
            return torch.zeros(0, 3, self.resolution, self.resolution)
        self.base.activate(self.adapter)
        step = batch_size or len(prompts)
        images = []
        for i in range(0, len(prompts), step):
            generators = [torch.Generator().manual_seed(int(s) % 2**31) for s in seeds[i:i + step]]
            out = self.base.pipe(prompt=list(prompts[i:i + step]), generator=generators,
                                 num_inference_steps=self.num_steps, guidance_scale=self.guidance_scale,
                                 height=self.resolution, width=self.resolution, output_type="pt")
            images.append(out.images.cpu())  # the pipeline's dtype: fdfo.images.to_uint8 rounds in it (§8)
        return torch.cat(images)


def load_generator(checkpoint: str | Checkpoint | None, pretrained_model: str | None = None,
                   device: torch.device | None = None, guidance_scale: float | None = None,
                   num_steps: int | None = None, resolution: int | None = None, base: BaseModel | None = None
                   ) -> ImageSampler:
    """Resolve `checkpoint` (any form of fdfo.hub, or a resolved Checkpoint; None = the base model), load the base
    model (or reuse `base`), add the adapter, and fix the guidance scale (default: the checkpoint's, see
    `resolve_guidance`).

    pretrained_model: default `base`'s model, else `choose_base_model` (our state.json's, else SD3.5 Medium);
    num_steps, resolution: default `sampling_defaults` (40 steps at 512 px, or a tiny model's training settings).
    """
    if num_steps is not None and num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else resolve_checkpoint(checkpoint)
    recorded = ckpt.pretrained_model
    if pretrained_model is None:
        pretrained_model = base.pretrained_model if base is not None else choose_base_model([ckpt])
    if (note := sampling_note(ckpt, num_steps, resolution)) is not None:
        dist.warn0(note)
    num_steps, resolution, sampling_source = sampling_defaults([ckpt], pretrained_model, num_steps, resolution)
    check_family(ckpt.description, recorded_family(ckpt.model_family, recorded), recorded, pretrained_model)
    if recorded is not None and recorded != pretrained_model:
        dist.warn0(f"{ckpt.description} was trained on {recorded}, but the base model is {pretrained_model}")
    adapter = read_adapter(ckpt) if ckpt.adapter_dir is not None else None
    scale, source = _guidance(ckpt, guidance_scale, pretrained_model)
    if base is None:
        from fdfo.models.registry import is_tiny
        from fdfo.threads import single_thread_if_tiny

        ensure_hub_reachable([pretrained_model])
        single_thread_if_tiny(is_tiny(pretrained_model))  # generate.py, metrics.py on a tiny model: one thread
        base = BaseModel(pretrained_model, device or dist.init())
    elif base.pretrained_model != pretrained_model:
        raise ValueError(f"the shared base model is {base.pretrained_model}, not {pretrained_model}")
    factor = family(pretrained_model).resolution_multiple(base.pipe)
    if resolution <= 0 or resolution % factor:
        raise ValueError(f"resolution {resolution} must be a positive multiple of {factor}")
    if adapter is not None:
        base.add(adapter)  # now, so an adapter that does not fit fails before any sampling
    sampler = ImageSampler(base, ckpt, adapter, scale, num_steps, resolution, source)
    sampler.sampling_source = sampling_source
    return sampler


def _guidance(ckpt: Checkpoint, requested: float | None, pretrained_model: str) -> tuple[float, str]:
    """(guidance scale, where it comes from) for `load_generator` (`resolve_guidance`)."""
    scale = resolve_guidance(ckpt.guidance_scale, requested, ckpt.description, default_guidance(pretrained_model))
    if requested is not None:
        return scale, "as requested"
    if ckpt.guidance_scale is not None:
        return scale, f"from the checkpoint's {ckpt.guidance_source}"
    return scale, "the default: the checkpoint records no guidance scale"


def describe(gen: ImageSampler) -> str:
    """One line for logs: checkpoint, base model, guidance scale and why it was chosen."""
    source = f" ({gen.guidance_source})" if gen.guidance_source else ""
    sampling = gen.sampling_source if gen.sampling_source != "as requested" else ""
    return (f"{gen.checkpoint_description} on {gen.base.pretrained_model}: guidance scale {gen.guidance_scale:g}"
            f"{source}, {gen.num_steps} Euler steps, {gen.resolution} px{f' ({sampling})' if sampling else ''}")


__all__ = ["Adapter", "BaseModel", "ImageSampler", "choose_base_model", "describe", "load_generator", "read_adapter",
           "resolve_guidance", "shared_settings"]
